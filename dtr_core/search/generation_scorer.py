"""The round scorer of generative tasks: every candidate answers every validation prompt.

A generative task is scored by what the hybrid generates (`dtr_core.evaluation.generation`), token after token
through the hybrid cache, so the fast scorer's prefix reuse (one traced forward, logits from the layers above a
candidate) does not apply. `GenerationRoundScorer` has `RoundScorer`'s interface (`score(layer)`, thread-safe,
valid for one round's committed layers) and scores each candidate as the plain evaluator does: M (a private copy
of the teacher with the committed students) with the candidate's student swapped in, on every batch.

Early rejection: for exact_match and regex_match only (`EXACT_BOUND_METRICS`). Their per-example scores are 0
or 1, so after each batch the bound "every unseen example scores 1" (`metrics.score_upper_bound`) and the final
score are integer counts over the same N, and comparing the floats compares the counts exactly (as accuracy,
`metrics.py`); a candidate is dropped when its bound is below the round's best full score, or equal to it while
the best has the lower layer (the argmax's tie rule), so the search's answer is that of a search without
rejection. f1 and rouge_l take fractional values whose float sums depend on their order: those candidates are
always scored fully.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Mapping, Sequence

from torch import nn
from transformers import PreTrainedModel

from dtr_core.evaluation.generation import GenerationBatch, generate_greedy
from dtr_core.evaluation.metrics import score_upper_bound
from dtr_core.evaluation.tasks import GenerativeTask
from dtr_core.hybrid.surgery import num_layers, restore_layers, swap_layers
from dtr_core.search.decisions import CandidateScore
from dtr_core.search.scorer import SearchCost


EXACT_BOUND_METRICS = ("exact_match", "regex_match")  # 0/1 per example: the early-rejection bound is exact


class GenerationRoundScorer:
    """Scores `committed + (l,)` by generation for the candidates l of one round (module docstring).
    `early_rejection` applies to `EXACT_BOUND_METRICS` only."""

    def __init__(self, teacher: PreTrainedModel, batches: Sequence[GenerationBatch], students: Mapping[int, nn.Module],
                 committed: Sequence[int], task: GenerativeTask, split: str = "validation",
                 cost: SearchCost | None = None, early_rejection: bool = True):
        if not batches:
            raise ValueError("the scorer needs at least one batch of prompts")
        missing = [layer for layer in committed if layer not in students]
        if missing:
            raise ValueError(f"no student for committed layers {missing}; available: {sorted(students)}")
        started = time.perf_counter()
        self.batches = list(batches)
        self.students = dict(students)
        self.committed = tuple(committed)
        self.task = task
        self.split = split
        self.cost = cost if cost is not None else SearchCost()
        self.num_layers = num_layers(teacher)
        self.model = copy.deepcopy(teacher).eval()
        swap_layers(self.model, {layer: self.students[layer] for layer in self.committed})
        self.early_rejection = early_rejection and task.metric in EXACT_BOUND_METRICS
        self.num_examples = sum(batch.num_examples for batch in self.batches)
        self._best: tuple[float, int] | None = None  # (score, layer) of the round's best full score so far
        self._lock = threading.Lock()  # candidates take turns on M
        self.trace_seconds = time.perf_counter() - started

    def _rejected(self, bound: float, layer: int) -> bool:
        """Can `layer`, whose final score is at most `bound`, no longer be the round's argmax? (exact floats)"""
        if self._best is None:
            return False
        best_score, best_layer = self._best
        return bound < best_score or (bound == best_score and best_layer < layer)

    def score(self, layer: int) -> CandidateScore:
        """Validation score of M with `layer` also swapped, or an early rejection with its bound."""
        if layer in self.committed:
            raise ValueError(f"candidate {layer} is already committed in this round ({list(self.committed)})")
        if layer not in self.students:
            raise ValueError(f"no student for layer {layer}; available: {sorted(self.students)}")
        with self._lock:
            self.cost.candidate_evaluations += 1
            originals = swap_layers(self.model, {layer: self.students[layer]})
            try:
                seen: list[float] = []
                for index, batch in enumerate(self.batches):
                    if index and self.early_rejection:
                        bound = score_upper_bound("generative", seen, [1.0] * len(seen), self.num_examples)
                        if self._rejected(bound, layer):
                            self.cost.rejected_early += 1
                            return CandidateScore(None, None, len(seen) / self.num_examples, rejected_early=True,
                                                  upper_bound=bound)
                    answers = generate_greedy(self.model, batch.tokenizer, batch.input_ids, batch.attention_mask,
                                              self.task.max_new_tokens, self.task.stop)
                    seen += self.task.example_scores(answers, batch.examples)
                    self.cost.batch_evaluations += 1
                    self.cost.count(self.num_layers, [batch])
            finally:
                restore_layers(self.model, originals)
            per_example = [0.0] * self.num_examples  # back to the order of `encode_prompts`
            for value, index in zip(seen, (i for batch in self.batches for i in batch.example_index.tolist())):
                per_example[index] = value
            score = sum(per_example) / len(per_example)  # `generative_result`'s float, bit for bit
            self.cost.completed_evaluations += 1
            if self._best is None or score > self._best[0] or (score == self._best[0] and layer < self._best[1]):
                self._best = (score, layer)
        return CandidateScore(score, tuple(per_example))
