"""Metrics on per-example results, and the score transforms the search relies on.

Per-example values (`EvalResult.per_example`, `weights`):
- classification: correctness 0/1, weight 1; score = accuracy = weighted mean;
- language modelling: summed NLL of the document in nats, weight = number of scored tokens;
  score = exp(-sum NLL / sum tokens) = 1 / perplexity (see `tasks.py` for why not -perplexity).

`aggregate_score` recomputes a score from any subset (paired bootstrap resamples examples);
`score_upper_bound` is the best score still reachable after part of the examples is seen: the one bound
behind the fast greedy scorer's exact early rejection (`dtr_core/search/scorer.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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
    scores = []
    for label in sorted(set(gold) | set(predicted)):
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[float]) -> float:
    """exp(total NLL / total tokens): corpus-level (token-weighted) perplexity."""
    total_tokens = sum(token_counts)
    if total_tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(sum(nll_sums) / total_tokens)


def aggregate_score(kind: str, per_example: Sequence[float], weights: Sequence[float]) -> float:
    """The higher-is-better task score from per-example values (module docstring)."""
    if len(per_example) != len(weights) or not per_example:
        raise ValueError(f"aggregate_score needs equal, non-empty sequences, got {len(per_example)} and {len(weights)}")
    if kind == "classification":
        return sum(v * w for v, w in zip(per_example, weights)) / sum(weights)
    if kind == "language_modeling":
        return 1.0 / perplexity(per_example, weights)
    raise ValueError(f"unknown task kind '{kind}'; choose one of: classification, language_modeling")


def score_upper_bound(kind: str, seen_values: Sequence[float], seen_weights: Sequence[float],
                      total_weight: float) -> float:
    """Highest final score still possible after seeing some examples.

    `seen_values` / `seen_weights`: per-example values of the examples scored so far (any subset, any
    order); `total_weight`: the sum of weights over the whole split (classification: its number of
    examples; language modelling: its number of scored tokens, known from the encoding).

    Why it is a bound (proof sketch). Classification: the final accuracy is (c_seen + c_unseen) / N with
    c_unseen <= N - n_seen, since each unseen example adds at most 1; the bound takes c_unseen = N - n_seen.
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
    if kind == "classification":
        seen_sum = sum(v * w for v, w in zip(seen_values, seen_weights))
        return (seen_sum + (total_weight - seen_weight)) / total_weight
    if kind == "language_modeling":
        return math.exp(-sum(seen_values) / total_weight)
    raise ValueError(f"unknown task kind '{kind}'; choose one of: classification, language_modeling")
