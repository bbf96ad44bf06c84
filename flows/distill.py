"""Sub-flow `distill`: phase 1 of DtR on one model — capture the teacher once, then distil every layer's
student as its own task, in parallel (blockwise local distillation: layers are independent).

Usable alone (`distill(model=..., run_dir=...)`) or from `convert`, which passes its task runner and MLflow
parent run. Completed layers (same content hash) are reused, so a killed run continues where it stopped.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from dtr_core.run_layout import RunLayout, slug
from flows.runners import parallel_threads
from tasks.capture import capture_task
from tasks.context import RunContext
from tasks.distill import distill_layer_task
from tasks.params import ConvertParams, DistillBudget, MixerName, RunnerParams
from tasks.runtime import serial_threads
from tasks.tracking import Tracking


def eta_text(seconds_done: float, done: int, total: int) -> str:
    if done == 0:
        return "?"
    left = seconds_done / done * (total - done)
    return f"{int(left // 60)}m{int(left % 60):02d}s"


@flow(name="distill", task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=False,
      description="DtR phase 1: capture teacher activations, distil one linear-attention student per layer")
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
    # 1. teacher activations: what each layer's attention receives and returns (teacher forcing)
    capture = capture_task(ctx, budget)
    layers = capture["layers"]
    logger.info("phase 1: %d tokens captured (%s); distilling %d layers", capture["num_tokens"],
                "reused" if capture["reused"] else f"{capture['seconds']:.0f}s", len(layers))
    # 2. one student per layer, independently: every layer is its own task
    futures = distill_layer_task.map(unmapped(ctx.with_threads(parallel_threads(runner))), layers,
                                     unmapped(budget.distill_config(seed)))
    return _collect(futures, layers, ctx.layout)


def _collect(futures, layers: list[int], layout: RunLayout) -> list[dict[str, Any]]:
    """The layers' results as they finish, with progress (a Prefect progress artifact, log lines with an ETA)."""
    logger = get_run_logger()
    progress = create_progress_artifact(0.0, key=f"distill-progress-{slug(layout.root.name, 40)}",
                                        description=f"layers distilled in {layout.root.name}")
    started = time.perf_counter()
    results = []
    for future in as_completed(futures):
        result = future.result()
        results.append(result)
        update_progress_artifact(progress, 100.0 * len(results) / len(layers))
        logger.info("distilled %d/%d layers (layer %d: %s, normalised loss %s)%s, ETA %s", len(results), len(layers),
                    result["layer"], "reused" if result["reused"] else result["status"],
                    "-" if result["normalized_loss"] is None else f"{result['normalized_loss']:.3f}",
                    "" if result["status"] == "ok" else f" FAILED: {result['reason']}",
                    eta_text(time.perf_counter() - started, len(results), len(layers)))
    return sorted(results, key=lambda r: r["layer"])
