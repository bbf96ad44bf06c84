"""Quality of layer placements: greedy DtR against the paper's placement baselines, on test.

Per task, with one set of distilled students: the test score of the hybrid with k linear layers for `greedy`
(DtR's search on validation, forced on past its threshold), `uniform`, `random`, `local importance` and
`distill loss`, until each collapses to the majority-class rate; and M_opt's validation-to-test gap under the
paper's 5% rule with `point` and `bootstrap` acceptance. Finished work is cached beside the students (a killed
or extended run resumes). Method and reading: docs/BENCHMARKS_PLACEMENTS.md.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.harness import int_list, name_list, option
from benchmarks.students import DISTILL, QUICK_DISTILL, WORK_DIR, ensure_students

logger = logging.getLogger("benchmarks.placements")

STRATEGIES = ("greedy", "uniform", "random", "local importance", "distill loss")
TOLERANCE = 0.05  # the paper's 5% relative rule


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = option("smollm2-135m", "teacher: a dtr_core.models.load_model source")
    mixer: str = option("gated_deltanet", "student type when distilling here")
    tasks: tuple[str, ...] = option(("sentiment", "trec"), "comma-separated tasks", name_list)
    ks: tuple[int, ...] = option(tuple(range(1, 13)), "numbers of linear layers, e.g. 1-12 or 1,2,4,8", int_list,
                                 minimum=1)
    val_limit: int | None = option(None, "validation examples (None: the split)", int, minimum=1)
    test_limit: int | None = option(None, "test examples (None: the split)", int, minimum=1)
    seeds: tuple[int, ...] = option((0, 1, 2), "random-placement seeds", int_list)
    students: str | None = option(None, "students folder of a run (runs/<id>/students); default: distil here")
    work_dir: str = option(WORK_DIR, "where students distilled here live (reused)")
    offered: int | None = option(None, "offer only this many evenly spread layers (None: all)", int, minimum=1)
    distill_tokens: int = option(DISTILL["distill_tokens"], "teacher tokens for students distilled here", minimum=1)
    distill_seq_len: int = option(DISTILL["distill_seq_len"], "tokens per training sequence", minimum=1)
    distill_steps: int = option(DISTILL["distill_steps"], "steps per layer", minimum=1)
    batch_size: int = option(16, "evaluation batch size", minimum=1)


def check(s: Settings, preset: str | None) -> Settings:
    if not s.tasks:
        raise ValueError("--tasks names no task")
    harness.check_students(s.students)
    return dataclasses.replace(s, ks=tuple(sorted(set(s.ks))))


QUICK = dict(tasks=("sentiment",), ks=(1, 2, 3), val_limit=24, test_limit=24, offered=6, **QUICK_DISTILL)


def offered_layers(num_layers: int, offered: int | None) -> list[int]:
    from dtr_core.search.baselines import uniform_layers

    if offered is None or offered >= num_layers:
        return list(range(num_layers))
    return list(uniform_layers(num_layers, offered))


# --- one task ------------------------------------------------------------------------------------


def majority_rate(task, split: str, limit: int | None) -> float | None:
    """Share of the most common label in the first `limit` examples of `split` (None for LM tasks)."""
    if task.kind != "classification":
        return None
    labels = [e.label for e in task.split(split)[:limit]]
    return max(labels.count(label) for label in set(labels)) / len(labels)


def _no_more_rounds(committed, candidates, hint):
    raise RuntimeError("replay needed a round the forced search did not run")  # max_layers prevents it


def result_store(students_dir: str | os.PathLike, task: str, student_keys: Mapping,
                 batches: Sequence) -> harness.ResultStore:
    """Finished work of one task, keyed by everything that decides the numbers: the encoded prompts (task,
    tokenizer, limits, batching) and the students' content keys (teacher weights, distillation budget)."""
    from dtr_core.artifacts import hash_json, hash_tensor

    key = hash_json({"format": 1, "task": task, "inputs": [hash_tensor(batch.input_ids) for batch in batches],
                     "students": {str(layer): student_keys[layer] for layer in sorted(student_keys)}})
    return harness.ResultStore(Path(students_dir).parent / "placements" / f"{task}-{key[:16]}",
                               kinds=("validation", "rounds", "test"))


