"""Shared pieces of the pipeline tests (tests/test_flows.py, tests/test_pipeline_*.py).

- `prefect_harness` fixture: ONE `prefect_test_harness()` for the whole session (it takes ~20 s to start),
  shared by every module that imports the fixture (reference-counted: started by the first user, stopped
  when the last one is torn down).
- `tiny_params`: the smoke profile made smaller still (seconds per stage), writing into `tmp_path`, with
  its own temporary sqlite MLflow store.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

_harness: dict[str, Any] = {"context": None, "users": 0}


@contextlib.contextmanager
def shared_prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    if _harness["users"] == 0:
        context = prefect_test_harness(server_startup_timeout=120)
        context.__enter__()
        _harness["context"] = context
    _harness["users"] += 1
    try:
        yield
    finally:
        _harness["users"] -= 1
        if _harness["users"] == 0:
            _harness["context"].__exit__(None, None, None)
            _harness["context"] = None


@pytest.fixture(scope="session")
def prefect_harness():
    with shared_prefect_harness():
        yield


@pytest.fixture(autouse=True)
def _fresh_runtime_cache():
    """Each test starts without models cached by an earlier one (they would be reused across tests)."""
    from tasks import runtime

    runtime.clear()
    yield
    runtime.clear()


TINY = {
    "task": {"name": "sentiment", "validation_limit": 16, "test_limit": 16},
    "distill": {"tokens": 512, "seq_len": 32, "steps": 4},
    "speed": {"context_len": 64, "decode_tokens": 4},
}


def tiny_params(tmp_path: Path, **overrides: Any):
    """Smoke-profile parameters shrunk further; output and MLflow store under `tmp_path`."""
    from flows.params import _merge, build_params

    values = _merge(TINY, {"output_dir": str(tmp_path / "runs"),
                           "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                        "experiment": "dtr-test"}})
    return build_params("smoke", **_merge(values, overrides))


def mlflow_client(params):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=params.tracking.tracking_uri, registry_uri=params.tracking.tracking_uri)


def runs_by_kind(client, parent_run_id: str) -> dict[str, list]:
    """Child runs of a parent, grouped by their `dtr.kind` tag."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000)
    grouped: dict[str, list] = {}
    for run in children:
        grouped.setdefault(run.data.tags.get("dtr.kind", ""), []).append(run)
    return grouped
