"""Task: distil one layer's student (one `dtr_core.distill.training.distill_layer` call) and log its MLflow child run."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from dtr_core.distill.config import DistillConfig
from tasks import runtime
from tasks.context import RunContext


@task(name="distill-layer", cache_policy=NO_CACHE, task_run_name="distill-layer-{layer:03d}")
def distill_layer_task(ctx: RunContext, layer: int, config: DistillConfig) -> dict[str, Any]:
    """Train (or reuse) the student of `layer` into `students/`; returns its `LayerResult` as a dict.

    A layer whose training diverges (a non-finite loss, or a held-out normalised loss at or above
    `max_normalized_loss`) comes back with status "failed" and a reason (not an exception): the search
    never offers it. A reused student whose weights changed on disk is trained again (`distill_layer`).
    """
    from dtr_core.distill.training import distill_layer

    layout = ctx.layout
    with runtime.torch_threads(ctx.threads):
        teacher, _ = runtime.teacher(ctx.model)
        result = distill_layer(teacher, layer, layout.activations, ctx.mixer, config, layout.students)
    if ctx.tracking is not None:
        _log_child_run(ctx, result, config)
    return result.to_dict()


def _log_child_run(ctx: RunContext, result, config: DistillConfig) -> None:
    """The layer's MLflow child run: its config, losses and loss curve."""
    from dtr_core.artifacts import read_json
    from dtr_core.distill.training import META, layer_dir

    curve = read_json(layer_dir(ctx.layout.students, result.layer) / META).get("loss_curve", [])
    ctx.tracking.child_run(
        f"distill-l{result.layer:03d}",
        params={"layer": result.layer, "mixer": ctx.mixer, **{f"distill.{k}": v for k, v in config.to_dict().items()}},
        metrics={"normalized_loss": result.normalized_loss, "max_normalized_loss": result.max_normalized_loss,
                 "initial_normalized_loss": result.initial_normalized_loss,
                 "final_loss": result.final_loss, "initial_loss": result.initial_loss,
                 "seconds": result.seconds, "tokens": result.tokens, "steps": result.steps},
        series={"train_loss": [(int(step), float(loss)) for step, loss, *_ in curve]},
        tags={"dtr.kind": "distill", "dtr.layer": result.layer, "dtr.status": result.status,
              "dtr.reused": result.reused, **({"dtr.reason": result.reason} if result.reason else {})},
        status="FINISHED" if result.ok else "FAILED",
    )
