"""Sub-flow `replace`: phase 2 of DtR on distilled students — greedy layer replacement where every candidate
of a round is its own task.

The decisions (argmax with ties to the lowest layer, best/opt bookkeeping, point or bootstrap acceptance,
caps) are `dtr_core.search.decisions.greedy_replace`'s; this flow only supplies `score_candidates`, which submits one
`score_candidate_task` per candidate layer, ordered by last round's scores (round 0: by distillation loss)
so strong candidates run first and raise the bar for exact early rejection. Each finished round is written
to `greedy/round_NN.json`, logged to MLflow (parent metric `round_best_score`, step = round) and shown in a
Prefect table artifact (one per run, updated in place); each candidate's result file makes a killed run
resume inside a round.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from dtr_core.artifacts import hash_json, read_json, write_json
from dtr_core.run_layout import RunLayout, slug
from dtr_core.distill.training import read_layer_results
from dtr_core.evaluation.generation import regex_warning
from dtr_core.search.decisions import CandidateScore, RoundRecord, greedy_replace
from flows.distill import eta_text
from flows.run_names import run_name
from flows.runners import parallel_threads
from tasks import runtime
from tasks.candidates import score_candidate_task
from tasks.context import RunContext
from tasks.evaluate import evaluate_task
from tasks.params import (
    AcceptanceParams, ConvertParams, MixerName, RunnerParams, SpeedParams, TaskParams, ToleranceParams,
)
from tasks.report import publish_table
from tasks.runtime import serial_threads
from tasks.tracking import Tracking


def round_rows(rounds: list[dict[str, Any]], p_min: float) -> list[dict[str, Any]]:
    """One table row per greedy round (Prefect table artifact, CLI)."""
    rows = []
    for r in rounds:
        scored = [c for c in r["candidates"] if c["score"] is not None]
        rows.append({"round": r["index"], "linear_before": len(r["committed_before"]), "chosen_layer": r["chosen"],
                     "score": round(r["score"], 4), "p_min": round(p_min, 4),
                     "decision": "commit" if r["accepted"] else "stop", "new_best": r["new_best"],
                     "candidates": len(r["candidates"]), "rejected_early": len(r["candidates"]) - len(scored)})
    return rows


SAVINGS_CONTEXT = SpeedParams.model_fields["long_context_len"].default  # the speed line's long context


def replacement_savings_lines(teacher, mixer: str, layers: list[int]) -> list[str]:
    """One line per candidate layer: the decoding-cache bytes its replacement alone saves at the long context
    (a sliding-window layer's K/V is bounded by its window, so replacing it saves less, or nothing)."""
    from dtr_core.speed import replacement_savings

    savings = {s["layer"]: s for s in replacement_savings(teacher, SAVINGS_CONTEXT, mixer)}
    return [f"layer {layer} ({savings[layer]['layer_type']}): replacing it saves "
            f"{savings[layer]['cache_bytes_saved'] / 1024:,.0f} KiB of cache at {SAVINGS_CONTEXT:,} tokens"
            for layer in layers]


@flow(name="replace", task_runner=ThreadPoolTaskRunner(max_workers=2), flow_run_name=run_name("replace"),
      description="DtR phase 2: greedy layer replacement on distilled students (one task per candidate)")
def replace(
    model: str = ConvertParams.model_fields["model"].default,
    task: TaskParams = TaskParams(),
    mixer: MixerName = ConvertParams.model_fields["mixer"].default,
    run_dir: str = "runs/distill",
    tolerance: ToleranceParams = ToleranceParams(),
    acceptance: AcceptanceParams = AcceptanceParams(),
    max_layers: int | None = ConvertParams.model_fields["max_layers"].default,
    seed: int = ConvertParams.model_fields["seed"].default,
    runner: RunnerParams = RunnerParams(),
    tracking: Tracking | None = None,
) -> dict[str, Any]:
    """Returns `GreedyResult.to_dict()`; also written to `greedy/trajectory.json`."""
    logger = get_run_logger()
    ctx = RunContext(model=model, run_dir=str(run_dir), mixer=mixer, tracking=tracking,
                     threads=parallel_threads(runner))
    layout = ctx.layout
    # 1. the candidates: every successfully distilled layer
    num_layers = runtime.num_layers(model)
    layer_results = read_layer_results(layout.students)
    available = sorted(layer for layer, result in layer_results.items() if result.ok)
    if not available:
        raise ValueError(f"no successfully distilled student in {layout.students}; run the distill flow first")
    run_key = hash_json({"model": model, "task": task.model_dump(mode="json"), "mixer": mixer,
                         "students": {str(k): v.key for k, v in sorted(layer_results.items())}})
    # 2. P_base: the teacher on the validation split (per-example values: bootstrap acceptance); P_min from it
    teacher = evaluate_task(model, task, {"validation": task.validation_limit, "test": task.test_limit}, "teacher",
                            str(layout.reports / "eval_teacher.json"), serial_threads(), per_example=True)["validation"]
    warning = regex_warning(runtime.task(task), teacher["predictions"])  # before the search starts
    if warning:
        logger.warning(warning)
    tolerance_obj = tolerance.build()
    p_min = tolerance_obj.threshold(teacher["score"])
    logger.info("phase 2: teacher validation %s %.4f, P_min %.4f, %d candidate layers", teacher["metric"],
                teacher["score"], p_min, len(available))
    for line in replacement_savings_lines(runtime.teacher(model)[0], mixer, available):
        logger.info(line)
    # 3. greedy rounds: every candidate of a round its own task, strongest first (round 0: by distillation loss)
    first_hint = {layer: -(layer_results[layer].normalized_loss or math.inf) for layer in available}
    recorder = RoundRecorder(layout, p_min, tracking)
    result = greedy_replace(
        CandidateScorer(ctx, task, run_key, first_hint), num_layers, available, teacher["score"], tolerance_obj,
        acceptance.build(seed), teacher_per_example=teacher["per_example"], max_layers=max_layers,
        on_round=recorder)
    # 4. the trajectory: M_best and M_opt
    trajectory = {**result.to_dict(), "metric": teacher["metric"], "validation_limit": task.validation_limit}
    write_json(layout.trajectory, trajectory)
    logger.info("phase 2 done (%s): M_best %s (%.4f), M_opt %s (%.4f)", result.stop_reason,
                list(result.best_layers), result.best_score, list(result.opt_layers), result.opt_score)
    return trajectory


class CandidateScorer:
    """`score_candidates` of `greedy_replace`: one `score_candidate_task` per candidate layer, ordered by the
    last round's scores (round 0: `first_hint`) so strong candidates raise the early-rejection bar first."""

    def __init__(self, ctx: RunContext, task: TaskParams, run_key: str, first_hint: dict[int, float]):
        self.ctx, self.task, self.run_key, self.first_hint = ctx, task, run_key, first_hint

    def __call__(self, committed: tuple[int, ...], candidates: list[int],
                 order_hint=None) -> dict[int, CandidateScore]:
        logger = get_run_logger()
        hint = order_hint or self.first_hint
        order = sorted(candidates, key=lambda layer: (-hint.get(layer, -math.inf), layer))
        index = len(committed)  # every finished round commits exactly one layer, or ends the search
        started = time.perf_counter()
        logger.info("greedy round %d: scoring %d candidates (linear so far: %s)", index, len(order),
                    list(committed) or "none")
        futures = [score_candidate_task.submit(self.ctx, self.task, tuple(committed), layer, index, self.run_key)
                   for layer in order]
        results = _gather(futures, order, index, started)
        logger.info("greedy round %d: %d scored, %d rejected early in %.0fs", index,
                    sum(r["score"] is not None for r in results.values()),
                    sum(r["rejected_early"] for r in results.values()), time.perf_counter() - started)
        return {layer: CandidateScore.from_dict(r) for layer, r in results.items()}


def _gather(futures, order: list[int], index: int, started: float) -> dict[int, dict[str, Any]]:
    """The candidates' results by layer as they finish, with a progress line every quarter of the round."""
    from prefect.futures import as_completed

    logger = get_run_logger()
    layer_of = {id(future): layer for layer, future in zip(order, futures)}
    results: dict[int, dict[str, Any]] = {}
    every = max(1, len(order) // 4)
    for future in as_completed(futures):
        results[layer_of[id(future)]] = future.result()
        done = len(results)
        if done % every == 0 and done < len(order):
            logger.info("greedy round %d: %d/%d candidates scored, round ETA %s", index, done, len(order),
                        eta_text(time.perf_counter() - started, done, len(order)))
    return results


class RoundRecorder:
    """`on_round` of `greedy_replace`: each finished round to `greedy/round_NN.json`, MLflow (parent metric
    `round_best_score`, step = round) and a Prefect table artifact. `prefix` names another search's rounds
    (the continued search after healing: `continued_round_best_score`, its own table)."""

    def __init__(self, layout: RunLayout, p_min: float, tracking: Tracking | None, prefix: str = "",
                 table_name: str | None = None):
        self.layout, self.p_min, self.tracking, self.prefix = layout, p_min, tracking, prefix
        self.rounds: list[dict[str, Any]] = []
        lead = f"{slug(prefix)}-" if prefix else ""
        self.table_key = f"{lead}greedy-rounds-{slug(table_name or layout.root.name, 40)}"
        self.table_id = None  # the table artifact: created by the first round, updated in place by the next

    def __call__(self, record: RoundRecord) -> None:
        write_json(self.layout.round(record.index), record.to_dict())
        self.rounds.append(record.to_dict())
        get_run_logger().info("%sgreedy round %d: best layer %d scores %.4f (P_min %.4f) -> %s%s",
                              self.prefix.replace("_", " "), record.index, record.chosen, record.score, self.p_min,
                              "commit" if record.accepted else "stop", ", new best" if record.new_best else "")
        if self.tracking is not None:
            self.tracking.log_metrics({f"{self.prefix}round_best_score": record.score,
                                       f"{self.prefix}round_best_layer": record.chosen,
                                       f"{self.prefix}round_accepted": float(record.accepted)}, step=record.index)
        self.table_id = publish_table(round_rows(self.rounds, self.p_min), self.table_key,
                                      f"{self.prefix.replace('_', ' ')}greedy rounds of {self.layout.root.name} "
                                      f"(P_min {self.p_min:.4f})", self.table_id)


def load_trajectory(run_dir: str | Path) -> dict[str, Any]:
    return read_json(RunLayout(run_dir).trajectory)
