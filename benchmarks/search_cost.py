"""Cost of the greedy search (DtR phase 2): the fast evaluator against the paper's plain one, same answer.

The same greedy rounds (each commits its best candidate) run with `plain` (a full forward per candidate), `fast`
(prefix reuse + exact early rejection + ordering) and, with `--ablation`, `reuse only`; all must choose the same
layers with the same scores. Reading the numbers: docs/BENCHMARKS_SEARCH.md.
"""

from __future__ import annotations

import dataclasses
import sys

from benchmarks import harness
from benchmarks.harness import option
from dtr_core.search.acceptance import Tolerance
from dtr_core.search.greedy_search import FastEvaluator, PlainEvaluator, encode_split, run_greedy_search

FORCED = Tolerance("absolute", 0.0)  # every score is >= 0: each round commits its best candidate


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = option("smollm2-135m", "model source (built-in name or folder)")
    task: str = option("sentiment", "task name or spec file")
    limit: int = option(64, "validation examples", minimum=1)
    rounds: int = option(2, "greedy rounds", minimum=1)
    batch_size: int = option(8, "rows per batch", minimum=1)
    mixer: str = option("gated_deltanet", "student type for fresh students")
    students: str | None = option(None, "a distilled students folder (runs/<id>/students); default: fresh ones")
    ablation: bool = option(False, "also run prefix reuse without early rejection")


def check(s: Settings, preset: str | None) -> Settings:
    harness.check_mixer(s.mixer)
    harness.check_students(s.students)
    return s


def _students(model, mixer: str, students_dir: str | None) -> tuple[dict, dict | None]:
    """Students by layer, and an ordering hint for round 0 (negated normalised distillation loss) if known."""
    from dtr_core.distill.training import load_students, read_layer_results
    from dtr_core.mixers import build_student
    from dtr_core.hybrid.surgery import attention_module, num_layers

    if students_dir is None:
        return {layer: build_student(mixer, model.config, layer, teacher_attention=attention_module(model, layer))
                .eval() for layer in range(num_layers(model))}, None
    students, results = load_students(students_dir, model), read_layer_results(students_dir)
    hint = {layer: -float(results[layer].normalized_loss) for layer in students
            if getattr(results[layer], "normalized_loss", None) is not None}
    return students, hint or None


def _same_answer(fast, plain) -> None:
    if fast.trajectory != plain.trajectory or fast.best_layers != plain.best_layers:
        raise AssertionError(f"fast search chose {fast.trajectory}, plain chose {plain.trajectory}")
    for fast_round, plain_round in zip(fast.rounds, plain.rounds):
        for layer, cand in fast_round.candidates.items():
            if cand.score is not None and cand.score != plain_round.candidates[layer].score:
                raise AssertionError(f"round {fast_round.index} layer {layer}: {cand.score} != "
                                     f"{plain_round.candidates[layer].score}")


def measure(s: Settings) -> dict:
    from dtr_core.evaluation import get_task
    from dtr_core.models import load_model

    model, tokenizer = load_model(s.model)
    task = get_task(s.task)
    batches = encode_split(task, tokenizer, "validation", limit=s.limit, batch_size=s.batch_size)
    students, first_hint = _students(model, s.mixer, s.students)
    teacher = PlainEvaluator(model, task, batches, students).evaluate_layers(())
    variants = {"plain": dict(fast=False), "fast": dict(fast=True, first_hint=first_hint)}
    if s.ablation:
        variants["reuse only"] = dict(fast=True, early_rejection=False)
    runs, results = {}, {}
    for name, options in variants.items():  # one after another: a search is minutes, not a tight call
        holder = {}

        def search(options=options, holder=holder):
            holder["out"] = run_greedy_search(model, task, batches, students, FORCED, max_layers=s.rounds,
                                              teacher=teacher, **options)

        sample = harness.timed(search)
        results[name], _, cost = holder["out"]
        runs[name] = (cost, sample)
        if name != "plain":
            _same_answer(results[name], results["plain"])
    plain_cost, plain_time = runs["plain"]

    def row(name, cost, sample):
        return {"evaluator": name, **{key: getattr(cost, key) for key in (
            "layer_forwards", "layer_tokens", "candidate_evaluations", "completed_evaluations", "rejected_early",
            "batch_evaluations", "trace_passes", "cache_bytes")},
            "wall_s": round(sample.wall_s, 2), "cpu_s": round(sample.cpu_s, 2),
            "layer_forward_ratio": round(plain_cost.layer_forwards / cost.layer_forwards, 3),
            "layer_token_ratio": round(plain_cost.layer_tokens / cost.layer_tokens, 3),
            "wall_ratio": round(plain_time.wall_s / sample.wall_s, 3),
            "cpu_ratio": round(plain_time.cpu_s / sample.cpu_s, 3)}

    return {
        "config": {"model": s.model, "task": s.task, "split": "validation", "limit": s.limit,
                   "examples": sum(b.num_examples for b in batches), "batches": len(batches),
                   "batch_size": s.batch_size, "rounds": s.rounds,
                   "mixer": s.mixer if s.students is None else "from students dir", "students": s.students or "fresh",
                   "num_layers": model.config.num_hidden_layers, "candidate_layers": len(students),
                   "kept_layers": len(FastEvaluator(model, task, batches, students).kept_layers)},
        "teacher_score": teacher.score,
        "trajectory": [{"layer": layer, "score": score} for layer, score, _ in results["plain"].trajectory],
        "same_answer": True,
        "rows": [row(name, *values) for name, values in runs.items()],
    }


def markdown(result: dict) -> str:
    c = result["config"]
    headers = ["evaluator", "layer-forwards", "layer-tokens (M)", "candidates started", "completed",
               "rejected early", "wall", "CPU", "layer-forward ratio", "layer-token ratio", "wall ratio", "CPU ratio"]
    rows = [[r["evaluator"], r["layer_forwards"], f"{r['layer_tokens'] / 1e6:.2f}", r["candidate_evaluations"],
             r["completed_evaluations"], r["rejected_early"], f"{r['wall_s']:.1f} s", f"{r['cpu_s']:.1f} s"]
            + [f"{r[key]:.2f}x" for key in ("layer_forward_ratio", "layer_token_ratio", "wall_ratio", "cpu_ratio")]
            for r in result["rows"]]
    chosen = ", ".join(f"{t['layer']} ({t['score']:.4f})" for t in result["trajectory"])
    return harness.report("Cost of the greedy search: fast vs paper-style evaluator", result, "\n".join([
        f"Greedy search cost: {c['model']} ({c['num_layers']} layers, {c['candidate_layers']} candidates), task "
        f"`{c['task']}` validation, {c['examples']} examples in {c['batches']} batches, {c['rounds']} round(s), "
        f"students: {c['students']} ({c['mixer']}).", "", harness.markdown_table(headers, rows), "",
        f"Teacher validation score {result['teacher_score']:.4f}; chosen layer (score) per round, identical for "
        f"every evaluator: {chosen}."]))


BENCH = harness.Benchmark("search", Settings, measure, markdown, check=check, publishes=False,
                          presets={"quick": {"limit": 16, "rounds": 1, "batch_size": 4}})
main = BENCH.main

if __name__ == "__main__":
    sys.exit(main())
