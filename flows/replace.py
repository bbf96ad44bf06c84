"""Sub-flow `replace`: phase 2 of DtR on distilled students — greedy layer replacement where every candidate
of a round is its own task.

The decisions (argmax with ties to the lowest layer, best/opt bookkeeping, point or bootstrap acceptance,
caps) are `dtr_core.search.decisions.greedy_replace`'s; this flow only supplies `score_candidates`, which submits one
`score_candidate_task` per candidate layer, ordered by last round's scores (round 0: by distillation loss)
so strong candidates run first and raise the bar for exact early rejection. Each finished round is written
to `greedy/round_NN.json`, logged to MLflow (parent metric `round_best_score`, step = round) and shown in a
Prefect table artifact; each candidate's result file makes a killed run resume inside a round.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from dtr_core.artifacts import hash_json, read_json, write_json
from dtr_core.run_layout import RunLayout, slug
from dtr_core.distill.training import read_layer_results
from dtr_core.search.decisions import CandidateScore, RoundRecord, greedy_replace
from flows.distill import eta_text
from flows.params import AcceptanceParams, MixerName, RunnerParams, TaskParams, ToleranceParams
from flows.runners import parallel_threads
from tasks.candidates import score_candidate_task
from tasks.evaluate import evaluate_task
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


@flow(name="replace", task_runner=ThreadPoolTaskRunner(max_workers=2),
      description="DtR phase 2: greedy layer replacement on distilled students (one task per candidate)")
def replace(
    model: str = "smollm2-135m",
    task: TaskParams = TaskParams(),
    mixer: MixerName = "gated_deltanet",
    run_dir: str = "runs/distill",
    tolerance: ToleranceParams = ToleranceParams(),
    acceptance: AcceptanceParams = AcceptanceParams(),
    max_layers: int | None = None,
    seed: int = 0,
    runner: RunnerParams = RunnerParams(),
    tracking: Tracking | None = None,
) -> dict[str, Any]:
    """Returns `GreedyResult.to_dict()`; also written to `greedy/trajectory.json`."""
    logger = get_run_logger()
    layout = RunLayout(run_dir)
    manifest = read_json(layout.activations / "manifest.json")
    num_layers = int(manifest["num_model_layers"])
    layer_results = read_layer_results(layout.students)
    available = sorted(layer for layer, result in layer_results.items() if result.ok)
    if not available:
        raise ValueError(f"no successfully distilled student in {layout.students}; run the distill flow first")
    run_key = hash_json({"model": model, "task": task.model_dump(mode="json"), "mixer": mixer,
                         "students": {str(k): v.key for k, v in sorted(layer_results.items())}})

    # P_base: the teacher on the validation split (per-example values: bootstrap acceptance)
    teacher = evaluate_task(model, task, {"validation": task.validation_limit, "test": task.test_limit}, "teacher",
                            str(layout.reports / "eval_teacher.json"), serial_threads(), per_example=True)["validation"]
    tolerance_obj, acceptance_obj = tolerance.build(), acceptance.build(seed)
    p_min = tolerance_obj.threshold(teacher["score"])
    logger.info("phase 2: teacher validation %s %.4f, P_min %.4f, %d candidate layers", teacher["metric"],
                teacher["score"], p_min, len(available))
    first_hint = {layer: -(layer_results[layer].normalized_loss or math.inf) for layer in available}
    threads = parallel_threads(runner)
    table_key = f"greedy-rounds-{slug(layout.root.name, 40)}"
    rounds: list[dict[str, Any]] = []

    def score_candidates(committed: tuple[int, ...], candidates: list[int], order_hint=None) -> dict[int, CandidateScore]:
        hint = order_hint or first_hint
        order = sorted(candidates, key=lambda layer: (-hint.get(layer, -math.inf), layer))
        index = len(committed)  # every finished round commits exactly one layer, or ends the search
        started = time.perf_counter()
        logger.info("greedy round %d: scoring %d candidates (linear so far: %s)", index, len(order),
                    list(committed) or "none")
        futures = [score_candidate_task.submit(model, task, str(layout.students), mixer, tuple(committed), layer,
                                               index, task.validation_limit, str(layout.candidate(index, layer)),
                                               run_key, tracking, threads) for layer in order]
        from prefect.futures import as_completed

        layer_of = {id(future): layer for layer, future in zip(order, futures)}
        results: dict[int, dict[str, Any]] = {}
        every = max(1, len(order) // 4)
        for future in as_completed(futures):
            results[layer_of[id(future)]] = future.result()
            done = len(results)
            if done % every == 0 and done < len(order):
                elapsed = time.perf_counter() - started
                logger.info("greedy round %d: %d/%d candidates scored, round ETA %s", index, done, len(order),
                            eta_text(elapsed, done, len(order)))
        logger.info("greedy round %d: %d scored, %d rejected early in %.0fs", index,
                    sum(r["score"] is not None for r in results.values()),
                    sum(r["rejected_early"] for r in results.values()), time.perf_counter() - started)
        return {layer: CandidateScore.from_dict(r) for layer, r in results.items()}

    def on_round(record: RoundRecord) -> None:
        write_json(layout.round(record.index), record.to_dict())
        rounds.append(record.to_dict())
        logger.info("greedy round %d: best layer %d scores %.4f (P_min %.4f) -> %s%s", record.index, record.chosen,
                    record.score, p_min, "commit" if record.accepted else "stop", ", new best" if record.new_best else "")
        if tracking is not None:
            tracking.log_metrics({"round_best_score": record.score, "round_best_layer": record.chosen,
                                  "round_accepted": float(record.accepted)}, step=record.index)
        create_table_artifact(round_rows(rounds, p_min), key=table_key,
                              description=f"greedy rounds of {layout.root.name} (P_min {p_min:.4f})")

    result = greedy_replace(
        score_candidates, num_layers, available, teacher["score"], tolerance_obj, acceptance_obj,
        teacher_per_example=teacher["per_example"], max_layers=max_layers, on_round=on_round)
    trajectory = {**result.to_dict(), "metric": teacher["metric"], "validation_limit": task.validation_limit}
    write_json(layout.trajectory, trajectory)
    logger.info("phase 2 done (%s): M_best %s (%.4f), M_opt %s (%.4f)", result.stop_reason,
                list(result.best_layers), result.best_score, list(result.opt_layers), result.opt_score)
    return trajectory


def load_trajectory(run_dir: str | Path) -> dict[str, Any]:
    return read_json(RunLayout(run_dir).trajectory)
