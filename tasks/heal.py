"""Task: heal the searched hybrid end to end (one `dtr_core.heal.stage.heal_export` call) and log its MLflow child run."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dtr_core.heal.config import HealConfig
from tasks import runtime
from tasks.context import RunContext


@task(name="heal-hybrid", cache_policy=NO_CACHE, task_run_name="heal-{role}")
def heal_task(ctx: RunContext, layers: list[int], config: HealConfig, corpus: str, role: str = "healed",
              metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Heal the hybrid with `layers` linear into `hybrids/<role>`; returns the export record with `heal`
    (the `HealResult` dict) and `path` (None when the heal failed and nothing was saved)."""
    from dtr_core.heal.stage import heal_export
    from dtr_core.heal.training import progress_line

    logger = get_run_logger()
    started = time.perf_counter()

    def progress(step: int, steps: int, loss: float) -> None:
        logger.info(progress_line(step, steps, loss, time.perf_counter() - started, config))

    out_dir = ctx.layout.hybrid(role)
    with runtime.torch_threads(ctx.threads):
        teacher, tokenizer = runtime.teacher(ctx.model)
        record = heal_export(teacher, tokenizer, ctx.layout.students, layers, ctx.mixer, out_dir, config, corpus,
                             ctx.layout.heal_state, metadata, progress)
    result = record["heal"]
    if ctx.tracking is not None:
        ctx.tracking.child_run(
            f"heal-{role}", params={"layers": layers, "corpus": corpus, **{f"heal.{k}": v for k, v in config.to_dict().items()}},
            metrics={"initial_kl": result["initial_kl"], "final_kl": result["final_kl"], "steps": result["steps"],
                     "tokens": result["tokens"], "seconds": result["seconds"]},
            series={"heal_kl": [(int(step), float(loss)) for step, loss, *_ in result["loss_curve"]]},
            tags={"dtr.kind": "heal", "dtr.status": result["status"], "dtr.reused": record["reused"],
                  **({"dtr.reason": result["reason"]} if result["reason"] else {})},
            status="FINISHED" if result["status"] == "ok" else "FAILED")
    return {**record, "path": str(out_dir) if result["status"] == "ok" else None}

