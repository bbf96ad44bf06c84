"""Sub-flow `distill`: phase 1 of DtR on one model — the layers split into blocks of consecutive layers, one
task per block, run in parallel; each block streams the teacher over the corpus and trains its students
together (blockwise local distillation: the layers never depend on each other's students).

Usable alone (`distill(model=..., run_dir=...)`) or from `convert`, which passes its task runner and MLflow
parent run. Completed layers (same key) are reused and a killed block resumes from its checkpoint, so a
killed run continues where it stopped.

Cost, logged to MLflow as `distill.teacher_layer_forwards_per_token`: teacher layer-forwards per training
token and per layer trained (`dtr_core.distill.block.teacher_layer_forwards`): 1 with one block of every
layer, (L + 1) / 2 with one block per layer; `layers_per_task` trades it against parallel tasks.
"""

from __future__ import annotations

import math
import time
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from dtr_core.distill.block import split_into_blocks, teacher_layer_forwards
from dtr_core.run_layout import RunLayout, slug
from flows.run_names import run_name
from flows.runners import parallel_threads
from tasks import runtime
from tasks.context import RunContext
from tasks.distill import block_name, distill_block_task, eta_text
from tasks.params import ConvertParams, DistillBudget, MixerName, RunnerParams
from tasks.runtime import serial_threads
from tasks.tracking import Tracking

__all__ = ["distill", "eta_text"]


@flow(name="distill", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=False,
      flow_run_name=run_name("distill"),
      description="DtR phase 1: stream the teacher, distil one linear-attention student per layer, a block of "
                  "layers per task")
def distill(
    model: str = ConvertParams.model_fields["model"].default,
    budget: DistillBudget = DistillBudget(),
    mixer: MixerName = ConvertParams.model_fields["mixer"].default,
    seed: int = ConvertParams.model_fields["seed"].default,
    run_dir: str = "runs/distill",
    runner: RunnerParams = RunnerParams(),
    tracking: Tracking | None = None,
) -> list[dict[str, Any]]:
    """Returns the `LayerResult` dicts of every layer, sorted by layer."""
    logger = get_run_logger()
    ctx = RunContext(model=model, run_dir=str(run_dir), mixer=mixer, tracking=tracking, threads=serial_threads())
    config = budget.distill_config(seed)
    # 1. the blocks: consecutive layers that share one teacher forward per step
    num_layers = runtime.num_layers(model)
    blocks = split_into_blocks(num_layers, budget.layers_per_task or math.ceil(num_layers / runner.workers))
    forwards = teacher_layer_forwards(blocks)
    logger.info("phase 1: distilling %d layers in %d blocks of up to %d, %d steps of %d tokens per layer "
                "(%d tokens), %.2f teacher layer-forwards per training token and layer", num_layers, len(blocks),
                len(blocks[0]), config.steps, config.tokens_per_step, config.steps * config.tokens_per_step, forwards)
    if tracking is not None:
        tracking.log_metrics({"distill.teacher_layer_forwards_per_token": forwards, "distill.blocks": len(blocks),
                              "distill.steps": config.steps, "distill.tokens_per_layer":
                                  config.steps * config.tokens_per_step})
    # 2. every block is its own task: the teacher streams the corpus, the block's students train on it
    futures = distill_block_task.map(unmapped(ctx.with_threads(parallel_threads(runner))), blocks,
                                     unmapped(config), unmapped(budget.corpus))
    return _collect(futures, blocks, ctx.layout)


def _collect(futures, blocks: list[list[int]], layout: RunLayout) -> list[dict[str, Any]]:
    """The layers' results as their blocks finish, with progress (a Prefect progress artifact, log lines with an
    ETA)."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key=f"distill-progress-{slug(layout.root.name, 40)}",
                                        description=f"layers distilled in {layout.root.name}")
    total = sum(len(block) for block in blocks)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for future in as_completed(futures):
        block_results = future.result()
        results.extend(block_results)
        update_progress_artifact(progress, 100.0 * len(results) / total)
        for result in block_results:
            logger.info("distilled layer %d: %s, normalised loss %s%s", result["layer"],
                        "reused" if result["reused"] else result["status"],
                        "-" if result["normalized_loss"] is None else f"{result['normalized_loss']:.3f}",
                        "" if result["status"] == "ok" else f" FAILED: {result['reason']}")
        logger.info("distilled %d/%d layers (block %s done), ETA %s", len(results), total,
                    block_name([r["layer"] for r in block_results]),
                    eta_text(time.perf_counter() - started, len(results), total))
    return sorted(results, key=lambda r: r["layer"])
