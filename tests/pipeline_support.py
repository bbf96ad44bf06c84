"""Shared pieces of the pipeline tests (tests/test_flows.py, tests/test_pipeline_*.py).

The fixtures they use (`prefect_harness`, `fresh_runtime_cache`) live in `tests/conftest.py`.
- `tiny_params`: the smoke profile made smaller still (seconds per stage), writing into `tmp_path`, with
  its own temporary sqlite MLflow store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
