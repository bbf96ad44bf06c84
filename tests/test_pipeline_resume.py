"""A run that dies half way registers nothing, leaves nothing that looks complete, and resumes without redoing
finished layers or scored candidates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_support import mlflow_client, runs_by_kind, tiny_params

pytestmark = pytest.mark.usefixtures("prefect_harness", "fresh_runtime_cache")


def _registered_names(client) -> list[str]:
    return [model.name for model in client.search_registered_models()]


def test_failed_runs_register_nothing_and_resume(tmp_path, monkeypatch):
    import dtr_core.distill.block
    import dtr_core.search.scorer
    from dtr_core.artifacts import read_json
    from dtr_core.run_layout import RunLayout
    from flows.convert import run_convert

    params = tiny_params(tmp_path, distill={"checkpoint_every_steps": 10})
    layout = RunLayout(tmp_path / "runs" / params.resolved_run_id())
    client = mlflow_client(params)

    # 1. the run dies at step 25 of the block of layers 2-3 (2 workers: blocks 0-1 and 2-3), after its
    # checkpoint of step 20
    real_distill = dtr_core.distill.block.distill_block

    def distill_dies_in_block_2_3(model, layers, *args, **kwargs):
        if 2 in layers:
            def crash(step, *rest):
                if step >= 25:
                    raise RuntimeError("simulated crash in layers 2-3")
            kwargs["progress"] = crash
        return real_distill(model, layers, *args, **kwargs)

    monkeypatch.setattr(dtr_core.distill.block, "distill_block", distill_dies_in_block_2_3)
    with pytest.raises(Exception, match="simulated crash"):
        run_convert(params)
    monkeypatch.undo()
    assert not layout.summary.exists() and not (layout.root / "hybrids").exists()
    assert sorted(p.parent.name for p in layout.students.glob("*/meta.json")) == ["layer_000", "layer_001"]
    assert read_json(layout.students / "block_002-003" / "checkpoint" / "state.json")["step"] == 20
    assert not list(layout.root.rglob(".*tmp-*")), "a temporary file or folder was left behind"
    assert _registered_names(client) == []
    first = client.search_runs([client.get_experiment_by_name("dtr-test").experiment_id],
                               filter_string="tags.`dtr.model` = 'tiny-llama'")
    assert [run.info.status for run in first] == ["FAILED"]
    trained_at = {p.parent.name: p.stat().st_mtime_ns for p in layout.students.glob("*/meta.json")}

    # 2. the next run dies in greedy round 1 (same process: models stay cached, as in a long-lived worker)
    real_score = dtr_core.search.scorer.RoundScorer.score

    def score_dies_in_round_1(self, layer):
        if self.committed:
            raise RuntimeError("simulated crash in round 1")
        return real_score(self, layer)

    monkeypatch.setattr(dtr_core.search.scorer.RoundScorer, "score", score_dies_in_round_1)
    with pytest.raises(Exception, match="simulated crash in round 1"):
        run_convert(params)
    monkeypatch.undo()
    assert {p.parent.name: p.stat().st_mtime_ns for p in layout.students.glob("*/meta.json")
            if p.parent.name in trained_at} == trained_at, "completed layers were trained again"
    # the block of layers 2-3 resumed from its checkpoint and finished; the checkpoint is gone
    assert (layout.students / "layer_003" / "meta.json").is_file() and not (layout.students / "block_002-003").exists()
    assert layout.round(0).is_file() and not layout.summary.exists()
    assert _registered_names(client) == []
    round0 = sorted(layout.greedy.glob("candidates/r00_*.json"))
    assert len(round0) == 4

    # 3. the third run completes, reusing every layer and every round-0 candidate
    summary = run_convert(params)
    assert layout.summary.is_file()
    children = runs_by_kind(client, summary["mlflow"]["run_id"])
    assert {r.data.params["layer"]: r.data.tags["dtr.reused"] for r in children["distill"]} == \
        {"0": "True", "1": "True", "2": "True", "3": "True"}
    reused = {(r.data.params["round"], r.data.params["layer"]): r.data.tags["dtr.reused"] for r in children["candidate"]}
    assert all(flag == "True" for (rnd, _), flag in reused.items() if rnd == "0")
    assert read_json(layout.trajectory)["rounds"][0] == read_json(layout.round(0))
    assert sorted(_registered_names(client)) == [params.registered_name()]


@pytest.mark.slow
def test_killed_cli_run_continues_where_it_stopped(tmp_path):
    """SIGKILL `dtr convert --profile smoke` once layers are done; the re-run reuses them."""
    from dtr_core.models import load_model

    teacher = tmp_path / "teacher"  # a folder: both processes load the very same weights and tokenizer
    model, tokenizer = load_model("tiny-llama")
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    dtr = Path(sys.executable).parent / "dtr"
    args = [str(dtr), "convert", "--profile", "smoke", "--model", str(teacher), "--steps", "30",
            "--output-dir", str(tmp_path / "runs"),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-register"]
    process = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    metas: list[Path] = []
    while time.monotonic() < deadline and process.poll() is None:
        metas = list((tmp_path / "runs").glob("*/students/layer_*/meta.json"))
        if metas:
            break
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the CLI, its temporary Prefect server: everything it started
    process.wait()
    assert metas, "no layer finished before the deadline"
    done = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/students/layer_*/meta.json")}
    assert not list((tmp_path / "runs").glob("*/summary.json"))
    rerun = subprocess.run(args + ["--json"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in done} == done, "finished layers were trained again"
    assert list((tmp_path / "runs").glob("*/summary.json"))
