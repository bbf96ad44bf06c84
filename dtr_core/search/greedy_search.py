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

`run_greedy_search` is phase 2 on one model in one process (library, CLI and benchmarks);
`run_continued_search` the heal-then-continue search after it (`dtr_core.heal.continued_search`), healing in
memory and scoring each stage with a `FastEvaluator` on that heal's students.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from dtr_core.search.acceptance import Acceptance, Tolerance
from dtr_core.evaluation.metrics import check_bootstrap_metric
from dtr_core.evaluation.generation import generative_result, regex_warning
from dtr_core.evaluation.results import EvalResult, summarize
from dtr_core.evaluation.scoring import EncodedBatch, encode, model_logits, score_logits
from dtr_core.evaluation.tasks import Task
from dtr_core.search.decisions import CandidateScore, GreedyResult, RoundRecord, greedy_replace, layer_cap
from dtr_core.search.scorer import DEFAULT_CACHE_LIMIT_BYTES, CommittedHybrid, RoundScorer, SearchCost, kept_layers
from dtr_core.hybrid.surgery import num_layers, restore_layers, swap_layers

logger = logging.getLogger(__name__)

__all__ = [
    "FastEvaluator",
    "PlainEvaluator",
    "SearchCost",
    "encode_split",
    "run_continued_search",
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
        """One full forward per batch of the model as it is now (a generative task: generation per batch)."""
        if self.task.kind == "generative":
            result = generative_result(self.model, self.task, self.split, self.batches)
            self.cost.count(self.num_layers, self.batches)
            return result
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

    Returns (result, teacher evaluation, cost). `fast_options` go to `FastEvaluator`; a generative task always
    runs the plain evaluator (no early rejection; `search.generation_scorer`). The fast evaluator's
    hybrid and traces are freed when the search ends. Bootstrap acceptance with a metric it cannot resample
    (`metrics.BOOTSTRAP_METRICS`) is refused before any work.
    """
    if acceptance.mode == "bootstrap":
        check_bootstrap_metric(task.metric, f"task '{task.name}'")
    if task.kind == "generative":  # scored by generation: the plain evaluator (`search.generation_scorer`)
        fast, fast_options = False, {}
    if fast:
        evaluator: _Evaluator = FastEvaluator(model, task, batches, students, split, **fast_options)
    else:
        if fast_options:
            raise ValueError(f"options {sorted(fast_options)} only apply to the fast evaluator")
        evaluator = PlainEvaluator(model, task, batches, students, split)
    if teacher is None:
        teacher = evaluator.evaluate_layers(())
    warning = regex_warning(task, teacher.predictions)  # before the search starts
    if warning:
        logger.warning(warning)
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


def run_continued_search(
    model: PreTrainedModel,
    task: Task,
    batches: Sequence[EncodedBatch],
    students: Mapping[int, nn.Module],
    start_order: Sequence[int],
    heal_config,
    corpus,
    heal_every: int,
    tolerance: Tolerance = Tolerance(),
    acceptance: Acceptance = Acceptance(),
    *,
    max_layers: int | None = None,
    teacher: EvalResult | None = None,
    split: str = "validation",
):
    """Heal-then-continue on one model in one process: returns (`ContinuedResult`, {layer: student} of the final
    healed hybrid). `heal_config` is a `HealConfig`, `corpus` a `Corpus`; `students` are left as they are."""
    from dtr_core.heal.continued_search import HealStep, continue_with_healing
    from dtr_core.heal.training import heal
    from dtr_core.hybrid.model import make_hybrid
    from dtr_core.hybrid.surgery import attention_module

    stages: list[dict[int, nn.Module]] = []  # the students after each heal (the failed ones: unchanged)
    current = dict(students)
    if teacher is None:
        teacher = PlainEvaluator(model, task, batches, current, split).evaluate_layers(())

    def heal_stage(index: int, order: tuple[int, ...]) -> HealStep:
        hybrid = make_hybrid(model, {layer: copy.deepcopy(current[layer]) for layer in order})
        result = heal(model, hybrid, corpus, heal_config)
        if result.ok:
            current.update({layer: attention_module(hybrid, layer) for layer in order})
        stages.append(dict(current))
        if not result.ok:
            return HealStep(False, reason=result.reason)
        return HealStep(True, PlainEvaluator(model, task, batches, current, split).evaluate_layers(order).score)

    def score_candidates(heal_index: int, committed, candidates, hint):
        evaluator_class = PlainEvaluator if task.kind == "generative" else FastEvaluator  # generation: plain
        evaluator = evaluator_class(model, task, batches, stages[heal_index], split)
        return evaluator(committed, candidates, hint)

    result = continue_with_healing(heal_stage, score_candidates, students.keys(), start_order, teacher.score,
                                   tolerance, heal_every, acceptance, teacher_per_example=teacher.per_example,
                                   cap=layer_cap(num_layers(model), max_layers))
    final = {layer: current[layer] for layer in result.healed_layers}
    return result, final
