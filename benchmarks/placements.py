"""Quality of layer placements: greedy DtR against the paper's placement baselines (issue 5, section 3).

For each task, with one set of distilled students shared by every strategy, the test score of the hybrid
with k linear layers (k = 1..12 by default, per strategy until it collapses) for:
- `greedy`: DtR's greedy search on the validation split (`dtr_core.search`, fast evaluator, same choices as
  the paper's), run past its threshold: the first k layers it commits (the paper's Fig. 4 curve);
- `uniform`: evenly interleaved layers (`dtr_core.baselines.uniform_layers`);
- `random`: 3 seeded random draws (mean, spread);
- `local importance`: the k layers whose single swap into the teacher scores highest on validation
  (round 0 of the search, scored exactly, without early rejection);
- `distill loss`: the k layers whose students reached the lowest normalised distillation loss.
A strategy "collapses" at the first k where its (mean) test score is at or below the majority-class rate of
the test split (a constant answer); larger k are not evaluated for it.

The validation-to-test gap: the same search rounds, replayed with the paper's 5% relative tolerance under
`point` acceptance (P* >= P_min) and `bootstrap` acceptance (lower confidence bound >= P_min;
`dtr_core.acceptance`). The greedy choice of each round does not depend on the acceptance rule, so both
stop somewhere on the one trajectory; their M_opt is then scored on test, against 0.95 x the teacher's
test score measured in the same run.

Students: `--students DIR` (the `students` folder of a conversion or distillation run), else distilled here
with a small budget into `--work-dir` (teacher activations captured once; completed layers are reused by
distillation's content hash, so a rerun with the same budget trains nothing).

    python -m benchmarks.placements [--quick] [--json] [--out DIR] [--tasks sentiment,trec] [--students DIR]
        [--ks 1-12] [--val-limit N] [--test-limit N] [--seeds 0,1,2] [--threads N]
    dtr bench placements [same options]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import common

logger = logging.getLogger("benchmarks.placements")

DEFAULT_OUT = common.REPO_ROOT / "docs" / "bench" / "placements"
DEFAULT_WORK = common.REPO_ROOT / "runs" / "bench"
DEFAULT_TASKS = ("sentiment", "trec")
STRATEGIES = ("greedy", "uniform", "random", "local importance", "distill loss")
TOLERANCE = 0.05  # the paper's 5% relative rule

# Small distillation budget (= the pipeline's default `DistillBudget`, so the students are the same).
DISTILL_TOKENS, DISTILL_SEQ_LEN, DISTILL_STEPS, DISTILL_BATCH = 8192, 256, 30, 4

# --quick: smollm2-135m, one task, 8 of 30 layers offered, small limits, a tiny distillation budget (< 2 min idle)
QUICK = dict(tasks=("sentiment",), ks=(1, 2, 3), val_limit=24, test_limit=24, seeds=(0, 1, 2),
             offered=6, distill_tokens=1024, distill_seq_len=128, distill_steps=4)


@dataclass(frozen=True)
class Settings:
    model: str
    mixer: str
    tasks: tuple[str, ...]
    ks: tuple[int, ...]
    val_limit: int | None
    test_limit: int | None
    seeds: tuple[int, ...]
    students: str | None  # a given students folder, else distilled into work_dir
    work_dir: str
    offered: int | None  # offer only this many (evenly spread) layers to every strategy; None = all
    distill_tokens: int
    distill_seq_len: int
    distill_steps: int
    batch_size: int
    threads: int
    quick: bool


def display_path(path: str | os.PathLike) -> str:
    """`path` relative to the repository when inside it: reports carry no per-user absolute paths."""
    try:
        return Path(path).resolve().relative_to(common.REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


# --- students ------------------------------------------------------------------------------------


def distill_config(steps: int, seed: int = 0):
    """The DistillConfig of the pipeline's `DistillBudget` with these steps (flows/params.py)."""
    from dtr_core.distill import DistillConfig

    return DistillConfig(steps=steps, batch_size=DISTILL_BATCH, lr=1e-3, seed=seed,
                         warmup_steps=max(1, round(0.1 * steps)), log_every=max(1, min(10, steps // 10)))


def ensure_students(model, tokenizer, model_name: str, mixer: str, work_dir: str | os.PathLike,
                    layers: Sequence[int], tokens: int, seq_len: int, steps: int) -> dict:
    """Capture + distil `layers` into `work_dir/<model>-<mixer>-<budget>/{activations,students}`, reusing work.

    Returns {"dir", "seconds", "distilled", "reused", "failed"}.
    """
    from dtr_core.capture import capture_activations
    from dtr_core.conversion import slug
    from dtr_core.corpus import load_corpus, token_chunks
    from dtr_core.distill import distill_layer

    # one folder per budget: a quick run never overwrites the students of a full one
    root = Path(work_dir) / f"{slug(model_name)}-{mixer}-t{tokens}-s{seq_len}-n{steps}"
    started = time.perf_counter()
    token_ids = token_chunks(load_corpus("bbc"), tokenizer, seq_len, tokens)
    # every layer is captured (whatever `layers` is), so a later call for other layers reuses the capture
    manifest = capture_activations(model, token_ids, root / "activations",
                                   metadata={"corpus": "bbc", "token_budget": tokens, "seq_len": seq_len})
    config = distill_config(steps)
    distilled, reused, failed = [], [], []
    for layer in layers:
        result = distill_layer(model, layer, root / "activations", mixer, config, root / "students")
        (reused if result.reused else distilled if result.ok else failed).append(layer)
        logger.info("students: layer %d %s (normalised loss %s)", layer,
                    "reused" if result.reused else result.status, result.normalized_loss)
    return {"dir": str(root / "students"), "seconds": time.perf_counter() - started, "distilled": distilled,
            "reused": reused, "failed": failed, "capture_reused": bool(manifest.get("reused", False)),
            "config": config.to_dict(), "tokens": manifest["num_tokens"], "seq_len": seq_len}


def offered_layers(num_layers: int, offered: int | None) -> list[int]:
    from dtr_core.baselines import uniform_layers

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


@contextlib.contextmanager
def _quiet(name: str):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _no_more_rounds(committed, candidates, hint):
    raise RuntimeError("replay needed a round the forced search did not run")  # max_layers prevents it


class ResultCache:
    """Finished work of one task's run on disk, so a killed or extended run resumes (files written atomically).

    Keyed by everything that decides the numbers: the task's encoded validation and test batches (prompts,
    tokenizer, limits, batching) and the students' content keys (which include the teacher's weights and the
    distillation budget). Holds the teacher's
    validation result, the exact single-swap scores, each finished greedy round and each test score.
    """

    FORMAT = 1

    def __init__(self, students_dir: str | os.PathLike, task: str, student_keys: Mapping, batches: Sequence):
        from dtr_core.artifacts import hash_json, hash_tensor

        # the encoded prompts stand for the task definition, the tokenizer and the limits
        key = hash_json({"format": self.FORMAT, "task": task,
                         "inputs": [hash_tensor(batch.input_ids) for batch in batches],
                         "students": {str(layer): student_keys[layer] for layer in sorted(student_keys)}})
        self.dir = Path(students_dir).parent / "placements" / f"{task}-{key[:16]}"
        self.reused: dict[str, int] = {"validation": 0, "rounds": 0, "test": 0}

    def load(self, name: str):
        from dtr_core.artifacts import read_json

        path = self.dir / name
        return read_json(path) if path.is_file() else None

    def save(self, name: str, value) -> None:
        from dtr_core.artifacts import write_json

        write_json(self.dir / name, value)

    def rounds(self) -> list:
        from dtr_core.greedy import RoundRecord

        records = []
        while (data := self.load(f"round_{len(records):02d}.json")) is not None:
            records.append(RoundRecord.from_dict(data))
        self.reused["rounds"] = len(records)
        return records


@dataclass(frozen=True)
class Score:
    """What the report needs of an evaluation."""

    score: float
    n: int
    per_example: tuple[float, ...] = ()


class _Scores:
    """Test scores of layer sets, each evaluated once (several strategies often pick the same set)."""

    def __init__(self, evaluator, cache: ResultCache):
        self.evaluator = evaluator
        self.cache: dict[tuple[int, ...], Score] = {}
        self.disk = cache
        self.seconds = 0.0

    def __call__(self, layers: Sequence[int]) -> Score:
        key = tuple(sorted(layers))
        if key not in self.cache:
            name = "test/" + ("teacher" if not key else "-".join(map(str, key))) + ".json"
            stored = self.disk.load(name)
            if stored is not None:
                self.disk.reused["test"] += 1
                self.cache[key] = Score(stored["score"], stored["n"])
            else:
                started = time.perf_counter()
                result = self.evaluator.evaluate_layers(key)
                self.seconds += time.perf_counter() - started
                self.cache[key] = Score(result.score, result.n)
                self.disk.save(name, {"layers": list(key), "score": result.score, "n": result.n})
            logger.info("  test %s: %.4f", list(key), self.cache[key].score)
        return self.cache[key]


def run_task(model, tokenizer, task_name: str, students: Mapping[int, torch.nn.Module],
             losses: Mapping[int, float], settings: Settings, students_dir: str, student_keys: Mapping) -> dict:
    """Search, baselines and test scores for one task (see the module docstring)."""
    from dtr_core.acceptance import Acceptance, Tolerance
    from dtr_core.baselines import distill_loss_layers, local_importance_layers, random_layers, uniform_layers
    from dtr_core.evaluation import get_task
    from dtr_core.greedy import CandidateScore, greedy_replace
    from dtr_core.search import FastEvaluator, PlainEvaluator, encode_split
    from dtr_core.surgery import num_layers

    started = time.perf_counter()
    task = get_task(task_name)
    L = num_layers(model)
    available = sorted(students)
    ks = [k for k in settings.ks if k <= len(available)]
    k_max = max(ks)
    val_batches = encode_split(task, tokenizer, "validation", settings.val_limit, settings.batch_size)
    test_batches = encode_split(task, tokenizer, "test", settings.test_limit, settings.batch_size)
    cache = ResultCache(students_dir, task_name, student_keys, val_batches + test_batches)
    test_scores = _Scores(PlainEvaluator(model, task, test_batches, students, split="test"), cache)
    logger.info("%s: teacher on validation and test (finished work reused from %s)", task_name, cache.dir)
    stored = cache.load("teacher_validation.json")
    if stored is None:
        result = PlainEvaluator(model, task, val_batches, students).evaluate_layers(())
        stored = {"score": result.score, "n": result.n, "per_example": list(result.per_example)}
        cache.save("teacher_validation.json", stored)
    else:
        cache.reused["validation"] += 1
    teacher_val = Score(stored["score"], stored["n"], tuple(stored["per_example"]))
    teacher_test = test_scores(())
    tolerance = Tolerance("relative", TOLERANCE)
    chance = majority_rate(task, "test", settings.test_limit)

    # 1. single-swap scores of every offered layer, exact (local importance; also the search's round 0)
    search_started = time.perf_counter()
    logger.info("%s: single-swap validation scores of %d layers", task_name, len(available))
    exact = FastEvaluator(model, task, val_batches, students, early_rejection=False)
    stored = cache.load("single_swap.json")
    if stored is not None and sorted(int(layer) for layer in stored) == available:
        cache.reused["validation"] += 1
        single = {int(layer): CandidateScore.from_dict(value) for layer, value in stored.items()}
    else:
        single = exact((), available)
        cache.save("single_swap.json", {str(layer): value.to_dict() for layer, value in single.items()})
    fast = FastEvaluator(model, task, val_batches, students, first_hint={l: -v for l, v in losses.items()})

    def score_candidates(committed, candidates, hint):
        if not committed:
            return {layer: single[layer] for layer in candidates}
        logger.info("%s: greedy round %d (%d candidates)", task_name, len(committed), len(candidates))
        return fast(committed, candidates, hint)

    # 2. the greedy trajectory, forced on for up to k_max rounds: a round is committed unless its best candidate
    #    has collapsed to the majority-class rate on validation (then later rounds would measure noise)
    chance_val = majority_rate(task, "validation", settings.val_limit)
    floor = Tolerance("absolute", 0.0 if chance_val is None else chance_val + 1e-9)
    persisted = cache.rounds()
    forced = greedy_replace(score_candidates, L, available, teacher_val.score, floor,
                            teacher_per_example=teacher_val.per_example, max_layers=k_max,
                            completed_rounds=persisted[:k_max],
                            on_round=lambda record: cache.save(f"round_{record.index:02d}.json", record.to_dict()))
    search_seconds = time.perf_counter() - search_started

    # 3. the same rounds replayed under the paper's 5% rule, point and bootstrap acceptance
    acceptance = {}
    for mode in ("point", "bootstrap"):
        try:
            with _quiet("dtr_core.greedy"):  # a replay re-logs every round and warns about the unused ones
                replay = greedy_replace(_no_more_rounds, L, available, teacher_val.score, tolerance, Acceptance(mode),
                                        teacher_per_example=teacher_val.per_example,
                                        max_layers=len(forced.rounds), completed_rounds=forced.rounds)
        except ValueError as error:  # bootstrap needs a mean-of-examples metric
            acceptance[mode] = {"error": str(error)}
            continue
        except RuntimeError:  # accepted past the point where the forced search stopped (collapsed)
            acceptance[mode] = {"error": "the search collapsed before this rule stopped"}
            continue
        opt_test = test_scores(replay.opt_layers)
        last = replay.rounds[len(replay.opt_layers) - 1] if replay.opt_layers else None
        acceptance[mode] = {
            "opt_layers": list(replay.opt_layers), "k": len(replay.opt_layers), "stop_reason": replay.stop_reason,
            "validation": replay.opt_score, "p_min": replay.p_min, "lcb": None if last is None else last.lcb,
            "refused": None if replay.stop_reason != "rejected" else {
                "layer": replay.rounds[-1].chosen, "validation": replay.rounds[-1].score, "lcb": replay.rounds[-1].lcb},
            "test": opt_test.score, "test_threshold": tolerance.threshold(teacher_test.score),
            "test_margin": opt_test.score - tolerance.threshold(teacher_test.score),
            "test_drop": _drop(opt_test.score, teacher_test.score),
            "validation_drop": _drop(replay.opt_score, teacher_val.score),
        }

    # 4. layer sets of every strategy, test scores until each collapses
    greedy_order = [r.chosen for r in forced.rounds]  # the committed layers, then the round that collapsed
    plans = {
        "greedy": lambda k, seed: tuple(sorted(greedy_order[:k])) if k <= len(greedy_order) else None,
        "uniform": lambda k, seed: uniform_layers(L, k, available),
        "random": lambda k, seed: random_layers(L, k, seed, available),
        "local importance": lambda k, seed: local_importance_layers(
            {l: s.score for l, s in single.items()}, k, L),
        "distill loss": lambda k, seed: distill_loss_layers({l: losses[l] for l in available}, k, L),
    }
    points, curves, collapsed = [], {}, {}
    for strategy in STRATEGIES:
        curves[strategy] = []
        for k in ks:
            seeds = settings.seeds if strategy == "random" else (None,)
            values = []
            for seed in seeds:
                layers = plans[strategy](k, seed)
                if layers is None:
                    continue
                score = test_scores(layers).score
                values.append(score)
                points.append({"strategy": strategy, "k": k, "seed": seed, "layers": list(layers), "test": score})
            if not values:
                break
            curves[strategy].append(_summary(k, values))
            if chance is not None and statistics.fmean(values) <= chance:
                collapsed[strategy] = k
                break

    greedy_val = [{"k": r.index + 1, "layer": r.chosen, "validation": r.score} for r in forced.rounds]
    return {
        "task": task_name, "metric": task.metric, "num_layers": L, "available_layers": available, "ks": ks,
        "teacher": {"validation": teacher_val.score, "test": teacher_test.score, "n_validation": teacher_val.n,
                    "n_test": teacher_test.n},
        "chance": chance, "chance_validation": chance_val, "tolerance": TOLERANCE,
        "search_stop": forced.stop_reason,
        "p_min": tolerance.threshold(teacher_val.score), "test_threshold": tolerance.threshold(teacher_test.score),
        "single_swap": {str(l): s.score for l, s in sorted(single.items())},
        "greedy_trajectory": greedy_val,
        "search_cost": {"round0_exact": exact.cost.to_dict(), "later_rounds_fast": fast.cost.to_dict(),
                        "seconds_total": search_seconds},
        "acceptance": acceptance, "points": points, "curves": curves, "collapsed": collapsed,
        "test_evaluations": len(test_scores.cache), "test_seconds": test_scores.seconds,
        "cache": {"dir": str(cache.dir), "reused": dict(cache.reused)},
        "seconds": time.perf_counter() - started,
    }


def _drop(score: float, reference: float) -> float | None:
    """Relative drop below `reference` (0.05 = 5% below; negative = above)."""
    return (reference - score) / abs(reference) if reference else None


def _relative(drop: float | None) -> str:
    if drop is None:
        return "teacher score 0"
    return f"{drop * 100:.1f}% below the teacher" if drop >= 0 else f"{-drop * 100:.1f}% above the teacher"


def _summary(k: int, values: Sequence[float]) -> dict:
    return {"k": k, "n": len(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


# --- whole run -----------------------------------------------------------------------------------


def run(settings: Settings, argv: Sequence[str]) -> dict:
    from dtr_core.distill import load_students, read_layer_results
    from dtr_core.models import load_model
    from dtr_core.surgery import num_layers

    started = time.perf_counter()
    machine = common.machine_info()
    model, tokenizer = load_model(settings.model)
    model.eval()
    layers = offered_layers(num_layers(model), settings.offered)
    if settings.students is None:
        logger.info("distilling %d layers (%d tokens, %d steps) into %s", len(layers), settings.distill_tokens,
                    settings.distill_steps, settings.work_dir)
        info = ensure_students(model, tokenizer, settings.model, settings.mixer, settings.work_dir, layers,
                               settings.distill_tokens, settings.distill_seq_len, settings.distill_steps)
        students_dir, source = info["dir"], "distilled here"
    else:
        students_dir, source, info = settings.students, "given", {"dir": settings.students}
        if not Path(students_dir).is_dir():
            raise FileNotFoundError(f"--students {students_dir} is not a folder; pass runs/<id>/students")
    results = read_layer_results(students_dir)
    students = load_students(students_dir, model, layers=layers)
    if not students:
        raise ValueError(f"no usable students for layers {layers} in {students_dir}")
    losses = {l: float(results[l].normalized_loss) for l in students}
    mixers = sorted({results[l].mixer for l in students})
    keys = {layer: results[layer].key for layer in students}
    tasks = {}
    for task_name in settings.tasks:
        tasks[task_name] = run_task(model, tokenizer, task_name, students, losses, settings, students_dir, keys)
    return {
        "benchmark": "placements",
        "settings": asdict(settings),
        "commands": common.command_lines("benchmarks.placements", "placements", argv),
        "machine": machine,
        "model": settings.model,
        "students": {**info, "source": source, "mixers": mixers, "layers": sorted(students),
                     "normalized_loss": {str(l): v for l, v in sorted(losses.items())},
                     "distill_seconds": {str(l): results[l].seconds for l in sorted(students)}},
        "tasks": tasks,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_time_s": time.perf_counter() - started,
    }


# --- report --------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _cell(curve: Mapping[int, dict], k: int, spread: bool = False) -> str:
    row = curve.get(k)
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


def _footer(result: dict) -> str:
    machine = result["machine"]
    return (f"_`{result['commands']['dtr']}`; {machine['cpu_model']}, torch threads: {machine['torch_threads']}, "
            f"load {machine['load_average']}_")


def placement_paragraph(t: dict) -> str:
    """What the placement table says, in plain words, computed from the numbers."""
    curves = {s: {row["k"]: row for row in t["curves"][s]} for s in STRATEGIES}
    threshold = t["test_threshold"]
    within = {s: _within(t["curves"][s], threshold) for s in STRATEGIES}
    ks = [k for k in t["ks"] if k in curves["greedy"]]
    wins, losses = 0, []
    example = 1.0 / t["teacher"]["n_test"]  # one test example, in score units
    for k in ks:
        g = curves["greedy"][k]["mean"]
        rivals = {s: curves[s][k]["mean"] for s in STRATEGIES[1:] if k in curves[s]}
        if all(g >= v - 1e-12 for v in rivals.values()):
            wins += 1
        best_rival = max(rivals, key=rivals.get) if rivals else None
        if best_rival is not None and rivals[best_rival] > g + example / 2:
            losses.append(f"k={k} ({best_rival} {rivals[best_rival]:.3f} vs {g:.3f})")
    common_ks = [k for k in ks if all(k in curves[s] for s in STRATEGIES)]
    means = {s: statistics.fmean(curves[s][k]["mean"] for k in common_ks) for s in STRATEGIES} if common_ks else {}
    parts = [
        f"The teacher scores {t['teacher']['test']:.3f} on {t['teacher']['n_test']} test examples "
        f"({t['teacher']['validation']:.3f} on {t['teacher']['n_validation']} validation examples); 5% below it is "
        f"{threshold:.3f}. Largest k before a strategy first falls below that: "
        + ", ".join(f"{s} {within[s]}" for s in STRATEGIES) + "."
    ]
    if ks:
        parts.append(f"Greedy DtR has the best or tied-best test score at {wins} of {len(ks)} values of k.")
    if means:
        ranked = sorted(means, key=means.get, reverse=True)
        parts.append(f"Mean test score over k = {', '.join(map(str, common_ks))} (where every strategy was "
                     "evaluated): " + ", ".join(f"{s} {means[s]:.3f}" for s in ranked) + ".")
    if losses:
        parts.append("Where dtr falls short: another placement beats greedy by more than half a test example at "
                     + "; ".join(losses) + ". Greedy optimises the validation split, and on a small validation split "
                     "its choices can over-fit.")
    else:
        parts.append("No baseline beats greedy by more than half a test example at any evaluated k.")
    if t.get("search_stop") == "rejected":
        last = t["greedy_trajectory"][-1]
        parts.append(f"The greedy search stopped at round {last['k']}: its best candidate (layer {last['layer']}) "
                     f"scored {last['validation']:.3f} on validation, at or below the majority-class rate "
                     f"{t['chance_validation']:.3f} there, so larger k were not searched.")
    if t["collapsed"]:
        parts.append("Collapsed (test at or below the majority-class rate "
                     f"{t['chance']:.3f}, larger k not evaluated): "
                     + ", ".join(f"{s} at k={k}" for s, k in t["collapsed"].items()) + ".")
    return " ".join(parts)


def gap_paragraph(t: dict) -> str:
    parts = []
    for mode in ("point", "bootstrap"):
        a = t["acceptance"].get(mode, {})
        if "error" in a:
            parts.append(f"{mode.capitalize()} acceptance: not applicable ({a['error']}).")
            continue
        stop = ("stopped at the cap of this run (k = " f"{a['k']}), so its real M_opt may be larger"
                if a["stop_reason"] == "cap" else f"stopped at k = {a['k']}")
        if a["test_margin"] < 0:
            verdict = (f"**{-a['test_margin']:.3f} below** 0.95 x the teacher's test score: a test drop of "
                       f"{a['test_drop'] * 100:.1f}%, over the 5% tolerance")
        else:
            verdict = f"within the 5% tolerance ({_relative(a['test_drop'])})"
        refused = a.get("refused")
        why = "" if refused is None else (
            f" (the next layer, {refused['layer']}, scored {refused['validation']:.3f}"
            + ("" if refused["lcb"] is None else f" with LCB {refused['lcb']:.3f}") + ")")
        parts.append(f"{mode.capitalize()} acceptance {stop}{why}: M_opt validation {a['validation']:.3f} vs P_min "
                     f"{a['p_min']:.3f}; on test it scores {a['test']:.3f}, {verdict}.")
    point, boot = t["acceptance"].get("point", {}), t["acceptance"].get("bootstrap", {})
    if "k" in point and "k" in boot:
        if boot["k"] < point["k"]:
            parts.append(f"Bootstrap acceptance gives up {point['k'] - boot['k']} linear layer(s) for a test score "
                         f"{boot['test'] - point['test']:+.3f} relative to point acceptance.")
        else:
            parts.append("Both rules stopped at the same k here: the confidence bound changed nothing.")
    return " ".join(parts)


def markdown_report(result: dict) -> str:
    s = result["settings"]
    st = result["students"]
    env = common.environment_markdown(result["machine"], result["commands"], {
        "load average at end": result["load_average_end"],
        "wall time of the run": f"{result['wall_time_s'] / 60:.1f} min",
    })
    loss = st["normalized_loss"]
    out = [
        f"# Placements: greedy DtR vs baselines ({s['model']}, {', '.join(st['mixers'])} students)", "",
        env, "",
        f"Students: {st['source']} ({display_path(st['dir'])}); {len(st['layers'])} layers offered: {st['layers']}; normalised "
        f"distillation loss (MSE / variance, held out) median {statistics.median(loss.values()):.3f}, range "
        f"{min(loss.values()):.3f}-{max(loss.values()):.3f}."
        + (f" Distillation budget: {st.get('tokens')} tokens of {st.get('seq_len')}, {s['distill_steps']} steps per "
           f"layer ({len(st.get('distilled', []))} layers trained now, {len(st.get('reused', []))} reused)."
           if st["source"] == "distilled here" else ""),
        "",
    ]
    for name, t in result["tasks"].items():
        curves = {strategy: {row["k"]: row for row in t["curves"][strategy]} for strategy in STRATEGIES}
        rows = [["0 (teacher)"] + [f"{t['teacher']['test']:.3f}"] * len(STRATEGIES)]
        for k in t["ks"]:
            if not any(k in curves[strategy] for strategy in STRATEGIES):
                continue
            rows.append([str(k)] + [_cell(curves[strategy], k, spread=strategy == "random") for strategy in STRATEGIES])
        seeds = ", ".join(map(str, s["seeds"]))
        out += [
            f"## {name}: test {t['metric']} vs number of linear layers", "",
            f"{t['teacher']['n_test']} test examples; the greedy search saw {t['teacher']['n_validation']} validation "
            f"examples. Random: mean ± standard deviation [min-max] over seeds {seeds}. Teacher measured in this run.",
            "",
            common.markdown_table(["linear layers k"] + list(STRATEGIES), rows),
            "",
            placement_paragraph(t), "",
            f"![{name} placements](placements_{name}.png)", "",
            _footer(result), "",
            f"### {name}: validation-to-test gap at 5% relative tolerance", "",
        ]
        gap_rows = []
        for mode in ("point", "bootstrap"):
            a = t["acceptance"].get(mode, {})
            if "error" in a:
                gap_rows.append([mode] + ["n/a"] * 9)
                continue
            refused = a.get("refused")
            gap_rows.append([mode, f"{a['k']}" + (" (cap)" if a["stop_reason"] == "cap" else ""),
                             f"{a['validation']:.3f}", f"{a['p_min']:.3f}", _fmt(a["lcb"]),
                             "-" if refused is None else f"{refused['layer']}: {refused['validation']:.3f}"
                             + ("" if refused["lcb"] is None else f" / {refused['lcb']:.3f}"),
                             f"{a['test']:.3f}", f"{a['test_threshold']:.3f}", f"{a['test_margin']:+.3f}",
                             f"{a['test_drop'] * 100:.1f}%"])
        out += [
            common.markdown_table(["acceptance", "M_opt k", "validation", "P_min (val)", "LCB (val)",
                                   "refused next: val / LCB", "test", "0.95 x teacher test", "test - threshold",
                                   "test drop"], gap_rows),
            "",
            f"Greedy order (layer, validation score): "
            + ", ".join(f"{r['layer']} ({r['validation']:.3f})" for r in t["greedy_trajectory"]) + ".",
            "",
            gap_paragraph(t), "",
            f"![{name} gap](gap_{name}.png)", "",
            _footer(result), "",
        ]
    return "\n".join(out)


def write_plots(result: dict, out_dir: Path) -> list[str]:
    names = []
    for name, t in result["tasks"].items():
        ks = t["ks"]
        series = []
        for strategy in STRATEGIES:
            curve = {row["k"]: row for row in t["curves"][strategy]}
            series.append(common.Series(strategy, ks, [curve[k]["mean"] if k in curve else None for k in ks],
                                        group=strategy))
            if strategy == "random":
                for bound in ("min", "max"):
                    series.append(common.Series(f"random {bound}", ks,
                                                [curve[k][bound] if k in curve else None for k in ks],
                                                group=strategy, dashed=True, marker=None))
        series.append(common.Series("teacher", ks, [t["teacher"]["test"]] * len(ks), group="teacher", dashed=True,
                                    marker=None))
        file = f"placements_{name}.png"
        common.plot_lines(out_dir / file, series, f"{name}: test {t['metric']} vs linear layers ({result['model']})",
                          "linear layers k", f"test {t['metric']}", hline=t["test_threshold"], xticks=ks)
        names.append(file)

        trajectory = t["greedy_trajectory"]
        gk = [r["k"] for r in trajectory]
        greedy_test = {row["k"]: row["mean"] for row in t["curves"]["greedy"]}
        series = [
            common.Series("greedy validation", gk, [r["validation"] for r in trajectory], group="validation"),
            common.Series("P_min (validation)", gk, [t["p_min"]] * len(gk), group="validation", dashed=True,
                          marker=None),
            common.Series("greedy test", gk, [greedy_test.get(k) for k in gk], group="test"),
            common.Series("0.95 x teacher test", gk, [t["test_threshold"]] * len(gk), group="test", dashed=True,
                          marker=None),
        ]
        for mode, marker in (("point", "s"), ("bootstrap", "^")):
            a = t["acceptance"].get(mode, {})
            if a.get("k"):
                series.append(common.Series(f"M_opt {mode} (test)", [a["k"]], [a["test"]], group=f"M_opt {mode}",
                                            marker=marker, style={"markersize": 10}))
        file = f"gap_{name}.png"
        common.plot_lines(out_dir / file, series, f"{name}: greedy path, validation vs test ({result['model']})",
                          "linear layers k", t["metric"], xticks=gk or None)
        names.append(file)
    return names


# --- command line --------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    from dtr_core.build_hybrid import parse_layers

    try:
        return tuple(parse_layers(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtr bench placements", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"sentiment only, {QUICK['offered']} of the layers offered, k = 1..3, "
                        f"{QUICK['val_limit']}/{QUICK['test_limit']} examples, {QUICK['distill_steps']} distillation "
                        "steps (< 2 min on an idle machine)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the report")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for placements.{md,json} and plots")
    parser.add_argument("--model", default="smollm2-135m", help="teacher: a dtr_core.models.load_model source")
    parser.add_argument("--mixer", default="gated_deltanet", help="student type when distilling here")
    parser.add_argument("--tasks", default=None, help=f"comma-separated tasks (default {','.join(DEFAULT_TASKS)})")
    parser.add_argument("--students", default=None, help="students folder of a run (runs/<id>/students); "
                        "default: distil with a small budget into --work-dir")
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK), help="where students distilled here live (reused)")
    parser.add_argument("--ks", type=_int_list, default=None, help="numbers of linear layers, e.g. 1-12 or 1,2,4,8")
    parser.add_argument("--val-limit", type=int, default=None, help="validation examples (default: the split)")
    parser.add_argument("--test-limit", type=int, default=None, help="test examples (default: the split)")
    parser.add_argument("--seeds", type=_int_list, default=None, help="random-placement seeds (default 0,1,2)")
    parser.add_argument("--offered", type=int, default=None, help="offer only this many evenly spread layers")
    parser.add_argument("--distill-tokens", type=int, default=None, help=f"default {DISTILL_TOKENS}")
    parser.add_argument("--distill-seq-len", type=int, default=None, help=f"default {DISTILL_SEQ_LEN}")
    parser.add_argument("--distill-steps", type=int, default=None, help=f"default {DISTILL_STEPS}")
    parser.add_argument("--batch-size", type=int, default=16, help="evaluation batch size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the report and plots from --out's placements.json without measuring")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    quick = QUICK if args.quick else {}

    def pick(name, default):
        value = getattr(args, name)
        return value if value is not None else quick.get(name, default)

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else \
        quick.get("tasks", DEFAULT_TASKS)
    for name in ("val_limit", "test_limit", "offered", "distill_tokens", "distill_seq_len", "distill_steps",
                 "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    ks = pick("ks", tuple(range(1, 13)))
    if not ks or min(ks) < 1:
        raise ValueError(f"--ks must be positive layer counts, got {ks}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return Settings(
        model=args.model, mixer=args.mixer, tasks=tasks, ks=tuple(sorted(set(ks))),
        val_limit=pick("val_limit", None), test_limit=pick("test_limit", None), seeds=pick("seeds", (0, 1, 2)),
        students=args.students, work_dir=args.work_dir, offered=pick("offered", None),
        distill_tokens=pick("distill_tokens", DISTILL_TOKENS), distill_seq_len=pick("distill_seq_len", DISTILL_SEQ_LEN),
        distill_steps=pick("distill_steps", DISTILL_STEPS), batch_size=args.batch_size,
        threads=torch.get_num_threads(), quick=args.quick,
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    common.setup_logging()
    out_dir = Path(args.out)
    if args.render_only:
        result = json.loads((out_dir / "placements.json").read_text())
    else:
        result = run(settings_from_args(args), argv)
    common.publish(out_dir, "placements", result, write_plots(result, out_dir), markdown_report, args.json)
    logger.info("wrote %s (%.1f min)", out_dir, result["wall_time_s"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
