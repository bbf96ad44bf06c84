"""Metrics on per-example results, the search metrics of classification tasks, and their early-rejection bounds.

Per-example values (`EvalResult.per_example`, `weights`):
- classification: correctness 0/1, weight 1 (the evidence of accuracy; the task's metric is computed from
  the confusion counts, `Confusion`);
- language modelling: summed NLL of the document in nats, weight = number of scored tokens;
  score = exp(-sum NLL / sum tokens) = 1 / perplexity (see `tasks.py` for why not -perplexity).

Classification search metrics (`CLASSIFICATION_METRICS`; `parse_metric` checks a name against a task):

| name | score from the per-class counts (gold g_c, predicted p_c, correct t_c) | early-rejection bound, r_c unseen examples of class c |
|---|---|---|
| `accuracy` (default) | sum t_c / sum g_c | (sum t_c + sum r_c) / N |
| `macro_f1` | mean over classes with g_c + p_c > 0 of 2 t_c / (g_c + p_c) (scikit-learn's macro F1) | the same with t_c, g_c, p_c each + r_c |
| `balanced_accuracy` | mean over classes with g_c > 0 of t_c / g_c (mean per-class recall, scikit-learn's) | mean of (t_c + r_c) / (g_c + r_c) |
| `recall:<class>` | t_c / g_c of the named class | (t_c + r_c) / (g_c + r_c) |

The families live in the registry `CONFUSION_METRICS` (`recall` is the one that names a class).

Early rejection (`classification_upper_bound`): every one of these metrics uses the same optimistic bound,
the metric of the *all-correct completion*: the examples not seen yet (whose true labels are known) are
all predicted right. Why it is the maximum over every completion: each remaining example of class c adds
1 to g_c; predicted right it adds 1 to t_c and p_c, predicted as another class d it adds 1 to p_d instead.
Per class, accuracy's count, recall t_c / g_c and F1 2 t_c / (g_c + p_c) = 2 t_c / (2 t_c + fp_c + fn_c)
all grow with t_c and shrink with fp_c and fn_c; the all-correct completion has the largest t_c and the
smallest fp_c, fn_c of every class at once. Macro-F1 averages over the classes seen in gold or predictions;
the all-correct completion adds no predicted class, so it averages over the fewest classes (the others add
F1 = 0 terms). Why comparisons with the bound are exact in floats: the metric and its bound are the same
float function (`score_from_confusion`) of integer counts; each per-class term is one correctly rounded
division of integers (monotone in its real value), the terms are summed in the same class order (a 0.0 term
changes no float sum) and float addition and division are monotone, so the float of any completion is <= the
float of the bound (equal counts give equal floats). The fast scorer compares floats exactly (`scorer.rejected`).

`score_upper_bound` is the accuracy / language-modelling form on per-example values and weights;
`aggregate_score` recomputes a mean-type score from any subset (paired bootstrap resamples examples).
Bootstrap acceptance needs a score that is the mean of its per-example values: accuracy and the generative
metrics (`check_bootstrap_metric`); the other metrics are refused up front.

Generative tasks (`text_metrics.GENERATIVE_METRICS`: exact_match, f1, rouge_l, regex_match): per-example scores
in [0, 1], weight 1, score = their mean (`aggregate_score`). Upper bound (`score_upper_bound`): every unseen
example scores 1, the same form as accuracy. It is exact in floats for exact_match and regex_match (0/1 values:
integer counts over N, as accuracy); for f1 and rouge_l the per-example values are fractions whose float sums
depend on their order, so the bound holds up to rounding only. The flow's generative round scorer
(`dtr_core/search/generation_scorer.py`) rejects early for exact_match and regex_match only; the library's
greedy search scores generative tasks with the plain evaluator, which rejects nothing early.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dtr_core.evaluation.text_metrics import GENERATIVE_METRICS

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "recall:<class>")
LANGUAGE_MODELING_METRICS = ("perplexity",)
DEFAULT_METRICS = {"classification": "accuracy", "language_modeling": "perplexity", "generative": "exact_match"}
BOOTSTRAP_METRICS = ("accuracy", *GENERATIVE_METRICS)  # the score is the mean of the per-example values (see module docstring)


@dataclass(frozen=True)
class Confusion:
    """Per-class counts in task label order: gold examples, predictions and correct predictions of each class."""

    gold: tuple[int, ...]
    predicted: tuple[int, ...]
    correct: tuple[int, ...]

    @classmethod
    def from_indices(cls, gold: Sequence[int], predicted: Sequence[int], num_labels: int) -> Confusion:
        """Counts of label indices `gold` / `predicted` (equal length) over labels 0..num_labels-1."""
        if len(gold) != len(predicted):
            raise ValueError(f"gold and predicted differ in length: {len(gold)} and {len(predicted)}")
        g, p, t = [0] * num_labels, [0] * num_labels, [0] * num_labels
        for gold_label, predicted_label in zip(gold, predicted):
            g[gold_label] += 1
            p[predicted_label] += 1
            t[gold_label] += gold_label == predicted_label
        return cls(tuple(g), tuple(p), tuple(t))

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(*(tuple(a + b for a, b in zip(mine, theirs)) for mine, theirs in
                           ((self.gold, other.gold), (self.predicted, other.predicted), (self.correct, other.correct))))

    def all_correct(self, remaining_gold: Sequence[int]) -> Confusion:
        """These counts plus `remaining_gold[c]` more examples of each class c, all predicted right."""
        if len(remaining_gold) != len(self.gold) or any(r < 0 for r in remaining_gold):
            raise ValueError(f"remaining_gold must hold {len(self.gold)} counts >= 0, got {list(remaining_gold)}")
        return self + Confusion(tuple(remaining_gold), tuple(remaining_gold), tuple(remaining_gold))


def _accuracy(counts: Confusion, target: int | None) -> float:
    return sum(counts.correct) / sum(counts.gold)


def _macro_f1(counts: Confusion, target: int | None) -> float:
    gold, predicted, correct = counts.gold, counts.predicted, counts.correct
    classes = [c for c in range(len(gold)) if gold[c] + predicted[c] > 0]
    return sum(2 * correct[c] / (gold[c] + predicted[c]) for c in classes) / len(classes)


def _balanced_accuracy(counts: Confusion, target: int | None) -> float:
    classes = [c for c in range(len(counts.gold)) if counts.gold[c] > 0]
    return sum(counts.correct[c] / counts.gold[c] for c in classes) / len(classes)


def _recall(counts: Confusion, target: int | None) -> float:
    return counts.correct[target] / counts.gold[target]  # type: ignore[index]


# family -> f(counts, class index or None); `recall` takes a class (`recall:<class>`), the others none
CONFUSION_METRICS: dict[str, Callable[[Confusion, int | None], float]] = {
    "accuracy": _accuracy, "macro_f1": _macro_f1, "balanced_accuracy": _balanced_accuracy, "recall": _recall,
}
TAKES_CLASS = ("recall",)


def parse_metric(metric: str, kind: str, labels: Sequence[str] | None = None) -> str:
    """`metric` checked for a task of `kind` (and its `labels`, for `recall:<class>`); one-line ValueError."""
    if kind == "generative":
        if metric not in GENERATIVE_METRICS:
            raise ValueError(f"metric '{metric}' does not fit a generative task; choose one of: "
                             f"{', '.join(GENERATIVE_METRICS)}")
        return metric
    if kind == "language_modeling":
        if metric not in LANGUAGE_MODELING_METRICS:
            raise ValueError(f"metric '{metric}' does not fit a language-modelling task; use perplexity "
                             f"(classification metrics: {', '.join(CLASSIFICATION_METRICS)})")
        return metric
    if kind != "classification":
        raise ValueError(f"unknown task kind '{kind}'; choose one of: classification, language_modeling, generative")
    family, has_class, target = metric.partition(":")
    if metric in LANGUAGE_MODELING_METRICS:
        raise ValueError(f"metric '{metric}' does not fit a classification task; choose one of: "
                         f"{', '.join(CLASSIFICATION_METRICS)}")
    if family not in CONFUSION_METRICS or (has_class and family not in TAKES_CLASS):
        raise ValueError(f"unknown classification metric '{metric}'; choose one of: "
                         f"{', '.join(CLASSIFICATION_METRICS)}")
    if family in TAKES_CLASS and not target:
        raise ValueError(f"metric '{metric}' names no class; use {family}:<class>, e.g. {family}:positive")
    if target and labels is not None and target not in labels:
        raise ValueError(f"metric '{metric}' names class '{target}', which the task does not have; "
                         f"choose one of: {', '.join(labels)}")
    return metric


def metric_class(metric: str) -> str | None:
    """The class a metric names (`recall:<class>`), else None."""
    return metric.partition(":")[2] or None


def check_bootstrap_metric(metric: str, task_name: str = "the task") -> None:
    """One-line ValueError unless bootstrap acceptance works for `metric` (see the module docstring)."""
    if metric not in BOOTSTRAP_METRICS:
        raise ValueError(f"bootstrap acceptance needs a score that is a mean over examples (accuracy), but "
                         f"{task_name} is searched on {metric}; use --acceptance point, or --metric accuracy")


def score_from_confusion(metric: str, confusion: Confusion, labels: Sequence[str]) -> float:
    """The classification metric `metric` (module docstring table) of `confusion`; `labels` in count order."""
    parse_metric(metric, "classification", labels)
    if not sum(confusion.gold):
        raise ValueError(f"metric {metric} needs at least one example")
    family, _, target = metric.partition(":")
    index = list(labels).index(target) if target else None
    if index is not None and confusion.gold[index] == 0:
        raise ValueError(f"metric '{metric}' is undefined: the examples hold no example of class '{target}'; "
                         "use more examples (a larger validation limit) or another metric")
    return CONFUSION_METRICS[family](confusion, index)


def classification_upper_bound(metric: str, seen: Confusion, remaining_gold: Sequence[int],
                               labels: Sequence[str]) -> float:
    """Highest final `metric` still possible after the examples counted in `seen`, when the examples not seen
    yet hold `remaining_gold[c]` examples of class c: the all-correct completion (module docstring)."""
    return score_from_confusion(metric, seen.all_correct(remaining_gold), labels)


def _label_confusion(gold: Sequence[str], predicted: Sequence[str]) -> tuple[Confusion, list[str]]:
    labels = sorted(set(gold) | set(predicted))
    index = {label: i for i, label in enumerate(labels)}
    return Confusion.from_indices([index[g] for g in gold], [index[p] for p in predicted], len(labels)), labels


def accuracy(gold: Sequence[str], predicted: Sequence[str]) -> float:
    """Fraction of positions where `predicted` equals `gold`."""
    if len(gold) != len(predicted) or not gold:
        raise ValueError(f"accuracy needs two equal, non-empty sequences, got {len(gold)} and {len(predicted)}")
    return sum(g == p for g, p in zip(gold, predicted)) / len(gold)


def macro_f1(gold: Sequence[str], predicted: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 over the classes seen in `gold` or `predicted` (as scikit-learn's
    `f1_score(average="macro")`); a class with no true positive scores 0."""
    if len(gold) != len(predicted) or not gold:
        raise ValueError(f"macro_f1 needs two equal, non-empty sequences, got {len(gold)} and {len(predicted)}")
    return score_from_confusion("macro_f1", *_label_confusion(gold, predicted))