class TestScores:
    """Test scores of layer sets, each evaluated once (several strategies often pick the same set)."""

    def __init__(self, evaluator, store: harness.ResultStore):
        self.evaluator, self.store, self.memo, self.seconds = evaluator, store, {}, 0.0

    def __call__(self, layers: Sequence[int]) -> dict:
        key = tuple(sorted(layers))
        if key not in self.memo:
            name = "test/" + ("teacher" if not key else "-".join(map(str, key))) + ".json"
            self.memo[key] = self.store.get(name, lambda: self._evaluate(key), "test")
            logger.info("  test %s: %.4f", list(key), self.memo[key]["score"])
        return self.memo[key]

    def _evaluate(self, key: tuple[int, ...]) -> dict:
        started = time.perf_counter()
        result = self.evaluator.evaluate_layers(key)
        self.seconds += time.perf_counter() - started
        return {"layers": list(key), "score": result.score, "n": result.n}


def run_task(model, tokenizer, task_name: str, students: Mapping[int, torch.nn.Module],
             losses: Mapping[int, float], settings: Settings, students_dir: str, student_keys: Mapping) -> dict:
    """Search, baselines and test scores for one task (see the module docstring)."""
    from dtr_core.evaluation import get_task
    from dtr_core.hybrid.surgery import num_layers
    from dtr_core.search.acceptance import Tolerance
    from dtr_core.search.greedy_search import FastEvaluator, PlainEvaluator, encode_split

    started = time.perf_counter()
    task, L, available = get_task(task_name), num_layers(model), sorted(students)
    ks = [k for k in settings.ks if k <= len(available)]
    val_batches = encode_split(task, tokenizer, "validation", settings.val_limit, settings.batch_size)
    test_batches = encode_split(task, tokenizer, "test", settings.test_limit, settings.batch_size)
    store = result_store(students_dir, task_name, student_keys, val_batches + test_batches)
    test_scores = TestScores(PlainEvaluator(model, task, test_batches, students, split="test"), store)
    logger.info("%s: teacher on validation and test (finished work reused from %s)", task_name, store.dir)

    def teacher_validation() -> dict:
        result = PlainEvaluator(model, task, val_batches, students).evaluate_layers(())
        return {"score": result.score, "n": result.n, "per_example": list(result.per_example)}

    teacher_val = store.get("teacher_validation.json", teacher_validation, "validation")
    teacher_test = test_scores(())
    tolerance = Tolerance("relative", TOLERANCE)
    chance = majority_rate(task, "test", settings.test_limit)

    # 1. single-swap scores of every offered layer, exact (local importance; also the search's round 0)
    search_started = time.perf_counter()
    logger.info("%s: single-swap validation scores of %d layers", task_name, len(available))
    exact = FastEvaluator(model, task, val_batches, students, early_rejection=False)
    single = _single_swaps(exact, available, store)
    fast = FastEvaluator(model, task, val_batches, students, first_hint={l: -v for l, v in losses.items()})
    # 2. the greedy trajectory, forced on for up to max(ks) rounds
    chance_val = majority_rate(task, "validation", settings.val_limit)
    forced = _forced_search(task_name, L, available, single, fast, store, teacher_val, chance_val, max(ks))
    search_seconds = time.perf_counter() - search_started
    # 3. the same rounds replayed under the paper's 5% rule, point and bootstrap acceptance
    acceptance = {mode: _acceptance_replay(mode, forced, L, available, teacher_val, teacher_test, tolerance,
                                           test_scores) for mode in ("point", "bootstrap")}
    # 4. layer sets of every strategy, test scores until each collapses
    points, curves, collapsed = _strategy_curves(forced, single, losses, L, available, ks, settings.seeds, chance,
                                                 test_scores)
    return {
        "task": task_name, "metric": task.metric, "num_layers": L, "available_layers": available, "ks": ks,
        "teacher": {"validation": teacher_val["score"], "test": teacher_test["score"],
                    "n_validation": teacher_val["n"], "n_test": teacher_test["n"]},
        "chance": chance, "chance_validation": chance_val, "tolerance": TOLERANCE,
        "search_stop": forced.stop_reason,
        "p_min": tolerance.threshold(teacher_val["score"]),
        "test_threshold": tolerance.threshold(teacher_test["score"]),
        "single_swap": {str(l): s.score for l, s in sorted(single.items())},
        "greedy_trajectory": [{"k": r.index + 1, "layer": r.chosen, "validation": r.score} for r in forced.rounds],
        "search_cost": {"round0_exact": exact.cost.to_dict(), "later_rounds_fast": fast.cost.to_dict(),
                        "seconds_total": search_seconds},
        "acceptance": acceptance, "points": points, "curves": curves, "collapsed": collapsed,
        "test_evaluations": len(test_scores.memo), "test_seconds": test_scores.seconds,
        "cache": {"dir": str(store.dir), "reused": dict(store.reused)},
        "seconds": time.perf_counter() - started,
    }


