"""Search metrics of classification tasks (dtr_core/evaluation/metrics.py): values by hand, the early-rejection
bound against every completion, the checks of a metric against its task, verbaliser scoring defaults, and
the one-line refusals of `dtr eval` / `dtr convert`."""

from __future__ import annotations

import itertools
import logging
import random
import subprocess
import sys

import pytest

from dtr_core.evaluation import ClassificationTask, Example, encode, get_task, with_options
from dtr_core.evaluation.metrics import (
    CLASSIFICATION_METRICS, Confusion, accuracy, balanced_accuracy, check_bootstrap_metric,
    classification_upper_bound, macro_f1, parse_metric, score_from_confusion,
)
from dtr_core.models import byte_tokenizer

LABELS = ("a", "b", "c")
METRICS = ["accuracy", "macro_f1", "balanced_accuracy", "recall:a", "recall:b", "recall:c"]


def _plain_metric(metric: str, gold: list[int], predicted: list[int]) -> float:
    """The metrics straight from their definitions (per-class loops over the pairs), for comparison."""
    pairs = list(zip(gold, predicted))
    if metric == "accuracy":
        return sum(g == p for g, p in pairs) / len(pairs)
    recall = {c: sum(g == p == c for g, p in pairs) / gold.count(c) for c in set(gold)}
    if metric == "balanced_accuracy":
        return sum(recall.values()) / len(recall)
    if metric.startswith("recall:"):
        return recall[LABELS.index(metric.split(":")[1])]
    f1 = []
    for c in sorted(set(gold) | set(predicted)):
        tp = sum(g == p == c for g, p in pairs)
        fp = sum(p == c != g for g, p in pairs)
        fn = sum(g == c != p for g, p in pairs)
        f1.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1) / len(f1)


