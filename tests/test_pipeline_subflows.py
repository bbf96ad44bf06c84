"""The sub-flows run on their own: distill -> replace on a run folder, then evaluate and benchmark."""

from __future__ import annotations

import pytest
from pipeline_support import TINY

pytestmark = pytest.mark.usefixtures("prefect_harness", "fresh_runtime_cache")


def test_distill_replace_evaluate_benchmark_alone(tmp_path):
    from dtr_core.artifacts import read_json
    from dtr_core.run_layout import RunLayout
    from flows.benchmark import benchmark
    from flows.distill import distill
    from flows.evaluate import evaluate
    from tasks.params import DistillBudget, SpeedParams, TaskParams
    from flows.replace import replace

    run_dir = tmp_path / "run"
    task = TaskParams(**TINY["task"])
    # blocks of 3 consecutive layers: layers 0-2 and 3
    results = distill(model="tiny-llama", budget=DistillBudget(**TINY["distill"], layers_per_task=3),
                      run_dir=str(run_dir))
    assert [r["layer"] for r in results] == [0, 1, 2, 3] and all(r["status"] == "ok" for r in results)
    assert sorted(p.name for p in RunLayout(run_dir).students.iterdir()) == [f"layer_{i:03d}" for i in range(4)]

    trajectory = replace(model="tiny-llama", task=task, run_dir=str(run_dir), max_layers=2)
    layout = RunLayout(run_dir)
    assert read_json(layout.trajectory) == trajectory
    assert len(trajectory["opt_layers"]) <= 2 and trajectory["num_layers"] == 4
    assert trajectory["stop_reason"] in ("cap", "rejected")

    scores = evaluate(models=["tiny-llama"], task=task, splits=["validation"])
    assert scores["tiny-llama"]["validation"]["score"] == pytest.approx(trajectory["teacher_score"])

    speeds = benchmark(models=["tiny-llama", "tiny-llama"], labels=["a", "b"],
                       speed=SpeedParams(context_len=32, decode_tokens=2))
    assert [s["label"] for s in speeds] == ["a", "b"] and "decode_speedup" in speeds[1]
    with pytest.raises(ValueError, match="distinct"):
        benchmark(models=["tiny-llama", "tiny-llama"], labels=["a", "a"], speed=SpeedParams(context_len=32))