def _single_swaps(exact, available: list[int], store: harness.ResultStore) -> dict:
    """Validation score of every offered layer swapped alone (stored, or computed with `exact`)."""
    from dtr_core.search.decisions import CandidateScore

    stored = store.load("single_swap.json")
    if stored is not None and sorted(map(int, stored)) == available:
        store.reused["validation"] += 1
    else:
        stored = {str(layer): value.to_dict() for layer, value in exact((), available).items()}
        store.save("single_swap.json", stored)
    return {int(layer): CandidateScore.from_dict(value) for layer, value in stored.items()}


def _forced_search(task_name: str, L: int, available: list[int], single: Mapping, fast, store: harness.ResultStore,
                   teacher_val: dict, chance_val: float | None, rounds: int):
    """The greedy trajectory for up to `rounds` rounds: a round is committed unless its best candidate has
    collapsed to the majority-class rate on validation (then later rounds would measure noise)."""
    from dtr_core.search.acceptance import Tolerance
    from dtr_core.search.decisions import RoundRecord, greedy_replace

    def score_candidates(committed, candidates, hint):
        if not committed:
            return {layer: single[layer] for layer in candidates}
        logger.info("%s: greedy round %d (%d candidates)", task_name, len(committed), len(candidates))
        return fast(committed, candidates, hint)

    floor = Tolerance("absolute", 0.0 if chance_val is None else chance_val + 1e-9)
    persisted = []
    while (data := store.load(f"round_{len(persisted):02d}.json")) is not None:
        persisted.append(RoundRecord.from_dict(data))
    store.reused["rounds"] = len(persisted)
    return greedy_replace(score_candidates, L, available, teacher_val["score"], floor,
                          teacher_per_example=tuple(teacher_val["per_example"]), max_layers=rounds,
                          completed_rounds=persisted[:rounds],
                          on_round=lambda record: store.save(f"round_{record.index:02d}.json", record.to_dict()))


def _acceptance_replay(mode: str, forced, L: int, available: list[int], teacher_val: dict, teacher_test: dict,
                       tolerance, test_scores: TestScores) -> dict:
    """M_opt under `tolerance` with `mode` acceptance, replayed from the forced rounds, and its test score."""
    from dtr_core.search.acceptance import Acceptance
    from dtr_core.search.decisions import greedy_replace

    decisions_log = logging.getLogger("dtr_core.search.decisions")
    level = decisions_log.level
    decisions_log.setLevel(logging.ERROR)  # a replay re-logs every round and warns about the unused ones
    try:
        replay = greedy_replace(_no_more_rounds, L, available, teacher_val["score"], tolerance, Acceptance(mode),
                                teacher_per_example=tuple(teacher_val["per_example"]),
                                max_layers=len(forced.rounds), completed_rounds=forced.rounds)
    except ValueError as error:  # bootstrap needs a mean-of-examples metric
        return {"error": str(error)}
    except RuntimeError:  # accepted past the point where the forced search stopped (collapsed)
        return {"error": "the search collapsed before this rule stopped"}
    finally:
        decisions_log.setLevel(level)
    opt_test, threshold = test_scores(replay.opt_layers)["score"], tolerance.threshold(teacher_test["score"])
    last = replay.rounds[len(replay.opt_layers) - 1] if replay.opt_layers else None
    next_round = replay.rounds[-1] if replay.rounds else None
    return {
        "opt_layers": list(replay.opt_layers), "k": len(replay.opt_layers), "stop_reason": replay.stop_reason,
        "validation": replay.opt_score, "p_min": replay.p_min, "lcb": None if last is None else last.lcb,
        "refused": None if replay.stop_reason != "rejected" else {
            "layer": next_round.chosen, "validation": next_round.score, "lcb": next_round.lcb},
        "test": opt_test, "test_threshold": threshold, "test_margin": opt_test - threshold,
        "test_drop": _drop(opt_test, teacher_test["score"]),
        "validation_drop": _drop(replay.opt_score, teacher_val["score"]),
    }


