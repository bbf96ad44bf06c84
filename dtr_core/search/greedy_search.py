"""Candidate evaluators for the greedy search (dtr_core/search/decisions.py): the paper's plain cost, and the fast
scorer (dtr_core/search/scorer.py) driving the same search to the same answer.

`PlainEvaluator` scores each candidate `committed + (l,)` with one full forward per validation batch:
the paper's cost, L layer-forwards per batch per candidate, L(L+1)/2 candidate evaluations per search.
It is the plain form the fast scorer is tested against (tests/test_search.py, tests/test_scorer.py).

`FastEvaluator` is the same `greedy.ScoreCandidates` on the fast scorer: it keeps one
`scorer.CommittedHybrid` for the whole search (advanced by one committed layer per round, so the full
traced pass happens once) and builds a `scorer.RoundScorer` per round, which orders the candidates and
scores them with prefix reuse and exact early rejection. The Prefect flow uses the same `RoundScorer`
one candidate per task (tasks/candidates.py).

`run_greedy_search` is phase 2 on one model in one process (library, CLI and benchmarks).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from dtr_core.search.acceptance import Acceptance, Tolerance
from dtr_core.evaluation.results import EvalResult, summarize
from dtr_core.evaluation.scoring import EncodedBatch, encode, model_logits, score_logits
from dtr_core.evaluation.tasks import Task
from dtr_core.search.decisions import CandidateScore, GreedyResult, RoundRecord, greedy_replace
from dtr_core.search.scorer import DEFAULT_CACHE_LIMIT_BYTES, CommittedHybrid, RoundScorer, SearchCost, kept_layers
from dtr_core.hybrid.surgery import num_layers, restore_layers, swap_layers

__all__ = [
    "FastEvaluator",
    "PlainEvaluator",
    "SearchCost",
    "encode_split",
    "run_greedy_search",
]


def encode_split(
    task: Task,
    tokenizer,
    split: str = "validation",
    limit: int | None = None,
    batch_size: int = 16,
    max_batch_tokens: int = 4096,
) -> list[EncodedBatch]:
    """The batches `evaluate` would build for the same arguments (same defaults), so scores agree exactly."""
    examples = task.split(split)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        examples = examples[:limit]
    return encode(task, examples, tokenizer, batch_size=batch_size, max_batch_tokens=max_batch_tokens)


class _Evaluator:
    """Shared part: the model, its students, the encoded validation batches, cost counters."""

    def __init__(
        self,
        model: PreTrainedModel,
        task: Task,
        batches: Sequence[EncodedBatch],
        students: Mapping[int, nn.Module],
        split: str = "validation",
    ):
        if not batches:
            raise ValueError("the evaluator needs at least one encoded batch")
        self.model = model
        self.task = task
        self.batches = list(batches)
        self.students = dict(students)
        self.split = split
        self.num_layers = num_layers(model)
        self.cost = SearchCost()

    @contextlib.contextmanager
    def _students_in(self, layers: Iterable[int]) -> Iterator[None]:
        """The students of `layers` swapped into the model for the block, the originals restored after it."""
        layers = list(layers)
        missing = [layer for layer in layers if layer not in self.students]
        if missing:
            raise ValueError(f"no student for layers {missing}; available: {sorted(self.students)}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers swapped twice: {layers}")
        originals = swap_layers(self.model, {layer: self.students[layer] for layer in layers})
        try:
            yield
        finally:
            restore_layers(self.model, originals)

    @contextlib.contextmanager
    def _hybrid(self, layers: Iterable[int]) -> Iterator[None]:
        """The model in eval and inference mode with `layers` swapped; as it was after the block."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self._students_in(layers), torch.inference_mode():
                yield
        finally:
            self.model.train(was_training)

    def _full_scores(self) -> EvalResult:
        """One full forward per batch of the model as it is now."""
        scores = [score_logits(batch, model_logits(self.model, batch)) for batch in self.batches]
        self.cost.count(self.num_layers, self.batches)
        return summarize(self.task, self.split, scores)

    def evaluate_layers(self, layers: Iterable[int] = ()) -> EvalResult:
        """Full evaluation of the hybrid with `layers` swapped (the teacher when empty)."""
        start = time.perf_counter()
        with self._hybrid(layers):
            result = self._full_scores()
        self.cost.full_evaluations += 1
        self.cost.seconds += time.perf_counter() - start
        return result

    def _check(self, committed: Sequence[int], candidates: Sequence[int]) -> None:
        overlap = set(committed) & set(candidates)
        if overlap:
            raise ValueError(f"candidates {sorted(overlap)} are already committed")


