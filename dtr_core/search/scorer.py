"""The fast greedy scorer: the candidates of one round of DtR's greedy search (dtr_core/search/decisions.py), scored one
at a time, with exactly the scores a full forward of every candidate gives.

A round has the committed hybrid M (the teacher with the committed layers' students swapped in) and scores
M + l for every candidate layer l on the validation batches. Two pieces:

`CommittedHybrid`: M as a private copy of the teacher (the teacher is never modified), and its traces per
batch: the hidden states entering every kept decoder layer and each layer's keyword arguments
(`layerwise.trace_batch`). Swapping layer l leaves layers 0..l-1 unchanged, so candidate l runs layers
l..L-1 only, from the state entering l (prefix reuse): L - l layer-forwards per batch instead of L.
`commit(l)` advances M to the next round: only the states entering layers above l are recomputed
(`layerwise.retrace_from`), so a search that keeps one `CommittedHybrid` runs one full traced pass in all.
Memory: all layers' states cost sum(R x T) x hidden x L floats (`layerwise.hidden_bytes`); over
`cache_limit_bytes` only every s-th layer is kept and candidates restart from the nearest kept layer below
(more layer-forwards, the same logits).

`RoundScorer`: the per-round unit, built once per round on M's traces. `score(l)` is thread-safe and never
swaps anything in place: it runs a shallow copy of decoder layer l whose attention is the student
(`layerwise.logits_from(..., substitute=...)`), so threads score candidates of a round concurrently. The
logits equal a full forward of M + l bit for bit (tests/test_scorer.py).
1. Exact early rejection, shared by every thread of the round: after each batch, the best score the
   candidate can still reach is compared with the round's best full score so far (`rejected`). The bound is
   the task metric's own: for classification metrics (accuracy, macro_f1, balanced_accuracy, recall:<class>)
   the metric of the confusion counts so far completed with every unseen example predicted right (their
   gold labels are in the batches; `metrics.classification_upper_bound`, which proves it), for perplexity
   `metrics.score_upper_bound`. A candidate that can no longer be the round's argmax stops there and comes back with
   `score=None` and its bound. Which candidates are dropped depends on the order (with threads, on timing);
   the chosen layer and every full score never do.
2. Order: every candidate sees the batches cheapest per example first (the bound tightens with examples
   seen, the cost grows with tokens run; `summarize` sorts by example, so any order gives the same score).
   `order(candidates, hint)` scores every candidate's first batch (which it needs anyway: no bound fires
   before a batch is seen) and returns them most promising first: the hint (last round's scores or
   bounds), then that first batch's partial score, then the layer; `score` continues from that batch. A
   strong candidate scored early sets a high bar; the order changes the cost, never an answer.

Cost units (`SearchCost`): a layer-forward is one decoder layer applied to one batch; a candidate evaluation
is one candidate started (completed + rejected early).
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from dtr_core.search import layerwise
from dtr_core.evaluation.metrics import Confusion, classification_upper_bound, score_upper_bound
from dtr_core.evaluation.results import summarize
from dtr_core.evaluation.scoring import BatchScores, EncodedBatch, model_inputs, score_logits
from dtr_core.evaluation.tasks import Task
from dtr_core.search.decisions import CandidateScore
from dtr_core.hybrid.surgery import attention_name, decoder_layers, num_layers, swap_layers

__all__ = [
    "DEFAULT_CACHE_LIMIT_BYTES",
    "CommittedHybrid",
    "RoundScorer",
    "SearchCost",
    "kept_layers",
    "rejected",
]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_LIMIT_BYTES = 2 * 1024**3  # why: 200 x 64-token prompts x 30 layers of SmolLM2-135M is ~0.9 GB
LM_BOUND_SLACK = 1e-9  # relative; the bound and `perplexity` sum floats in other orders (~1e-15 apart)


@dataclass
class SearchCost:
    """Work done by a scorer or evaluator (see the module docstring for the units)."""

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

    def count(self, layers: int, batches: Iterable[EncodedBatch]) -> None:
        """`layers` layer-forwards on each of `batches`."""
        for batch in batches:
            self.layer_forwards += layers
            self.layer_tokens += layers * batch.input_ids.numel()

    def to_dict(self) -> dict:
        return asdict(self)


def rejected(kind: str, bound: float, best: tuple[float, int] | None, layer: int) -> bool:
    """Can candidate `layer`, whose final score is at most `bound`, no longer be the round's argmax?

    `best`: (score, layer) of the round's best fully scored candidate so far. `select_next_layer` takes the
    highest score, ties to the lowest layer, so `layer` is out when its bound is below the best, or equal to
    it while the best has the lower index (classification: the bound is never below the float of the final
    score, for every metric; see `metrics.py`).
    Language modelling compares with a relative slack `LM_BOUND_SLACK` and never drops on a tie. A dropped
    candidate's true score is <= its bound, so the argmax, its score and every full score stay those of a
    search without rejection.
    """
    if best is None:
        return False
    best_score, best_layer = best
    if kind == "classification":
        return bound < best_score or (bound == best_score and best_layer < layer)
    return bound < best_score * (1.0 - LM_BOUND_SLACK)


def kept_layers(model: PreTrainedModel, batches: Sequence[EncodedBatch], limit_bytes: int | None) -> tuple[int, ...]:
    """The layers whose entering hidden states a `CommittedHybrid` keeps for `batches` under `limit_bytes`."""
    tokens = sum(batch.input_ids.numel() for batch in batches)
    per_layer = layerwise.hidden_bytes(tokens, model.config.hidden_size, 1, next(model.parameters()).dtype)
    return layerwise.checkpoint_layers(num_layers(model), per_layer, limit_bytes)


class CommittedHybrid:
    """M: a private copy of `teacher` with the `committed` students swapped in, and its traces per batch.

    `students` maps layer -> distilled student (shared, read-only, in eval mode); `batches` are the encoded
    validation batches (`search.encode_split`). `cost` (optional) accumulates the traced layer-forwards.
    """

    def __init__(
        self,
        teacher: PreTrainedModel,
        batches: Sequence[EncodedBatch],
        students: Mapping[int, nn.Module],
        committed: Sequence[int] = (),
        cache_limit_bytes: int | None = DEFAULT_CACHE_LIMIT_BYTES,
        cost: SearchCost | None = None,
    ):
        if not batches:
            raise ValueError("the scorer needs at least one encoded batch")
        missing = [layer for layer in committed if layer not in students]
        if missing:
            raise ValueError(f"no student for committed layers {missing}; available: {sorted(students)}")
        if len(set(committed)) != len(committed):
            raise ValueError(f"layers committed twice: {list(committed)}")
        started = time.perf_counter()
        self.batches = list(batches)
        self.students = dict(students)
        self.cost = cost if cost is not None else SearchCost()
        self.num_layers = num_layers(teacher)
        self.kept_layers = kept_layers(teacher, self.batches, cache_limit_bytes)
        if len(self.kept_layers) < self.num_layers:
            logger.warning("prefix cache of %d layers exceeds the %.0f MB limit: keeping layers %s only",
                           self.num_layers, (cache_limit_bytes or 0) / 2**20, self.kept_layers)
        self.model = copy.deepcopy(teacher).eval()  # the teacher's class, so logits are `evaluate`'s bit for bit
        swap_layers(self.model, {layer: self.students[layer] for layer in committed})
        self.committed = tuple(committed)
        with torch.inference_mode():
            self.traces = [layerwise.trace_batch(self.model, model_inputs(self.model, batch), keep=self.kept_layers)
                           for batch in self.batches]
        self.cost.trace_passes += 1
        self.cost.count(self.num_layers, self.batches)
        self._note_cache()
        self.trace_seconds = time.perf_counter() - started

    def commit(self, layer: int) -> None:
        """Swap `layer`'s student into M and recompute the kept states entering the layers above it."""
        if layer in self.committed or layer not in self.students:
            raise ValueError(f"cannot commit layer {layer}: committed {list(self.committed)}, "
                             f"students for {sorted(self.students)}")
        started = time.perf_counter()
        swap_layers(self.model, {layer: self.students[layer]})
        self.committed = (*self.committed, layer)
        with torch.inference_mode():
            for batch, trace in zip(self.batches, self.traces):
                self.cost.count(layerwise.retrace_from(self.model, trace, layer), [batch])
        self._note_cache()
        self.trace_seconds = time.perf_counter() - started

    def _note_cache(self) -> None:
        self.cost.cache_bytes = max(self.cost.cache_bytes, sum(trace.nbytes() for trace in self.traces))