def _strategy_curves(forced, single: Mapping, losses: Mapping[int, float], L: int, available: list[int],
                     ks: list[int], seeds: Sequence[int], chance: float | None,
                     test_scores: TestScores) -> tuple[list, dict, dict]:
    """(points, curves, collapsed): test scores of every strategy's layer sets for each k until it collapses."""
    from dtr_core.search.baselines import distill_loss_layers, local_importance_layers, random_layers, uniform_layers

    greedy_order = [r.chosen for r in forced.rounds]  # the committed layers, then the round that collapsed
    plans = {
        "greedy": lambda k, seed: tuple(sorted(greedy_order[:k])) if k <= len(greedy_order) else None,
        "uniform": lambda k, seed: uniform_layers(L, k, available),
        "random": lambda k, seed: random_layers(L, k, seed, available),
        "local importance": lambda k, seed: local_importance_layers({l: s.score for l, s in single.items()}, k, L),
        "distill loss": lambda k, seed: distill_loss_layers({l: losses[l] for l in available}, k, L),
    }
    points, curves, collapsed = [], {}, {}
    for strategy in STRATEGIES:
        curves[strategy] = []
        for k in ks:
            values = []
            for seed in seeds if strategy == "random" else (None,):
                if (layers := plans[strategy](k, seed)) is not None:
                    values.append(test_scores(layers)["score"])
                    points.append({"strategy": strategy, "k": k, "seed": seed, "layers": list(layers),
                                   "test": values[-1]})
            if not values:
                break
            curves[strategy].append(_summary(k, values))
            if chance is not None and statistics.fmean(values) <= chance:
                collapsed[strategy] = k
                break
    return points, curves, collapsed


def _drop(score: float, reference: float) -> float | None:
    """Relative drop below `reference` (0.05 = 5% below; negative = above)."""
    return (reference - score) / abs(reference) if reference else None


