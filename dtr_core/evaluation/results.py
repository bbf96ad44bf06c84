"""`evaluate(model, tokenizer, task, split)`: encode, forward, score and summarise into an `EvalResult`.

`summarize` turns the `BatchScores` of any logits source into the same `EvalResult`, so the fast search
reports exactly what `evaluate` would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from dtr_core.evaluation import metrics
from dtr_core.evaluation.registry import get_task
from dtr_core.evaluation.scoring import BatchScores, encode, model_logits, score_logits
from dtr_core.evaluation.tasks import ClassificationTask, GenerativeTask, Task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """A task score with its per-example evidence, in split order.

    `score` is higher-is-better: the task's `metric` (accuracy, macro_f1, balanced_accuracy, recall:<class>,
    or 1/perplexity; see `tasks.py`, `metrics.py`); `metrics` holds it with the other classification metrics.
    `per_example` / `weights` are what `metrics.aggregate_score` and `metrics.score_upper_bound` take:
    correctness 0/1 with weight 1, a generated answer's score in [0, 1] with weight 1 (its text in
    `predictions`, `label_logprobs` empty; `generation.generative_result`), or a document's summed NLL (nats)
    with its number of scored tokens.
    `label_logprobs[i][c]` is the summed log-likelihood of label c's continuation (LM: of the document);
    `verbaliser_scoring` says how labels were compared (`scoring.py`; None for language modelling).
    """

    task: str
    split: str
    metric: str
    score: float
    metrics: dict[str, float]
    n: int
    per_example: tuple[float, ...]
    weights: tuple[float, ...]
    predictions: tuple[str | None, ...]
    label_logprobs: tuple[tuple[float, ...], ...]
    higher_is_better: bool = True
    seconds: float = 0.0
    verbaliser_scoring: str | None = None

    def to_dict(self, per_example: bool = False) -> dict:
        """JSON-able summary; with `per_example`, also the per-example lists."""
        data = asdict(self)
        if not per_example:
            for key in ("per_example", "weights", "predictions", "label_logprobs"):
                data.pop(key)
        return data


def summarize(task: Task, split: str, batch_scores: Sequence[BatchScores], seconds: float = 0.0) -> EvalResult:
    """Merge the scores of all batches of one `encode` call into an `EvalResult` (original order)."""
    if not batch_scores:
        raise ValueError("summarize needs at least one batch of scores")
    index = torch.cat([s.example_index for s in batch_scores])
    order = torch.argsort(index)
    if not torch.equal(index[order], torch.arange(index.numel())):
        raise ValueError("batch scores do not cover examples 0..n-1 exactly once; pass every batch of one encode call")
    values = torch.cat([s.values for s in batch_scores])[order].tolist()
    weights = torch.cat([s.weights for s in batch_scores])[order].tolist()
    label_logprobs = torch.cat([s.label_logprobs for s in batch_scores])[order].tolist()
    n = len(values)
    scoring = None
    if isinstance(task, ClassificationTask):
        labels = task.labels
        gold_index = torch.cat([s.labels for s in batch_scores])[order].tolist()
        predicted_index = torch.cat([s.predictions for s in batch_scores])[order].tolist()
        summary, score = classification_summary(task, metrics.Confusion.from_indices(gold_index, predicted_index,
                                                                                     len(labels)))
        predictions: tuple[str | None, ...] = tuple(labels[i] for i in predicted_index)
        scoring = batch_scores[0].verbaliser_scoring
    else:
        perplexity = metrics.perplexity(values, weights)
        score = 1.0 / perplexity
        summary = {"perplexity": perplexity, "mean_nll": sum(values) / sum(weights), "tokens": float(sum(weights)),
                   "inverse_perplexity": score}
        predictions = (None,) * n
    return EvalResult(task=task.name, split=split, metric=task.metric, score=score, metrics=summary, n=n,
                      per_example=tuple(values), weights=tuple(weights), predictions=predictions,
                      label_logprobs=tuple(tuple(row) for row in label_logprobs),
                      higher_is_better=task.higher_is_better, seconds=seconds, verbaliser_scoring=scoring)


def classification_summary(task: ClassificationTask, confusion: metrics.Confusion) -> tuple[dict[str, float], float]:
    """({metric: value} for accuracy, macro_f1, balanced_accuracy and the task's metric; the task's score)."""
    names = dict.fromkeys(["accuracy", "macro_f1", "balanced_accuracy", task.metric])
    summary = {name: metrics.score_from_confusion(name, confusion, task.labels) for name in names}
    return summary, summary[task.metric]


def evaluate(model, tokenizer, task: Task | str, split: str = "validation", limit: int | None = None,
             batch_size: int = 16, max_batch_tokens: int = 4096) -> EvalResult:
    """Score `model` on the first `limit` examples (all when None) of `split` of `task`.

    Runs under `torch.inference_mode()` with the model in eval mode (its training flag is restored).
    """
    task = get_task(task)
    examples = task.split(split)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        examples = examples[:limit]
    start = time.perf_counter()
    batches = encode(task, examples, tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    if isinstance(task, GenerativeTask):
        from dtr_core.evaluation.generation import generative_result

        result = generative_result(model, task, split, batches)
        logger.info("%s/%s n=%d: %s %.4f (%.1f s)", task.name, split, result.n, task.metric, result.score,
                    result.seconds)
        return result
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            scores = [score_logits(batch, model_logits(model, batch)) for batch in batches]
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    result = summarize(task, split, scores, seconds)
    logger.info("%s/%s n=%d: %s %.4f (%.1f s)", task.name, split, result.n, task.metric,
                result.metrics[task.metric], seconds)
    return result
