"""Task: distil one layer's student (one `dtr_core.distill.training.distill_layer` call) and log its MLflow child run."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import runtime
from tasks.tracking import Tracking


@task(name="distill-layer", cache_policy=NO_CACHE, task_run_name="distill-layer-{layer:03d}")
def distill_layer_task(model: str, layer: int, activations_dir: str, students_dir: str, mixer: str,
                       distill_config: dict[str, Any], tracking: Tracking | None, threads: int) -> dict[str, Any]:
    """Train (or reuse) the student of `layer`; returns its `LayerResult` as a dict.

    A layer whose training diverges (a non-finite loss, or a held-out normalised loss at or above
    `max_normalized_loss`) comes back with status "failed" and a reason (not an exception): the search
    never offers it. A reused student whose weights changed on disk is trained again (`distill_layer`).
    """
    from dtr_core.artifacts import read_json
    from dtr_core.distill.training import META, DistillConfig, distill_layer, layer_dir

    with runtime.torch_threads(threads):
        teacher, _ = runtime.teacher(model)
        result = distill_layer(teacher, layer, activations_dir, mixer, DistillConfig.from_dict(distill_config),
                               students_dir)
    if tracking is not None:
        meta = read_json(layer_dir(students_dir, layer) / META)
        curve = meta.get("loss_curve", [])
        tracking.child_run(
            f"distill-l{layer:03d}",
            params={"layer": layer, "mixer": mixer, **{f"distill.{k}": v for k, v in distill_config.items()}},
            metrics={"normalized_loss": result.normalized_loss, "max_normalized_loss": result.max_normalized_loss,
                     "initial_normalized_loss": result.initial_normalized_loss,
                     "final_loss": result.final_loss, "initial_loss": result.initial_loss,
                     "seconds": result.seconds, "tokens": result.tokens, "steps": result.steps},
            series={"train_loss": [(int(step), float(loss)) for step, loss, *_ in curve]},
            tags={"dtr.kind": "distill", "dtr.layer": layer, "dtr.status": result.status,
                  "dtr.reused": result.reused, **({"dtr.reason": result.reason} if result.reason else {})},
            status="FINISHED" if result.ok else "FAILED",
        )
    return result.to_dict()
