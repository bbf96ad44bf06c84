"""Cost of the greedy search (DtR phase 2): the fast evaluator against the paper's plain one, same answer.

Runs the same greedy rounds twice on one model, task and set of students:
- `plain` (`search.PlainEvaluator`): every candidate is a full forward over the validation batches;
- `fast` (`search.FastEvaluator`): prefix reuse of the hidden states + exact early rejection + ordering;
- with `--ablation`, also `reuse only` (prefix reuse, no early rejection) to split the gain.
Reports layer-forwards (one decoder layer on one batch), candidate evaluations (started / completed /
rejected early), wall and process-CPU seconds, and the plain/fast ratios; asserts that both chose the same
layers with the same scores (and the same score for every candidate both evaluated fully).

So that exactly `--rounds` rounds run, the search is forced to commit each round's best candidate
(tolerance `absolute 0`, `max_layers = rounds`): the cost of a round does not depend on the decision.
Students are freshly initialised from the teacher (q/k/v/o copied; no distillation) unless `--students`
names a distilled students folder. Both evaluators score exactly like `evaluate` (same batches).

    python -m benchmarks.search_cost [--quick] [--json] [--model smollm2-135m] [--task sentiment]
                                     [--limit N] [--rounds R] [--batch-size B] [--students DIR]
    dtr bench search [--quick] [--json] ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import torch

from benchmarks.common import command_lines, environment_markdown, machine_info, markdown_table
from dtr_core.acceptance import Tolerance
from dtr_core.search import FastEvaluator, PlainEvaluator, encode_split, run_greedy_search

QUICK = dict(limit=16, rounds=1, batch_size=4)
FULL = dict(limit=64, rounds=2, batch_size=8)
FORCED = Tolerance("absolute", 0.0)  # every score is >= 0: each round commits its best candidate


def _students(model, mixer: str, students_dir: str | None) -> tuple[dict, dict | None]:
    """Students by layer, and an ordering hint for round 0 (negated normalised distillation loss) if known."""
    from dtr_core.mixers import build_student
    from dtr_core.surgery import attention_module, num_layers

    if students_dir is None:
        students = {
            layer: build_student(mixer, model.config, layer, teacher_attention=attention_module(model, layer)).eval()
            for layer in range(num_layers(model))
        }
        return students, None
    from dtr_core.distill import load_students, read_layer_results

    students = load_students(students_dir, model)
    results = read_layer_results(students_dir)
    hint = {
        layer: -float(results[layer].normalized_loss)
        for layer in students
        if getattr(results[layer], "normalized_loss", None) is not None
    }
    return students, hint or None


def _timed_search(model, task, batches, students, teacher, rounds, fast, **options):
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result, _, cost = run_greedy_search(
        model, task, batches, students, FORCED, fast=fast, max_layers=rounds, teacher=teacher, **options
    )
    return result, cost, time.perf_counter() - wall0, time.process_time() - cpu0


def _same_answer(fast, plain) -> None:
    if fast.trajectory != plain.trajectory or fast.best_layers != plain.best_layers:
        raise AssertionError(f"fast search chose {fast.trajectory}, plain chose {plain.trajectory}")
    for fast_round, plain_round in zip(fast.rounds, plain.rounds):
        for layer, cand in fast_round.candidates.items():
            if cand.score is not None and cand.score != plain_round.candidates[layer].score:
                raise AssertionError(f"round {fast_round.index} layer {layer}: {cand.score} != "
                                     f"{plain_round.candidates[layer].score}")  # fmt: skip


def run(model_name: str, task_name: str, limit: int, rounds: int, batch_size: int, mixer: str = "gated_deltanet",
        students_dir: str | None = None, ablation: bool = False) -> dict:  # fmt: skip
    from dtr_core.evaluation import get_task
    from dtr_core.models import load_model

    model, tokenizer = load_model(model_name)
    task = get_task(task_name)
    batches = encode_split(task, tokenizer, "validation", limit=limit, batch_size=batch_size)
    students, first_hint = _students(model, mixer, students_dir)
    teacher = PlainEvaluator(model, task, batches, students).evaluate_layers(())

    runs = {}
    plain, plain_cost, plain_wall, plain_cpu = _timed_search(model, task, batches, students, teacher, rounds, False)
    runs["plain"] = (plain_cost, plain_wall, plain_cpu)
    fast, fast_cost, fast_wall, fast_cpu = _timed_search(
        model, task, batches, students, teacher, rounds, True, first_hint=first_hint
    )
    _same_answer(fast, plain)
    runs["fast"] = (fast_cost, fast_wall, fast_cpu)
    if ablation:
        reuse, reuse_cost, reuse_wall, reuse_cpu = _timed_search(
            model, task, batches, students, teacher, rounds, True, early_rejection=False
        )
        _same_answer(reuse, plain)
        runs["reuse only"] = (reuse_cost, reuse_wall, reuse_cpu)

    def row(name, cost, wall, cpu):
        return {
            "evaluator": name,
            "layer_forwards": cost.layer_forwards,
            "layer_tokens": cost.layer_tokens,
            "candidate_evaluations": cost.candidate_evaluations,
            "completed_evaluations": cost.completed_evaluations,
            "rejected_early": cost.rejected_early,
            "batch_evaluations": cost.batch_evaluations,
            "trace_passes": cost.trace_passes,
            "cache_bytes": cost.cache_bytes,
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "layer_forward_ratio": round(plain_cost.layer_forwards / cost.layer_forwards, 3),
            "layer_token_ratio": round(plain_cost.layer_tokens / cost.layer_tokens, 3),
            "wall_ratio": round(plain_wall / wall, 3),
            "cpu_ratio": round(plain_cpu / cpu, 3),
        }

    return {
        "config": {
            "model": model_name, "task": task_name, "split": "validation", "limit": limit, "examples":
            sum(b.num_examples for b in batches), "batches": len(batches), "batch_size": batch_size, "rounds": rounds,
            "mixer": mixer if students_dir is None else "from students dir", "students": students_dir or "fresh",
            "num_layers": model.config.num_hidden_layers, "candidate_layers": len(students),
            "kept_layers": len(FastEvaluator(model, task, batches, students).kept_layers),
        },  # fmt: skip
        "teacher_score": teacher.score,
        "trajectory": [{"layer": layer, "score": score} for layer, score, _ in plain.trajectory],
        "same_answer": True,
        "rows": [row(name, *values) for name, values in runs.items()],
    }


def markdown(result: dict, commands: dict, info: dict) -> str:
    config = result["config"]
    headers = ["evaluator", "layer-forwards", "layer-tokens (M)", "candidates started", "completed",
               "rejected early", "wall", "CPU", "layer-forward ratio", "layer-token ratio", "wall ratio",
               "CPU ratio"]  # fmt: skip
    rows = [
        [r["evaluator"], r["layer_forwards"], f"{r['layer_tokens'] / 1e6:.2f}", r["candidate_evaluations"],
         r["completed_evaluations"], r["rejected_early"], f"{r['wall_s']:.1f} s", f"{r['cpu_s']:.1f} s",
         f"{r['layer_forward_ratio']:.2f}x", f"{r['layer_token_ratio']:.2f}x", f"{r['wall_ratio']:.2f}x",
         f"{r['cpu_ratio']:.2f}x"]
        for r in result["rows"]
    ]  # fmt: skip
    chosen = ", ".join(f"{t['layer']} ({t['score']:.4f})" for t in result["trajectory"])
    lines = [
        f"Greedy search cost: {config['model']} ({config['num_layers']} layers, {config['candidate_layers']} "
        f"candidates), task `{config['task']}` validation, {config['examples']} examples in {config['batches']} "
        f"batches, {config['rounds']} round(s), students: {config['students']} ({config['mixer']}).",
        "",
        markdown_table(headers, rows),
        "",
        f"Teacher validation score {result['teacher_score']:.4f}; chosen layer (score) per round, identical for "
        f"both: {chosen}. Ratios are plain / this row. A layer-forward is one decoder layer on one batch; "
        f"layer-tokens weight it by the batch's padded R x T. CPU is process time (all threads).",
        "",
        environment_markdown(info, commands),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="benchmarks.search_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK} (< 2 min)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    parser.add_argument("--model", default="smollm2-135m", help="model source (built-in name or folder)")
    parser.add_argument("--task", default="sentiment", help="task name or spec file")
    parser.add_argument("--limit", type=int, default=None, help=f"validation examples (default {FULL['limit']})")
    parser.add_argument("--rounds", type=int, default=None, help=f"greedy rounds (default {FULL['rounds']})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"rows per batch (default {FULL['batch_size']})")
    parser.add_argument("--mixer", default="gated_deltanet", help="student type for fresh students")
    parser.add_argument("--students", default=None, help="a distilled students folder (runs/<id>/students)")
    parser.add_argument("--ablation", action="store_true", help="also run prefix reuse without early rejection")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for key in ("limit", "rounds", "batch_size"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if min(settings.values()) < 1:
        parser.error("--limit, --rounds and --batch-size must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    info = machine_info()
    result = run(args.model, args.task, settings["limit"], settings["rounds"], settings["batch_size"], args.mixer,
                 args.students, args.ablation)  # fmt: skip
    commands = command_lines("benchmarks.search_cost", "search", argv)
    result["machine"], result["command"] = info, commands
    print(json.dumps(result, indent=2) if args.json else markdown(result, commands, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