class RoundScorer:
    """Scores `committed + (l,)` for the candidates l of one greedy round on `hybrid`; `score(l)` is thread-safe.

    Valid while `hybrid` stays at this round's committed layers (`score` raises once it has moved on).
    `early_rejection=False` scores every candidate fully (prefix reuse only).
    """

    def __init__(self, hybrid: CommittedHybrid, task: Task, split: str = "validation", early_rejection: bool = True):
        self.hybrid = hybrid
        self.committed = hybrid.committed
        self.task = task
        self.split = split
        self.early_rejection = early_rejection
        batches = hybrid.batches
        self.num_examples = sum(batch.num_examples for batch in batches)
        self.total_weight = float(sum(int(batch.targets.numel()) for batch in batches)) \
            if task.kind == "language_modeling" else float(self.num_examples)
        gold = torch.cat([batch.labels for batch in batches])
        self.gold_counts = tuple(torch.bincount(gold, minlength=batches[0].num_labels).tolist()) \
            if task.kind == "classification" else ()
        self.batch_order = sorted(range(len(batches)),
                                  key=lambda i: (batches[i].input_ids.numel() / batches[i].num_examples, i))
        self._lock = threading.Lock()
        self._best: tuple[float, int] | None = None  # (score, layer) of the round's best full score so far
        self._partial: dict[int, list[BatchScores]] = {}  # batches `order` scored ahead of `score`

    @property
    def cost(self) -> SearchCost:
        return self.hybrid.cost

    def _student_layer(self, layer: int) -> nn.Module:
        """Decoder layer `layer` of M with the student as attention; shares every other submodule with M."""
        if layer in self.committed:
            raise ValueError(f"candidate {layer} is already committed in this round ({list(self.committed)})")
        if layer not in self.hybrid.students:
            raise ValueError(f"no student for layer {layer}; available: {sorted(self.hybrid.students)}")
        if self.hybrid.committed != self.committed:
            raise RuntimeError(f"this round scorer is for committed={list(self.committed)}, but its hybrid has "
                               f"moved on to {list(self.hybrid.committed)}; build a RoundScorer for the new round")
        student = self.hybrid.students[layer]
        if getattr(student, "layer_idx", layer) != layer:
            raise ValueError(f"student built for layer {student.layer_idx} cannot replace layer {layer}")
        original = decoder_layers(self.hybrid.model)[layer]
        patched = copy.copy(original)
        patched._modules = dict(original._modules)  # a new dict: M's layer keeps its own attention
        patched._modules[attention_name(self.hybrid.model)] = student
        return patched

    def _next_batch(self, layer: int, patched: nn.Module, seen: list[BatchScores]) -> None:
        """Score `layer` on its next batch in `batch_order`, appending to `seen`."""
        index = self.batch_order[len(seen)]
        batch = self.hybrid.batches[index]
        logits, spent = layerwise.logits_from(self.hybrid.model, self.hybrid.traces[index], layer, {layer: patched})
        scores = score_logits(batch, logits)
        with self._lock:
            if not seen:
                self.cost.candidate_evaluations += 1
            self.cost.batch_evaluations += 1
            self.cost.count(spent, [batch])
        seen.append(scores)

    def _partial_score(self, seen: Sequence[BatchScores]) -> float:
        """Higher is better: correct answers so far, or minus the NLL so far."""
        total = float(sum(s.values.sum().item() for s in seen))
        return total if self.task.kind == "classification" else -total

    def order(self, candidates: Sequence[int], hint: Mapping[int, float] | None = None) -> list[int]:
        """`candidates` most promising first (module docstring); scores each one's first batch on the way."""
        patched = {layer: self._student_layer(layer) for layer in candidates}  # every error before any work
        with torch.inference_mode():
            for layer in candidates:
                seen = self._partial.setdefault(layer, [])
                if not seen:
                    self._next_batch(layer, patched[layer], seen)
        hint = hint or {}
        return sorted(candidates, key=lambda layer: (-hint.get(layer, float("-inf")),
                                                     -self._partial_score(self._partial[layer]), layer))

    def _bound(self, seen: Sequence[BatchScores]) -> float:
        if self.task.kind == "classification":
            counts = Confusion.from_indices(torch.cat([s.labels for s in seen]).tolist(),
                                            torch.cat([s.predictions for s in seen]).tolist(), len(self.gold_counts))
            remaining = [total - now for total, now in zip(self.gold_counts, counts.gold)]
            return classification_upper_bound(self.task.metric, counts, remaining, self.task.labels)
        values = torch.cat([s.values for s in seen]).tolist()
        weights = torch.cat([s.weights for s in seen]).tolist()
        return score_upper_bound(self.task.kind, values, weights, self.total_weight)

    def score(self, layer: int) -> CandidateScore:
        """Validation score of M with `layer` also swapped, or an early rejection with its bound."""
        patched = self._student_layer(layer)
        with self._lock:
            seen = self._partial.pop(layer, [])
        with torch.inference_mode():
            while len(seen) < len(self.batch_order):
                if seen and self.early_rejection:
                    with self._lock:
                        best = self._best
                    bound = self._bound(seen)
                    if rejected(self.task.kind, bound, best, layer):
                        with self._lock:
                            self.cost.rejected_early += 1
                        fraction = sum(s.example_index.numel() for s in seen) / self.num_examples
                        return CandidateScore(None, None, fraction, rejected_early=True, upper_bound=bound)
                self._next_batch(layer, patched, seen)
        result = summarize(self.task, self.split, seen)
        with self._lock:
            self.cost.completed_evaluations += 1
            best = self._best
            if best is None or result.score > best[0] or (result.score == best[0] and layer < best[1]):
                self._best = (result.score, layer)
        return CandidateScore(result.score, tuple(result.per_example))
