"""Task: distil the students of a block of consecutive layers (one `dtr_core.distill.block.distill_block` call)
and log one MLflow child run per layer."""

from __future__ import annotations

import logging
import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from dtr_core.distill.config import DistillConfig
from tasks import runtime
from tasks.context import RunContext

logger = logging.getLogger(__name__)


def block_name(layers: list[int]) -> str:
    """`007-013`: the block's first and last layer (task run names, log lines, checkpoint folders)."""
    return f"{min(layers):03d}-{max(layers):03d}"


def eta_text(seconds_done: float, done: float, total: float) -> str:
    """Time left at the rate so far, as `4m05s` (`?` before any progress)."""
    if done <= 0:
        return "?"
    left = seconds_done / done * (total - done)
    return f"{int(left // 60)}m{int(left % 60):02d}s"


def _block_run_name() -> str:
    """`distill-layers-007-013`: the task run's name, from its `layers` parameter."""
    from prefect.runtime import task_run

    return f"distill-layers-{block_name(task_run.parameters['layers'])}"


@task(name="distill-block", cache_policy=NO_CACHE, task_run_name=_block_run_name)
def distill_block_task(ctx: RunContext, layers: list[int], config: DistillConfig, corpus: str) -> list[dict[str, Any]]:
    """Train (or reuse) the students of `layers` into `students/`, the teacher streaming `corpus`; returns their
    `LayerResult` dicts.

    A layer whose training diverges (a non-finite loss, or a held-out normalised loss at or above
    `max_normalized_loss`) comes back with status "failed" and a reason (not an exception): the search
    never offers it. A killed block resumes from its checkpoint (`dtr_core.distill.checkpoint`).
    """
    from dtr_core.distill.block import distill_block
    from dtr_core.distill.corpus import Corpus

    with runtime.torch_threads(ctx.threads):
        teacher, tokenizer = runtime.teacher(ctx.model)
        results = distill_block(teacher, layers, ctx.mixer, config, Corpus(corpus, tokenizer), ctx.layout.students,
                                progress=_progress_logger(layers))
    if ctx.tracking is not None:
        for result in results:
            _log_child_run(ctx, result, config)
    return [result.to_dict() for result in results]


def _progress_logger(layers: list[int]):
    """A `distill_block` progress callback: one console line per call with tokens/s, loss and ETA."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        log = get_run_logger()
    except MissingContextError:  # called outside a task run (tests)
        log = logger
    since: list[tuple[int, int, float]] = []  # (step, tokens, time) of the first call: rates from there

    def progress(step: int, total: int, loss: float, tokens: int) -> None:
        now = time.perf_counter()
        if not since:
            since.append((step, tokens, now))
        step0, tokens0, time0 = since[0]
        seconds = now - time0
        rate = f"{(tokens - tokens0) / seconds:.0f} tokens/s" if seconds > 0 else "? tokens/s"
        log.info("layers %s: step %d/%d, %s, train loss %.4g, ETA %s", block_name(layers), step, total, rate, loss,
                 eta_text(seconds, step - step0, total - step0))

    return progress


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
