"""Candidate evaluators for the greedy search (dtr_core/greedy.py): the paper's plain cost, and a fast one
that returns the same answer.

`PlainEvaluator` scores each candidate `committed + (l,)` with one full forward per validation batch:
the paper's cost, L layer-forwards per batch per candidate, L(L+1)/2 candidate evaluations per search.

`FastEvaluator` removes work that cannot change the answer (the paper's "known weaknesses", first item):
1. Prefix reuse. It runs the current hybrid over the validation batches and keeps the hidden states
   entering every layer (`layerwise.trace_batch`). Candidate l then runs only layers l..L-1 (layer l
   swapped) + final norm + LM head, from the cached states: L - l layer-forwards per batch instead of L.
   The logits are bit-identical to a full forward (tests/test_search.py). Between rounds the cache is
   kept: after l* is committed only the states entering layers above l* are recomputed
   (`layerwise.retrace_from`), so the full traced pass happens once per search.
2. Exact early rejection. Candidates are scored batch by batch; after each batch, the best score the
   candidate could still reach (`metrics.score_upper_bound`: every unseen example correct, or every unseen
   token at 0 nats) is compared with the round's best full score so far. Classification (accuracy) uses
   integer counts, so ties are exact: a candidate is dropped when its bound is below the best, or equal to
   it while the best has the lower layer index (ties go to the lowest index, as `select_next_layer`).
   Language modelling (1/perplexity) drops only when the bound is below the best by more than a relative
   1e-9 (float summation order differs between the bound and `summarize`; never an exact tie there).
   A dropped candidate cannot be the argmax, so the chosen layer, its score and every fully evaluated
   score equal the plain search's.
3. Ordering. Batches are scored cheapest per example first. Every candidate first sees one batch (it
   would anyway: no bound fires before a batch is seen). Candidates are then completed in descending
   order of last round's score (`order_hint`, or `first_hint` in round 0), then of that first-batch
   partial score, so a strong candidate sets a high bar early; the order changes the cost, never the
   answer.

Cost units (`SearchCost`): a layer-forward is one decoder layer applied to one batch; a candidate
evaluation is one candidate started (completed + rejected). Memory: the prefix cache holds
sum(R x T) x hidden x L floats (`layerwise.hidden_bytes`); over `cache_limit_bytes` only every s-th layer
is kept and candidates recompute from the nearest kept layer (more layer-forwards, same answer).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from dtr_core import layerwise
from dtr_core.acceptance import Acceptance, Tolerance
from dtr_core.evaluation.results import EvalResult, summarize
from dtr_core.evaluation.scoring import BatchScores, EncodedBatch, encode, model_logits, score_logits
from dtr_core.evaluation.tasks import Task
from dtr_core.greedy import CandidateScore, GreedyResult, RoundRecord, greedy_replace
from dtr_core.surgery import num_layers, restore_layers, swap_layers

__all__ = [
    "FastEvaluator",
    "PlainEvaluator",
    "SearchCost",
    "encode_split",
    "run_greedy_search",
]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_LIMIT_BYTES = 2 * 1024**3  # why: 200 x 64-token prompts x 30 layers of SmolLM2-135M is ~0.9 GB
_LM_BOUND_SLACK = 1e-9  # relative; float sums in another order differ by ~1e-15


@dataclass
class SearchCost:
    """Work done by an evaluator (see the module docstring for the units)."""

    layer_forwards: int = 0
    layer_tokens: int = 0  # layer-forwards weighted by the batch's padded size R x T (closer to CPU time)
    candidate_evaluations: int = 0
    completed_evaluations: int = 0
    rejected_early: int = 0
    batch_evaluations: int = 0  # (candidate, batch) pairs scored
    trace_passes: int = 0  # full forwards that filled the prefix cache
    full_evaluations: int = 0  # plain full-model evaluations (teacher, chosen hybrids)
    cache_bytes: int = 0  # largest prefix cache held
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


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


def _model_inputs(model: PreTrainedModel, batch: EncodedBatch) -> dict:
    """Exactly the forward arguments of `scoring.model_logits`, so a traced forward is that forward."""
    device = next(model.parameters()).device
    inputs = {
        "input_ids": batch.input_ids.to(device),
        "attention_mask": batch.attention_mask.to(device),
        "use_cache": False,
    }
    if batch.logit_positions.numel() < batch.input_ids.shape[1]:
        inputs["logits_to_keep"] = batch.logit_positions.to(device)
    return inputs


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
        self.num_examples = sum(batch.num_examples for batch in self.batches)
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

    def _summarize(self, scores: Sequence[BatchScores]) -> EvalResult:
        return summarize(self.task, self.split, scores)

    def evaluate_layers(self, layers: Iterable[int] = ()) -> EvalResult:
        """Full evaluation of the hybrid with `layers` swapped (the teacher when empty)."""
        start = time.perf_counter()
        with self._hybrid(layers):
            scores = [score_logits(batch, model_logits(self.model, batch)) for batch in self.batches]
        self._count(self.num_layers, self.batches)
        self.cost.full_evaluations += 1
        self.cost.seconds += time.perf_counter() - start
        return self._summarize(scores)

    def _count(self, layers: int, batches: Iterable[EncodedBatch]) -> None:
        for batch in batches:
            self.cost.layer_forwards += layers
            self.cost.layer_tokens += layers * batch.input_ids.numel()

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
                    scores = [score_logits(batch, model_logits(self.model, batch)) for batch in self.batches]
                self._count(self.num_layers, self.batches)
                self.cost.batch_evaluations += len(self.batches)
                self.cost.candidate_evaluations += 1
                self.cost.completed_evaluations += 1
                result = self._summarize(scores)
                results[layer] = CandidateScore(result.score, tuple(result.per_example))
        self.cost.seconds += time.perf_counter() - start
        return results


class FastEvaluator(_Evaluator):
    """Prefix reuse + exact early rejection + hint ordering; same answers as `PlainEvaluator`.

    `first_hint`: ordering used when the search gives none (round 0), e.g. negated distillation losses.
    `early_rejection=False` keeps only the prefix reuse (for measuring each part).
    The model and the students must not change between calls: the hidden-state cache is kept for the next
    round (`release()` frees it).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        task: Task,
        batches: Sequence[EncodedBatch],
        students: Mapping[int, nn.Module],
        split: str = "validation",
        early_rejection: bool = True,
        cache_limit_bytes: int | None = DEFAULT_CACHE_LIMIT_BYTES,
        first_hint: Mapping[int, float] | None = None,
    ):
        super().__init__(model, task, batches, students, split)
        self.early_rejection = early_rejection
        self.cache_limit_bytes = cache_limit_bytes
        self.first_hint = dict(first_hint) if first_hint is not None else None
        tokens = sum(batch.input_ids.numel() for batch in self.batches)
        dtype = next(model.parameters()).dtype
        self.bytes_per_layer = layerwise.hidden_bytes(tokens, model.config.hidden_size, 1, dtype)
        self.kept_layers = layerwise.checkpoint_layers(self.num_layers, self.bytes_per_layer, cache_limit_bytes)
        if len(self.kept_layers) < self.num_layers:
            logger.warning(
                "prefix cache of %d layers x %.0f MB exceeds the %.0f MB limit: keeping layers %s only",
                self.num_layers, self.bytes_per_layer / 2**20, (cache_limit_bytes or 0) / 2**20, self.kept_layers,
            )  # fmt: skip
        # Candidates see the batches cheapest-per-example first: the bound tightens with examples seen, the
        # cost grows with tokens run. Any order gives the same scores (`summarize` sorts by example).
        self.batch_order = sorted(
            range(len(self.batches)),
            key=lambda i: (self.batches[i].input_ids.numel() / self.batches[i].num_examples, i),
        )
        self._traces: list[layerwise.BatchTrace] | None = None
        self._traced: frozenset[int] | None = None
        self.total_weight = None
        if task.kind == "language_modeling":
            self.total_weight = float(sum(int(batch.targets.numel()) for batch in self.batches))

    def _traces_for(self, committed: Sequence[int]) -> list[layerwise.BatchTrace]:
        """The hidden states entering each layer of the current hybrid (the model has `committed` swapped).

        1. Prefix reuse across rounds: when `committed` is last call's set plus one layer l*, only the states
        entering layers above l* change; they are recomputed from the kept state entering l*
        (`layerwise.retrace_from`). Otherwise one traced forward of the hybrid per batch.
        """
        now = frozenset(committed)
        previous = self._traced
        if self._traces is not None and previous is not None and previous <= now and len(now - previous) <= 1:
            for layer in now - previous:
                for batch, trace in zip(self.batches, self._traces):
                    self._count(layerwise.retrace_from(self.model, trace, layer), [batch])
        else:
            self._traces = None  # free the old cache before building the new one
            self._traces = [
                layerwise.trace_batch(self.model, _model_inputs(self.model, batch), keep=self.kept_layers)
                for batch in self.batches
            ]
            self.cost.trace_passes += 1
            self._count(self.num_layers, self.batches)
        self._traced = now
        self.cost.cache_bytes = max(self.cost.cache_bytes, sum(trace.nbytes() for trace in self._traces))
        return self._traces

    def release(self) -> None:
        """Drop the cached hidden states (they are kept between calls for the next round)."""
        self._traces, self._traced = None, None

    def _order(
        self, candidates: Sequence[int], hint: Mapping[int, float] | None, seen: Mapping[int, list[BatchScores]]
    ) -> list[int]:
        """Most promising first: last round's score (hint), then the first batch's partial score, then index."""
        hint = hint if hint is not None else (self.first_hint or {})

        def partial(layer: int) -> float:
            scores = seen[layer]
            if self.task.kind == "classification":
                return float(sum(s.values.sum().item() for s in scores))
            return -float(sum(s.values.sum().item() for s in scores))  # less NLL is better

        return sorted(candidates, key=lambda layer: (-hint.get(layer, float("-inf")), -partial(layer), layer))

    def _rejects(self, layer: int, seen: list[BatchScores], best: tuple[float, int, int] | None) -> float | None:
        """The candidate's upper bound if it can no longer be the argmax, else None."""
        if best is None:
            return None
        best_score, best_count, best_layer = best
        seen_examples = sum(s.example_index.numel() for s in seen)
        if self.task.kind == "classification":
            correct = int(sum(int(s.values.sum().item()) for s in seen))  # exact: 0/1 values
            reachable = correct + self.num_examples - seen_examples
            if reachable < best_count or (reachable == best_count and best_layer < layer):
                return reachable / self.num_examples
            return None
        if self.task.kind == "language_modeling":
            nll = float(sum(float(s.values.sum().item()) for s in seen))
            bound = float(torch.exp(torch.tensor(-nll / self.total_weight, dtype=torch.float64)))
            if bound < best_score * (1.0 - _LM_BOUND_SLACK):
                return bound
            return None
        return None  # unknown metric: no exact bound, no rejection

    def __call__(
        self, committed: tuple[int, ...], candidates: list[int], order_hint: Mapping[int, float] | None = None
    ) -> dict[int, CandidateScore]:
        self._check(committed, candidates)
        start = time.perf_counter()
        results: dict[int, CandidateScore] = {}
        with self._hybrid(committed):
            traces = self._traces_for(committed)
            # 2. every candidate sees the first batch (it would before any bound can fire anyway);
            #    its partial score orders the candidates when last round's scores are unknown
            seen = {layer: self._continue(layer, traces, [], best=None, stop=1)[0] for layer in candidates}
            best: tuple[float, int, int] | None = None  # (score, correct count, layer)
            for layer in self._order(candidates, order_hint, seen):
                results[layer], best = self._finish(layer, traces, seen[layer], best)
        self.cost.seconds += time.perf_counter() - start
        return {layer: results[layer] for layer in sorted(results)}

    def _continue(
        self,
        layer: int,
        traces: list[layerwise.BatchTrace],
        seen: list[BatchScores],
        best: tuple[float, int, int] | None,
        stop: int | None = None,
    ) -> tuple[list[BatchScores], float | None]:
        """Score `layer` on the next batches in `batch_order` (positions len(seen)..stop-1), checking the bound
        after each batch (and once before starting when some were already seen).
        Returns (scores so far, bound if rejected else None)."""
        stop = len(self.batches) if stop is None else min(stop, len(self.batches))
        seen = list(seen)
        if self.early_rejection and seen and len(seen) < len(self.batches):
            bound = self._rejects(layer, seen, best)
            if bound is not None:
                return seen, bound
        if len(seen) >= stop:
            return seen, None
        if not seen:
            self.cost.candidate_evaluations += 1
        with self._students_in([layer]):
            for position in range(len(seen), stop):
                index = self.batch_order[position]
                logits, spent = layerwise.logits_from(self.model, traces[index], layer)
                self._count(spent, [self.batches[index]])
                self.cost.batch_evaluations += 1
                seen.append(score_logits(self.batches[index], logits))
                if self.early_rejection and len(seen) < len(self.batches):
                    bound = self._rejects(layer, seen, best)
                    if bound is not None:
                        return seen, bound
        return seen, None

    def _finish(
        self,
        layer: int,
        traces: list[layerwise.BatchTrace],
        seen: list[BatchScores],
        best: tuple[float, int, int] | None,
    ) -> tuple[CandidateScore, tuple[float, int, int] | None]:
        """Complete `layer`'s evaluation unless the bound rejects it; update the round's best."""
        seen, bound = self._continue(layer, traces, seen, best)
        if bound is not None:
            self.cost.rejected_early += 1
            fraction = sum(s.example_index.numel() for s in seen) / self.num_examples
            return CandidateScore(None, None, fraction, rejected_early=True, upper_bound=bound), best
        self.cost.completed_evaluations += 1
        result = self._summarize(seen)
        count = int(round(sum(result.per_example))) if self.task.kind == "classification" else 0
        if best is None or result.score > best[0] or (result.score == best[0] and layer < best[2]):
            best = (result.score, count, layer)
        return CandidateScore(result.score, tuple(result.per_example)), best


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

    Returns (result, teacher evaluation, cost). `fast_options` go to `FastEvaluator`.
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
    return result, teacher, evaluator.cost