def test_metrics_by_hand():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    assert accuracy(gold, pred) == pytest.approx(0.6)
    assert macro_f1(gold, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)  # F1 a = 2/4, b = 4/5, c = 0
    assert balanced_accuracy(gold, pred) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    counts = Confusion.from_indices([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert counts == Confusion(gold=(2, 2, 1), predicted=(2, 3, 0), correct=(1, 2, 0))
    assert score_from_confusion("recall:b", counts, LABELS) == 1.0
    assert score_from_confusion("recall:a", counts, LABELS) == 0.5
    # the imbalanced case of issue 16: always the majority class
    majority = Confusion.from_indices([0] * 87 + [1] * 13, [0] * 100, 2)
    assert score_from_confusion("accuracy", majority, ("maj", "min")) == 0.87
    assert score_from_confusion("macro_f1", majority, ("maj", "min")) == pytest.approx(0.87 / 1.87)
    assert score_from_confusion("balanced_accuracy", majority, ("maj", "min")) == 0.5
    assert score_from_confusion("recall:min", majority, ("maj", "min")) == 0.0
    with pytest.raises(ValueError, match="no example of class 'c'"):
        score_from_confusion("recall:c", Confusion.from_indices([0, 1], [0, 0], 3), LABELS)


@pytest.mark.parametrize("metric", METRICS)
def test_metrics_equal_their_definitions(metric):
    rng = random.Random(metric)
    for _ in range(300):
        n = rng.randint(1, 12)
        gold = [rng.randrange(3) for _ in range(n)]
        predicted = [rng.randrange(3) for _ in range(n)]
        if metric.startswith("recall:") and LABELS.index(metric.split(":")[1]) not in gold:
            continue
        value = score_from_confusion(metric, Confusion.from_indices(gold, predicted, 3), LABELS)
        assert value == pytest.approx(_plain_metric(metric, gold, predicted), abs=1e-12)


@pytest.mark.parametrize("metric", METRICS)
def test_bound_is_never_below_the_final_score(metric):
    """Property: for any examples seen so far and any predictions of the rest, the final float score is <= the
    bound (exactly, no slack: the scorer compares floats), and the all-correct completion reaches it."""
    rng = random.Random(f"bound-{metric}")
    checked = 0
    for _ in range(400):
        n = rng.randint(1, 14)
        gold = [rng.choice([0, 0, 0, 1, 1, 2]) for _ in range(n)]  # imbalanced, like real tasks
        if metric.startswith("recall:") and LABELS.index(metric.split(":")[1]) not in gold:
            continue
        predicted = [rng.randrange(3) for _ in range(n)]
        final = score_from_confusion(metric, Confusion.from_indices(gold, predicted, 3), LABELS)
        for seen in range(n + 1):  # every prefix seen so far
            counts = Confusion.from_indices(gold[:seen], predicted[:seen], 3)
            remaining = [gold[seen:].count(c) for c in range(3)]
            bound = classification_upper_bound(metric, counts, remaining, LABELS)
            assert final <= bound, (metric, gold, predicted, seen)
            best = score_from_confusion(metric, Confusion.from_indices(gold, predicted[:seen] + gold[seen:], 3),
                                        LABELS)
            assert best == bound  # tight: the all-correct completion scores exactly the bound
            checked += 1
    assert checked > 1000


@pytest.mark.parametrize("metric", ["macro_f1", "balanced_accuracy", "recall:b"])
def test_bound_covers_every_completion_exhaustively(metric):
    """All 3^4 completions of 4 unseen examples, from several seen states."""
    rng = random.Random(metric)
    for _ in range(20):
        seen_gold = [rng.randrange(3) for _ in range(5)]
        seen_pred = [rng.randrange(3) for _ in range(5)]
        rest_gold = [rng.randrange(3) for _ in range(4)]
        if metric == "recall:b" and 1 not in seen_gold + rest_gold:
            continue
        counts = Confusion.from_indices(seen_gold, seen_pred, 3)
        bound = classification_upper_bound(metric, counts, [rest_gold.count(c) for c in range(3)], LABELS)
        finals = [score_from_confusion(metric, Confusion.from_indices(seen_gold + rest_gold, seen_pred + list(rest), 3),
                                       LABELS) for rest in itertools.product(range(3), repeat=4)]
        assert max(finals) == bound


def test_metric_must_fit_the_task():
    assert parse_metric("recall:b", "classification", LABELS) == "recall:b"
    for metric, kind, message in [
        ("f1", "classification", "unknown classification metric 'f1'; choose one of: accuracy, macro_f1"),
        ("perplexity", "classification", "does not fit a classification task"),
        ("recall:d", "classification", "names class 'd', which the task does not have; choose one of: a, b, c"),
        ("recall:", "classification", "names no class"),
        ("accuracy:a", "classification", "unknown classification metric 'accuracy:a'"),
        ("accuracy", "language_modeling", "does not fit a language-modelling task; use perplexity"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_metric(metric, kind, LABELS)
    assert with_options(get_task("sentiment"), "recall:negative").metric == "recall:negative"
    assert get_task("sentiment").metric == "accuracy"  # the built-in task is unchanged
    with pytest.raises(ValueError, match="task 'sentiment': metric 'recall:neg' names class 'neg'"):
        with_options(get_task("sentiment"), "recall:neg")
    with pytest.raises(ValueError, match="task 'bbc-lm': metric 'macro_f1' does not fit"):
        with_options(get_task("bbc-lm"), "macro_f1")
    with pytest.raises(ValueError, match="perplexity task, which has no verbalisers"):
        with_options(get_task("bbc-lm"), None, "per_token")
    with pytest.raises(ValueError, match="unknown verbaliser scoring 'mean'; choose one of: sum, per_token, per_byte"):
        with_options(get_task("sentiment"), None, "mean")
    check_bootstrap_metric("accuracy")
    for metric in CLASSIFICATION_METRICS[1:] + ("perplexity",):
        with pytest.raises(ValueError, match="bootstrap acceptance needs a score that is a mean"):
            check_bootstrap_metric(metric)


def _toy(verbalisers, **options):
    examples = [Example(uid=f"u{i}", text=f"text {i}", label=list(verbalisers)[i % len(verbalisers)])
                for i in range(12)]
    return ClassificationTask(name="toy-verbalisers", load=lambda: examples, validation_size=4, test_size=4,
                              verbalisers=verbalisers, **options)


def test_verbaliser_scoring_defaults_and_says_so_once(caplog):
    tokenizer = byte_tokenizer()  # one token per byte
    differing = _toy({"yes": " yes", "no": " no"})
    with caplog.at_level(logging.INFO, logger="dtr_core.evaluation.scoring"):
        first = encode(differing, differing.split("validation"), tokenizer)
        encode(differing, differing.split("test"), tokenizer)
    assert first[0].verbaliser_scoring == "per_token" and first[0].label_divisors.tolist() == [4.0, 3.0]
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "per-token log-likelihood" in caplog.records[0].message and len(caplog.records) == 1
    caplog.clear()
    same = _toy({"yes": " yes", "non": " non"})
    with caplog.at_level(logging.INFO, logger="dtr_core.evaluation.scoring"):
        batch = encode(same, same.split("validation"), tokenizer)[0]
    assert batch.verbaliser_scoring == "sum" and batch.label_divisors.tolist() == [1.0, 1.0] and not caplog.records
    chosen = _toy({"yes": " yes", "no": " no"}, verbaliser_scoring="sum")
    assert encode(chosen, chosen.split("validation"), tokenizer)[0].verbaliser_scoring == "sum"
    per_byte = _toy({"é": " é", "e": " e"}, verbaliser_scoring="per_byte")  # é is two UTF-8 bytes
    assert encode(per_byte, per_byte.split("validation"), tokenizer)[0].label_divisors.tolist() == [3.0, 2.0]


# ---- the CLI: one `error:` line, exit 2, before any work ----------------------------------------------

def _dtr(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "dtr.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


@pytest.mark.parametrize("args, message", [
    (["eval", "-m", "tiny-llama", "-t", "sentiment", "--metric", "recall:neutral"],
     "names class 'neutral', which the task does not have; choose one of: positive, negative"),
    (["eval", "-m", "tiny-llama", "-t", "bbc-lm", "--metric", "accuracy"], "does not fit a language-modelling task"),
    (["eval", "-m", "tiny-llama", "-t", "sentiment", "--verbaliser-scoring", "mean"], "unknown verbaliser scoring"),
    (["convert", "-p", "smoke", "--metric", "perplexity"], "metric 'perplexity' does not fit a classification task"),
    (["convert", "-p", "smoke", "--metric", "recall:neutral"], "names class 'neutral'"),
    (["convert", "-p", "smoke", "--task", "bbc-lm", "--metric", "macro_f1"], "does not fit a language-modelling"),
    (["convert", "-p", "smoke", "--metric", "macro_f1", "--acceptance", "bootstrap"],
     "bootstrap acceptance needs a score that is a mean over examples (accuracy), but task 'sentiment' is "
     "searched on macro_f1; use --acceptance point, or --metric accuracy"),
], ids=["eval-unknown-class", "eval-kind", "eval-scoring", "convert-kind", "convert-unknown-class",
        "convert-lm", "convert-bootstrap"])
def test_bad_metric_is_one_line_exit_2_before_any_work(tmp_path, args, message):
    result = _dtr(tmp_path, *args, *(["-o", str(tmp_path / "runs")] if args[0] == "convert" else []))
    assert result.returncode == 2, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "runs").exists()  # nothing written


def test_help_shows_each_tasks_metric():
    result = subprocess.run([sys.executable, "-m", "dtr.cli", "eval", "--help"], capture_output=True, text=True,
                            timeout=120, env={"COLUMNS": "400", "PATH": ""})
    text = " ".join(result.stdout.split())
    assert "sentiment (classification, accuracy)" in text and "bbc-lm (language modeling, perplexity)" in text
    assert "--metric" in text and "--verbaliser-scoring" in text


def test_user_task_spec_takes_metric_and_verbaliser_scoring(tmp_path):
    import json

    from dtr_core.evaluation import TaskSpec

    rows = [{"text": f"row {i}", "label": "rare" if i % 10 == 0 else "common"} for i in range(60)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    spec = {"path": "data.jsonl", "verbalisers": {"rare": " rare", "common": " common"}, "validation_size": 20,
            "test_size": 10, "metric": "recall:rare", "verbaliser_scoring": "per_byte"}
    (tmp_path / "task.json").write_text(json.dumps(spec))
    task = get_task(str(tmp_path / "task.json"))
    assert (task.metric, task.verbaliser_scoring) == ("recall:rare", "per_byte")
    with pytest.raises(ValueError, match="names class 'often', which the task does not have"):
        TaskSpec(path=str(tmp_path / "data.jsonl"), verbalisers={"rare": " rare", "common": " common"},
                 validation_size=20, test_size=10, metric="recall:often").build()
    with pytest.raises(ValueError, match="field 'metric' must be a string or null"):
        TaskSpec(path=str(tmp_path / "data.jsonl"), verbalisers={"rare": " r", "common": " c"}, metric=3)
    # the validation split is stratified, so its first examples are common ones: recall of "rare" is undefined
    first = task.split("validation")[:2]
    assert {e.label for e in first} == {"common"}
    result = _dtr(tmp_path, "eval", "-m", "tiny-llama", "-t", str(tmp_path / "task.json"), "--limit", "2")
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1
    assert "metric 'recall:rare' is undefined on the first 2 validation examples" in lines[0]


def test_metric_and_scoring_are_part_of_the_run_key():
    from tasks.params import build_params

    default = build_params("smoke")
    assert (default.task.metric, default.task.verbaliser_scoring) == (None, None)
    ids = {default.resolved_run_id(), build_params("smoke", task={"metric": "macro_f1"}).resolved_run_id(),
           build_params("smoke", task={"verbaliser_scoring": "per_token"}).resolved_run_id()}
    assert len(ids) == 3
    assert "balanced_accuracy" in type(default.task).model_fields["metric"].description  # the Prefect form help


def test_convert_refuses_a_recall_class_the_searched_examples_lack(tmp_path):
    import json

    rows = [{"text": f"row {i}", "label": "rare" if i % 10 == 0 else "common"} for i in range(800)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    result = _dtr(tmp_path, "convert", "-p", "smoke", "--data-file", "data.jsonl", "--verbaliser", "rare= rare",
                  "--verbaliser", "common= common", "--val-limit", "2", "--metric", "recall:rare",
                  "-o", str(tmp_path / "runs"))
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, lines
    assert "metric 'recall:rare' is undefined on the 2 validation examples the search uses" in lines[0]
    assert not (tmp_path / "runs").exists()
