"""The flow gives the same answer on every task runner: threads, a process pool, a 2-worker local Dask cluster."""

from __future__ import annotations

import pytest
from pipeline_support import tiny_params

pytestmark = pytest.mark.usefixtures("prefect_harness", "fresh_runtime_cache")

KEYS = ("swap_order", "best_layers", "opt_layers", "best_score", "opt_score", "teacher_score", "stop_reason")


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> str:
    """tiny-llama saved as a folder: every worker process loads the very same weights and tokenizer."""
    from dtr_core.models import load_model

    folder = tmp_path_factory.mktemp("teacher") / "tiny-llama"
    model, tokenizer = load_model("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _run(tmp_path, teacher: str, runner: dict) -> dict:
    from dtr_core.artifacts import read_json
    from flows.convert import run_convert

    tmp_path.mkdir(parents=True, exist_ok=True)
    params = tiny_params(tmp_path, model=teacher, runner=runner, tracking={"register_models": False})
    summary = run_convert(params)
    trajectory = read_json(summary["run_dir"] + "/greedy/trajectory.json")
    layers = {p["layer"]: p["normalized_loss"] for p in
              (read_json(m) for m in sorted((tmp_path / "runs").glob("*/students/*/meta.json")))}
    return {**{key: trajectory[key] for key in KEYS}, "losses": layers,
            "rounds": [(r["chosen"], r["score"], r["accepted"]) for r in trajectory["rounds"]]}


@pytest.mark.slow
def test_dask_local_cluster_matches_threads(tmp_path, teacher_folder):
    threads = _run(tmp_path / "threads", teacher_folder, {"kind": "threads", "workers": 2})
    dask = _run(tmp_path / "dask", teacher_folder, {"kind": "dask", "workers": 2})
    assert dask == threads


@pytest.mark.slow
def test_process_pool_matches_threads(tmp_path, teacher_folder):
    threads = _run(tmp_path / "threads", teacher_folder, {"kind": "threads", "workers": 2})
    processes = _run(tmp_path / "processes", teacher_folder, {"kind": "processes", "workers": 2})
    assert processes == threads
