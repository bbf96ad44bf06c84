"""Shared pieces of the tests that are not fixtures (the fixtures live in `tests/conftest.py`).

- `tiny_params`: the smoke profile made smaller still (seconds per stage), writing into `tmp_path`, with
  its own temporary sqlite MLflow store (tests/test_flows.py, tests/test_pipeline_*.py).
- `toy_texts`: short random letter-word texts for the toy tasks of the search tests.
- `cli_env`, `wait_for`: the environment and the polling of the tests that run `dtr` as real processes.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "task": {"name": "sentiment", "validation_limit": 16, "test_limit": 16},
    # 48 steps (~1 s a layer): every tiny-llama layer beats max_normalized_loss 1.0 (32 steps: layer 0 at 0.96)
    "distill": {"tokens": 512, "seq_len": 32, "steps": 48},
    "speed": {"context_len": 64, "decode_tokens": 4},
}


def tiny_params(tmp_path: Path, **overrides: Any):
    """Smoke-profile parameters shrunk further; output and MLflow store under `tmp_path`."""
    from tasks.params import build_params, merge

    values = merge(TINY, {"output_dir": str(tmp_path / "runs"),
                           "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                                        "experiment": "dtr-test"}})
    return build_params("smoke", **merge(values, overrides))


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


def toy_texts(n: int, seed: int) -> list[str]:
    """`n` texts of 3-9 words of 2-6 letters from a-h; the same for the same seed."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6)))

    return [" ".join(word() for _ in range(rng.randint(3, 9))) for _ in range(n)]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `dtr` subprocess: this checkout importable, one torch thread, and no
    PREFECT_API_URL (the CLI runs its own temporary Prefect server, as a user's would)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DTR_TORCH_THREADS": "1", **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def wait_for(predicate: Callable[[], bool], seconds: float, process: subprocess.Popen | None = None,
             poll: float = 0.1) -> bool:
    """Whether `predicate` came true within `seconds` (False at once if `process` exits first)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process is not None and process.poll() is not None:
            return False
        time.sleep(poll)
    return False