def _summary(k: int, values: Sequence[float]) -> dict:
    return {"k": k, "n": len(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


# --- whole run -----------------------------------------------------------------------------------


def measure(s: Settings) -> dict:
    from dtr_core.distill.training import load_students, read_layer_results
    from dtr_core.models import load_model
    from dtr_core.hybrid.surgery import num_layers

    model, tokenizer = load_model(s.model)
    model.eval()
    layers = offered_layers(num_layers(model), s.offered)
    if s.students is None:
        logger.info("distilling %d layers (%d tokens, %d steps) into %s", len(layers), s.distill_tokens,
                    s.distill_steps, s.work_dir)
        info = ensure_students(model, tokenizer, s.model, s.mixer, s.work_dir, layers, s.distill_tokens,
                               s.distill_seq_len, s.distill_steps)
        students_dir, source = info["dir"], "distilled here"
    else:
        students_dir, source, info = s.students, "given", {"dir": s.students}
    results = read_layer_results(students_dir)
    students = load_students(students_dir, model, layers=layers)
    if not students:
        raise ValueError(f"no usable students for layers {layers} in {students_dir}")
    losses = {l: float(results[l].normalized_loss) for l in students}
    keys = {layer: results[layer].key for layer in students}
    return {
        "model": s.model,
        "students": {**info, "source": source, "mixers": sorted({results[l].mixer for l in students}),
                     "layers": sorted(students), "normalized_loss": {str(l): v for l, v in sorted(losses.items())},
                     "distill_seconds": {str(l): results[l].seconds for l in sorted(students)}},
        "tasks": {name: run_task(model, tokenizer, name, students, losses, s, students_dir, keys) for name in s.tasks},
    }


# --- report --------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cell(row: dict | None, spread: bool = False) -> str:
    if row is None:
        return "-"
    if spread and row["n"] > 1:
        return f"{row['mean']:.3f} ± {row['std']:.3f} [{row['min']:.3f}-{row['max']:.3f}]"
    return f"{row['mean']:.3f}"


def _within(curve: Sequence[dict], threshold: float) -> int:
    """Largest k reached before the first k whose (mean) score is below `threshold` (0 if the first is)."""
    best = 0
    for row in curve:
        if row["mean"] < threshold:
            break
        best = row["k"]
    return best


def summary(t: dict) -> dict:
    """Per strategy: largest k within 5% of the teacher's test score, mean test over the k every strategy
    reached, collapse; and the k where greedy is best or tied-best, or behind by more than half a test example."""
    curves = {s: {row["k"]: row for row in t["curves"][s]} for s in STRATEGIES}
    ks = [k for k in t["ks"] if k in curves["greedy"]]
    common = [k for k in ks if all(k in curves[s] for s in STRATEGIES)]
    wins, behind = [], []
    for k in ks:
        g = curves["greedy"][k]["mean"]
        rivals = {s: curves[s][k]["mean"] for s in STRATEGIES[1:] if k in curves[s]}
        if all(g >= v - 1e-12 for v in rivals.values()):
            wins.append(k)
        if rivals and max(rivals.values()) > g + 0.5 / t["teacher"]["n_test"]:
            behind.append(k)
    return {"within": {s: _within(t["curves"][s], t["test_threshold"]) for s in STRATEGIES},
            "mean": {s: statistics.fmean(curves[s][k]["mean"] for k in common) if common else None for s in STRATEGIES},
            "common_ks": common, "greedy_best_at": wins, "greedy_behind_at": behind, "ks": ks}


def _gap_row(mode: str, a: dict) -> list:
    if "error" in a:
        return [mode] + ["n/a"] * 9
    refused = a.get("refused")
    return [mode, f"{a['k']}" + (" (cap)" if a["stop_reason"] == "cap" else ""), f"{a['validation']:.3f}",
            f"{a['p_min']:.3f}", _fmt(a["lcb"]),
            "-" if refused is None else f"{refused['layer']}: {refused['validation']:.3f}"
            + ("" if refused["lcb"] is None else f" / {refused['lcb']:.3f}"),
            f"{a['test']:.3f}", f"{a['test_threshold']:.3f}", f"{a['test_margin']:+.3f}",
            f"{a['test_drop'] * 100:.1f}%"]


def markdown(result: dict) -> str:
    s, st = result["settings"], result["students"]
    loss = st["normalized_loss"]
    lines = [
        f"# Placements: greedy DtR vs baselines ({s['model']}, {', '.join(st['mixers'])} students)", "",
        harness.environment(result), "",
        f"Students: {st['source']} ({harness.shown(st['dir'])}); {len(st['layers'])} layers offered: {st['layers']}; "
        f"normalised distillation loss (MSE / variance, held out) median {statistics.median(loss.values()):.3f}, "
        f"range {min(loss.values()):.3f}-{max(loss.values()):.3f}."
        + (f" Distillation budget: {st.get('tokens')} tokens of {st.get('seq_len')}, {s['distill_steps']} steps per "
           f"layer ({len(st.get('distilled', []))} layers trained now, {len(st.get('reused', []))} reused)."
           if st["source"] == "distilled here" else ""), "",
    ]
    for name, t in result["tasks"].items():
        curves = {strategy: {row["k"]: row for row in t["curves"][strategy]} for strategy in STRATEGIES}
        rows = [["0 (teacher)"] + [f"{t['teacher']['test']:.3f}"] * len(STRATEGIES)]
        rows += [[str(k)] + [_cell(curves[st_].get(k), spread=st_ == "random") for st_ in STRATEGIES]
                 for k in t["ks"] if any(k in curves[st_] for st_ in STRATEGIES)]
        sm = summary(t)
        errors = [f"- {mode}: not applicable ({a['error']})" for mode, a in t["acceptance"].items() if "error" in a]
        lines += [
            f"## {name}: test {t['metric']} vs number of linear layers", "",
            f"{t['teacher']['n_test']} test examples (teacher {t['teacher']['test']:.3f}, 0.95 x = "
            f"{t['test_threshold']:.3f}, majority class {_fmt(t['chance'])}); the greedy search saw "
            f"{t['teacher']['n_validation']} validation examples (teacher {t['teacher']['validation']:.3f}). Random: "
            f"mean ± standard deviation [min-max] over seeds {', '.join(map(str, s['seeds']))}.", "",
            harness.markdown_table(["linear layers k"] + list(STRATEGIES), rows), "",
            harness.markdown_table(["strategy", "largest k within 5% of the teacher (test)",
                                    f"mean test over k = {','.join(map(str, sm['common_ks'])) or '-'}",
                                    "collapsed at k"],
                                   [[st_, sm["within"][st_], _fmt(sm["mean"][st_]), t["collapsed"].get(st_, "-")]
                                    for st_ in STRATEGIES]), "",
            f"- greedy best or tied-best at {len(sm['greedy_best_at'])} of {len(sm['ks'])} values of k; another "
            "placement ahead by more than half a test example at k = "
            + (", ".join(map(str, sm["greedy_behind_at"])) or "none"),
            f"- greedy search stopped: {t['search_stop']} (validation majority class "
            f"{_fmt(t['chance_validation'])})", "", f"![{name} placements](placements_{name}.png)", "",
            harness.footer(result), "", f"### {name}: validation-to-test gap at 5% relative tolerance", "",
            harness.markdown_table(["acceptance", "M_opt k", "validation", "P_min (val)", "LCB (val)",
                                    "refused next: val / LCB", "test", "0.95 x teacher test", "test - threshold",
                                    "test drop"],
                                   [_gap_row(mode, t["acceptance"].get(mode, {})) for mode in ("point", "bootstrap")]),
            "", *errors, "Greedy order (layer, validation score): "
            + ", ".join(f"{r['layer']} ({r['validation']:.3f})" for r in t["greedy_trajectory"]) + ".", "",
            f"![{name} gap](gap_{name}.png)", "", harness.footer(result), "",
        ]
    return "\n".join(lines)


def plots(result: dict, out_dir: Path) -> list[str]:
    names = []
    for name, t in result["tasks"].items():
        ks, series = t["ks"], []
        for strategy in STRATEGIES:
            curve = {row["k"]: row for row in t["curves"][strategy]}
            bounds = ("mean", "min", "max") if strategy == "random" else ("mean",)
            series += [harness.Series(strategy if key == "mean" else f"{strategy} {key}", ks,
                                      [curve[k][key] if k in curve else None for k in ks], group=strategy,
                                      dashed=key != "mean", marker="o" if key == "mean" else None) for key in bounds]
        series.append(harness.Series("teacher", ks, [t["teacher"]["test"]] * len(ks), dashed=True, marker=None))
        harness.plot_lines(out_dir / f"placements_{name}.png", series,
                           f"{name}: test {t['metric']} vs linear layers ({result['model']})", "linear layers k",
                           f"test {t['metric']}", hline=t["test_threshold"], xticks=ks)
        trajectory = t["greedy_trajectory"]
        gk = [r["k"] for r in trajectory]
        greedy_test = {row["k"]: row["mean"] for row in t["curves"]["greedy"]}
        series = [harness.Series("greedy validation", gk, [r["validation"] for r in trajectory], group="validation"),
                  harness.Series("P_min (validation)", gk, [t["p_min"]] * len(gk), group="validation", dashed=True,
                                 marker=None),
                  harness.Series("greedy test", gk, [greedy_test.get(k) for k in gk], group="test"),
                  harness.Series("0.95 x teacher test", gk, [t["test_threshold"]] * len(gk), group="test",
                                 dashed=True, marker=None)]
        for mode, marker in (("point", "s"), ("bootstrap", "^")):
            if (a := t["acceptance"].get(mode, {})).get("k"):
                series.append(harness.Series(f"M_opt {mode} (test)", [a["k"]], [a["test"]], group=f"M_opt {mode}",
                                             marker=marker, style={"markersize": 10}))
        harness.plot_lines(out_dir / f"gap_{name}.png", series,
                           f"{name}: greedy path, validation vs test ({result['model']})", "linear layers k",
                           t["metric"], xticks=gk or None)
        names += [f"placements_{name}.png", f"gap_{name}.png"]
    return names


BENCH = harness.Benchmark("placements", Settings, measure, markdown, plots, check=check, presets={"quick": QUICK})
main = BENCH.main

if __name__ == "__main__":
    sys.exit(main())