def balanced_accuracy(gold: Sequence[str], predicted: Sequence[str]) -> float:
    """Mean per-class recall over the classes in `gold` (as scikit-learn's `balanced_accuracy_score`)."""
    if len(gold) != len(predicted) or not gold:
        raise ValueError(f"balanced_accuracy needs two equal, non-empty sequences, got {len(gold)} and "
                         f"{len(predicted)}")
    return score_from_confusion("balanced_accuracy", *_label_confusion(gold, predicted))


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[float]) -> float:
    """exp(total NLL / total tokens): corpus-level (token-weighted) perplexity."""
    total_tokens = sum(token_counts)
    if total_tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(sum(nll_sums) / total_tokens)


def aggregate_score(kind: str, per_example: Sequence[float], weights: Sequence[float]) -> float:
    """The higher-is-better mean-type score from per-example values: accuracy, or 1 / perplexity."""
    if len(per_example) != len(weights) or not per_example:
        raise ValueError(f"aggregate_score needs equal, non-empty sequences, got {len(per_example)} and {len(weights)}")
    if kind in ("classification", "generative"):
        return sum(v * w for v, w in zip(per_example, weights)) / sum(weights)
    if kind == "language_modeling":
        return 1.0 / perplexity(per_example, weights)
    raise ValueError(f"unknown task kind '{kind}'; choose one of: classification, language_modeling, generative")


