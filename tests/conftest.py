"""Shared fixtures: tiny in-code models (seconds, CPU), the Prefect test server, and the GPU marker policy."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA (and flash-linear-attention); without a GPU they are skipped with the reason."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: run on the GPU machine (`pytest -m gpu`)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: tiny matmuls with 2 threads on a busy 2-core machine spin 20-60x slower.

    A module uses it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_llama():
    from dtr_core.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server (`prefect_test_harness`) for the whole session: it takes ~20 s to start."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def fresh_runtime_cache():
    """The test starts and ends without models cached by the pipeline's runtime (tasks.runtime)."""
    from tasks import runtime

    runtime.clear()
    yield
    runtime.clear()
