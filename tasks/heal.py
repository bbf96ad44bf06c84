"""Task: heal the searched hybrid end to end (one `dtr_core.heal.stage.heal_export` call) and log its MLflow child run."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from dtr_core.heal.config import HealConfig
from tasks import runtime
from tasks.context import RunContext
from tasks.params import TaskParams


@task(name="heal-hybrid", cache_policy=NO_CACHE, task_run_name="heal-{role}")
def heal_task(ctx: RunContext, layers: list[int], config: HealConfig, corpus: str, role: str = "healed",
              metadata: dict[str, Any] | None = None, students_dir: str | None = None,
              students_out: str | None = None, run_name: str | None = None,
              task_params: TaskParams | None = None) -> dict[str, Any]:
    """Heal the hybrid with `layers` linear into `hybrids/<role>`; returns the export record with `heal`
    (the `HealResult` dict) and `path` (None when the heal failed and nothing was saved). `students_dir`: where
    the students start from (default: the run's distilled students); `students_out`: where to write the students
    after a successful heal (`dtr_core.heal.students`; the continued search scores with them); `run_name`: the
    MLflow child run's name (default `heal-<role>`); `task_params`: the task whose train split is extra
    language-modelling data when `config.task_lm_weight` > 0."""
    from dtr_core.heal.stage import heal_export
    from dtr_core.heal.training import progress_line

    logger = get_run_logger()
    started = time.perf_counter()

    def progress(step: int, steps: int, loss: float) -> None:
        logger.info(progress_line(step, steps, loss, time.perf_counter() - started, config))

    out_dir = ctx.layout.hybrid(role)
    with runtime.torch_threads(ctx.threads):
        teacher, tokenizer = runtime.teacher(ctx.model)
        task_texts = None
        if config.task_lm_weight:
            from dtr_core.heal.task_text import task_lm_texts

            task_texts = task_lm_texts(runtime.task(task_params))
        record = heal_export(teacher, tokenizer, students_dir or ctx.layout.students, layers, ctx.mixer, out_dir,
                             config, corpus, ctx.layout.heal_state, metadata, progress, task_texts)
        if students_out is not None and record["heal"]["status"] == "ok":
            from dtr_core.heal.students import write_healed_students

            write_healed_students(teacher, out_dir, layers, students_dir or ctx.layout.students, students_out,
                                  record["key"])
    result = record["heal"]
    if ctx.tracking is not None:
        ctx.tracking.child_run(
            run_name or f"heal-{role}", params={"layers": layers, "corpus": corpus, **{f"heal.{k}": v for k, v in config.to_dict().items()}},
            metrics={"initial_kl": result["initial_kl"], "final_kl": result["final_kl"], "steps": result["steps"],
                     "tokens": result["tokens"], "seconds": result["seconds"]},
            series={"heal_kl": [(int(step), float(loss)) for step, loss, *_ in result["loss_curve"]]},
            tags={"dtr.kind": "heal", "dtr.status": result["status"], "dtr.reused": record["reused"],
                  **({"dtr.reason": result["reason"]} if result["reason"] else {})},
            status="FINISHED" if result["status"] == "ok" else "FAILED")
    return {**record, "path": str(out_dir) if result["status"] == "ok" else None}