def score_upper_bound(kind: str, seen_values: Sequence[float], seen_weights: Sequence[float],
                      total_weight: float) -> float:
    """Highest final accuracy (classification) or 1 / perplexity still possible after seeing some examples.

    `seen_values` / `seen_weights`: per-example values of the examples scored so far (any subset, any
    order); `total_weight`: the sum of weights over the whole split (classification: its number of
    examples; language modelling: its number of scored tokens, known from the encoding).

    Why it is a bound (proof sketch). Classification: the final accuracy is (c_seen + c_unseen) / N with
    c_unseen <= N - n_seen, since each unseen example adds at most 1; the bound takes c_unseen = N - n_seen
    (the all-correct completion of `classification_upper_bound`, the same float).
    Language modelling: the final score is exp(-(NLL_seen + NLL_unseen) / W), and NLL_unseen >= 0 (a
    log-probability is <= 0) while exp(-x / W) falls as x grows; the bound takes NLL_unseen = 0.
    Why comparisons with it are exact for classification: the bound and an accuracy are both an integer
    count divided by the same N (values 0/1 and weights 1 sum exactly in floats; `accuracy` divides the
    integer count by N); one correctly rounded division keeps distinct counts apart (N < 2**52), so
    comparing the floats is comparing the counts, ties included. For language modelling the float sums run
    in other orders than `perplexity`'s, so a comparison needs a small relative slack.
    """
    seen_weight = sum(seen_weights)
    if total_weight <= 0 or seen_weight > total_weight + 1e-9:
        raise ValueError(f"total_weight ({total_weight}) must be positive and >= the seen weight ({seen_weight})")
    if kind in ("classification", "generative"):
        seen_sum = sum(v * w for v, w in zip(seen_values, seen_weights))
        return (seen_sum + (total_weight - seen_weight)) / total_weight
    if kind == "language_modeling":
        return math.exp(-sum(seen_values) / total_weight)
    raise ValueError(f"unknown task kind '{kind}'; choose one of: classification, language_modeling, generative")