class PlainEvaluator(_Evaluator):
    """The paper's cost: every candidate is one full forward per batch. A `greedy.ScoreCandidates`."""

    def __call__(
        self, committed: tuple[int, ...], candidates: list[int], order_hint: Mapping[int, float] | None = None
    ) -> dict[int, CandidateScore]:
        self._check(committed, candidates)
        start = time.perf_counter()
        results: dict[int, CandidateScore] = {}
        with self._hybrid(committed):
            for layer in sorted(candidates):
                with self._students_in([layer]):
                    result = self._full_scores()
                self.cost.batch_evaluations += len(self.batches)
                self.cost.candidate_evaluations += 1
                self.cost.completed_evaluations += 1
                results[layer] = CandidateScore(result.score, tuple(result.per_example))
        self.cost.seconds += time.perf_counter() - start
        return results


class FastEvaluator(_Evaluator):
    """The fast scorer as a `greedy.ScoreCandidates`; same answers as `PlainEvaluator`.

    `first_hint`: ordering used when the search gives none (round 0), e.g. negated distillation losses.
    `early_rejection=False` keeps only the prefix reuse (for measuring each part). `cache_limit_bytes`:
    see `scorer.CommittedHybrid`. The model is never modified (the hybrid is a private copy); the students
    must not change between calls: the hybrid and its traces are kept for the next round (`release()`
    frees them).
    """

    def __init__(
        self,
        *evaluator_args,
        early_rejection: bool = True,
        cache_limit_bytes: int | None = DEFAULT_CACHE_LIMIT_BYTES,
        first_hint: Mapping[int, float] | None = None,
        **evaluator_kwargs,
    ):
        """`evaluator_args`, `evaluator_kwargs`: those of `PlainEvaluator` (model, task, batches, students, split)."""
        super().__init__(*evaluator_args, **evaluator_kwargs)
        self.early_rejection = early_rejection
        self.cache_limit_bytes = cache_limit_bytes
        self.first_hint = dict(first_hint) if first_hint is not None else None
        self.kept_layers = kept_layers(self.model, self.batches, cache_limit_bytes)
        self._committed_hybrid: CommittedHybrid | None = None

    def _hybrid_at(self, committed: Sequence[int]) -> CommittedHybrid:
        """The kept hybrid advanced to `committed` when that adds at most one layer to it, else a new one."""
        hybrid, now = self._committed_hybrid, set(committed)
        if hybrid is not None and set(hybrid.committed) <= now and len(now - set(hybrid.committed)) <= 1:
            for layer in now - set(hybrid.committed):
                hybrid.commit(layer)
            return hybrid
        self._committed_hybrid = None  # free the old copy and traces before building the new ones
        self._committed_hybrid = CommittedHybrid(self.model, self.batches, self.students, tuple(committed),
                                                 self.cache_limit_bytes, cost=self.cost)
        return self._committed_hybrid

    def release(self) -> None:
        """Drop the kept hybrid and its traces."""
        self._committed_hybrid = None

    def __call__(
        self, committed: tuple[int, ...], candidates: list[int], order_hint: Mapping[int, float] | None = None
    ) -> dict[int, CandidateScore]:
        self._check(committed, candidates)
        start = time.perf_counter()
        scorer = RoundScorer(self._hybrid_at(committed), self.task, self.split, self.early_rejection)
        hint = order_hint if order_hint is not None else self.first_hint
        results = {layer: scorer.score(layer) for layer in scorer.order(candidates, hint)}
        self.cost.seconds += time.perf_counter() - start
        return {layer: results[layer] for layer in sorted(results)}


def run_greedy_search(
    model: PreTrainedModel,
    task: Task,
    batches: Sequence[EncodedBatch],
    students: Mapping[int, nn.Module],
    tolerance: Tolerance = Tolerance(),
    acceptance: Acceptance = Acceptance(),
    *,
    fast: bool = True,
    max_layers: int | None = None,
    target_fraction: float | None = None,
    teacher: EvalResult | None = None,
    on_round=None,
    completed_rounds: Sequence[RoundRecord] = (),
    split: str = "validation",
    **fast_options,
) -> tuple[GreedyResult, EvalResult, SearchCost]:
    """Phase 2 on one model: teacher score, then `greedy_replace` with the plain or fast evaluator.

    Returns (result, teacher evaluation, cost). `fast_options` go to `FastEvaluator`. The fast evaluator's
    hybrid and traces are freed when the search ends.
    """
    if fast:
        evaluator: _Evaluator = FastEvaluator(model, task, batches, students, split, **fast_options)
    else:
        if fast_options:
            raise ValueError(f"options {sorted(fast_options)} only apply to the fast evaluator")
        evaluator = PlainEvaluator(model, task, batches, students, split)
    if teacher is None:
        teacher = evaluator.evaluate_layers(())
    result = greedy_replace(
        evaluator,
        num_layers(model),
        students.keys(),
        teacher.score,
        tolerance,
        acceptance,
        teacher_per_example=teacher.per_example,
        max_layers=max_layers,
        target_fraction=target_fraction,
        on_round=on_round,
        completed_rounds=completed_rounds,
    )
    if isinstance(evaluator, FastEvaluator):
        evaluator.release()
    return result, teacher, evaluator.cost
