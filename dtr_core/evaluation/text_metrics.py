"""Metrics of generated text against reference answers, each a per-example score in [0, 1].

| name | per-example score (the best over the example's references) |
|---|---|
| `exact_match` | 1 if `normalize(generation) == normalize(reference)` else 0 |
| `f1` | token F1 of the normalised texts' words (bag of words, SQuAD's `f1_score`) |
| `rouge_l` | ROUGE-L F-measure: longest common subsequence of the normalised words, F1 of its precision and recall |
| `regex_match` | 1 if the first capture (or the whole match) of the task's `answer_regex` in the generation equals the reference's (the regex's match in the reference, else the reference itself), compared as numbers when both parse (commas, `$` and surrounding spaces dropped: "1,000" == "1000.0"), else as normalised text; 0 when the regex does not match the generation (GSM8K style) |

`normalize` is SQuAD's answer normaliser: lowercase, drop punctuation, drop the articles a / an / the, collapse
whitespace. The task score is the mean of the per-example scores, so it lies in [0, 1] and the search's early
rejection may assume every unseen example scores 1 (`metrics.score_upper_bound`).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

GENERATIVE_METRICS = ("exact_match", "f1", "rouge_l", "regex_match")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normaliser: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(generation: str, reference: str) -> float:
    return float(normalize(generation) == normalize(reference))


def token_f1(generation: str, reference: str) -> float:
    """SQuAD's token F1 of the normalised words; 1 when both are empty, 0 when only one is."""
    predicted, gold = normalize(generation).split(), normalize(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def longest_common_subsequence(first: Sequence[str], second: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    previous = [0] * (len(second) + 1)
    for item in first:
        current = [0]
        for j, other in enumerate(second):
            current.append(previous[j] + 1 if item == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(generation: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) of the normalised words; 1 when both are empty, 0 when only one is."""
    predicted, gold = normalize(generation).split(), normalize(reference).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = longest_common_subsequence(predicted, gold)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def extract(text: str, pattern: re.Pattern) -> str | None:
    """The first capture group of `pattern`'s first match in `text` (the whole match without groups), or None."""
    match = pattern.search(text)
    if match is None:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def _as_number(text: str) -> float | None:
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def regex_match(generation: str, reference: str, pattern: re.Pattern) -> float:
    """1 if the answer `pattern` extracts from `generation` equals the reference's (module docstring)."""
    answer = extract(generation, pattern)
    if answer is None:
        return 0.0
    gold = extract(reference, pattern)
    gold = reference if gold is None else gold
    answer_number, gold_number = _as_number(answer), _as_number(gold)
    if answer_number is not None and gold_number is not None:
        return float(answer_number == gold_number)
    return float(normalize(answer) == normalize(gold))


def compile_answer_regex(answer_regex: str) -> re.Pattern:
    """`answer_regex` compiled; one-line ValueError when it is not a valid regular expression."""
    try:
        return re.compile(answer_regex)
    except re.error as error:
        raise ValueError(f"answer_regex {answer_regex!r} is not a valid regular expression ({error}); fix it, "
                         r"e.g. '#### (-?[\d,.]+)'") from None


def scorer(metric: str, answer_regex: str | None = None) -> Callable[[str, str], float]:
    """score(generation, reference) in [0, 1] for `metric` (one of `GENERATIVE_METRICS`)."""
    if metric == "exact_match":
        return exact_match
    if metric == "f1":
        return token_f1
    if metric == "rouge_l":
        return rouge_l
    if metric == "regex_match":
        if not answer_regex:
            raise ValueError("metric 'regex_match' needs an answer_regex, e.g. '#### (-?[\\d,.]+)'")
        pattern = compile_answer_regex(answer_regex)
        return lambda generation, reference: regex_match(generation, reference, pattern)
    raise ValueError(f"unknown generative metric '{metric}'; choose one of: {', '.join(GENERATIVE_METRICS)}")


def best_over_references(score: Callable[[str, str], float], generation: str, references: Sequence[str]) -> float:
    """The best score of `generation` against any of `references` (SQuAD's max over gold answers)."""
    return max(score(generation, reference) for reference in references)
