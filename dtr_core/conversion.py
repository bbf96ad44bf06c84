"""The pieces of a conversion that the pipeline (tasks/, flows/) needs from the core: the run's artifact
layout, and a thread-safe scorer of one greedy round whose candidates can be scored one at a time.

Artifact layout of one conversion (docs/DESIGN.md), every file written atomically:
```
runs/<run_id>/config.json                     the validated parameters (JSON)
runs/<run_id>/activations/                    dtr_core.capture (manifest.json written last)
runs/<run_id>/students/layer_007/             dtr_core.distill (meta.json written last)
runs/<run_id>/greedy/candidates/r03_l007.json one scored candidate of round 3 (resume inside a round)
runs/<run_id>/greedy/round_03.json            a finished round (dtr_core.greedy.RoundRecord)
runs/<run_id>/greedy/trajectory.json          the search's answer (GreedyResult)
runs/<run_id>/hybrids/{best,opt}/             dtr_core.export (dtr_export.json inside, written last)
runs/<run_id>/reports/                        evaluations, speed, plots
runs/<run_id>/summary.json                    written last of all: the run completed
```

`RoundScorer` is the fast evaluator of `dtr_core/search.py` cut so that every candidate of a round can be
its own (Prefect) task while sharing the round's work:
1. prefix reuse: built once per round (per process), it runs the current hybrid M over the validation
   batches and keeps the hidden states entering every layer (`layerwise.trace_batch`); candidate l then
   runs layers l..L-1 only, with its student in layer l;
2. no mutation: candidate l runs a shallow copy of decoder layer l whose `self_attn` is the student, so
   the shared model is never swapped in place and threads can score candidates of a round concurrently;
3. exact early rejection, shared between the threads of a process: a candidate is dropped as soon as
   even a perfect rest of the split could not beat (or tie with a lower layer index) the round's best
   fully scored candidate so far. Which candidates get dropped depends on timing; the chosen layer and
   every full score never do (the bound is exact; see `dtr_core/search.py`).
The model M is a private copy of the teacher with the committed students swapped in, run through the
teacher's own class, so its logits are those of `evaluate` on the same model (bit for bit; tested).
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from dtr_core import layerwise
from dtr_core.evaluation.results import summarize
from dtr_core.evaluation.scoring import BatchScores, EncodedBatch, score_logits
from dtr_core.evaluation.tasks import Task
from dtr_core.greedy import CandidateScore
from dtr_core.surgery import decoder_layers, num_layers, swap_layers

logger = logging.getLogger(__name__)

__all__ = ["RoundScorer", "RunLayout", "slug"]

_LM_BOUND_SLACK = 1e-9  # relative, as dtr_core/search.py: float sums in another order differ by ~1e-15


def slug(text: str, limit: int = 40) -> str:
    """A lowercase name safe in paths, MLflow model names and Prefect artifact keys."""
    text = Path(text).stem if ("/" in text or text.endswith(".json")) else text
    return (re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x")[:limit]


class RunLayout:
    """Paths of one conversion's artifacts (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def activations(self) -> Path:
        return self.root / "activations"

    @property
    def students(self) -> Path:
        return self.root / "students"

    @property
    def greedy(self) -> Path:
        return self.root / "greedy"

    def candidate(self, round_index: int, layer: int) -> Path:
        return self.greedy / "candidates" / f"r{round_index:02d}_l{layer:03d}.json"

    def round(self, round_index: int) -> Path:
        return self.greedy / f"round_{round_index:02d}.json"

    @property
    def trajectory(self) -> Path:
        return self.greedy / "trajectory.json"

    def hybrid(self, role: str) -> Path:
        return self.root / "hybrids" / role

    def alias_hybrid(self, role: str, target: str | Path) -> Path:
        """`hybrid(role)` becomes a relative symlink to the folder `target` (replacing what a resumed run left)."""
        link = self.hybrid(role)
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.is_dir():
            shutil.rmtree(link)
        link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)
        return link

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


def _model_inputs(model: PreTrainedModel, batch: EncodedBatch) -> dict[str, Any]:
    """Exactly the forward arguments of `evaluation.scoring.model_logits` for this model."""
    import inspect

    device = next(model.parameters()).device
    inputs: dict[str, Any] = {"input_ids": batch.input_ids.to(device),
                              "attention_mask": batch.attention_mask.to(device), "use_cache": False}
    if batch.logit_positions.numel() < batch.input_ids.shape[1] \
            and "logits_to_keep" in inspect.signature(model.forward).parameters:
        inputs["logits_to_keep"] = batch.logit_positions.to(device)
    return inputs


class RoundScorer:
    """Scores `committed + (l,)` for the candidates l of one greedy round; `score(l)` is thread-safe.

    `teacher` is copied (never modified); `students` maps layer -> distilled student (shared read-only,
    they must be in eval mode); `batches` are the encoded validation batches (`search.encode_split`).
    """

    def __init__(
        self,
        teacher: PreTrainedModel,
        task: Task,
        batches: Sequence[EncodedBatch],
        students: Mapping[int, nn.Module],
        committed: Sequence[int],
        split: str = "validation",
        early_rejection: bool = True,
    ):
        if not batches:
            raise ValueError("the round scorer needs at least one encoded batch")
        missing = [layer for layer in committed if layer not in students]
        if missing:
            raise ValueError(f"no student for committed layers {missing}; available: {sorted(students)}")
        self.task = task
        self.split = split
        self.batches = list(batches)
        self.students = dict(students)
        self.committed = tuple(committed)
        self.early_rejection = early_rejection
        self.num_examples = sum(batch.num_examples for batch in self.batches)
        self.total_weight = float(sum(int(b.targets.numel()) for b in self.batches)) \
            if task.kind == "language_modeling" else float(self.num_examples)
        started = time.perf_counter()
        self.model = copy.deepcopy(teacher).eval()  # M: the teacher's class, committed layers swapped
        swap_layers(self.model, {layer: self.students[layer] for layer in self.committed})
        self.num_layers = num_layers(self.model)
        with torch.inference_mode():
            self.traces = [layerwise.trace_batch(self.model, _model_inputs(self.model, batch),
                                                 keep=range(self.num_layers)) for batch in self.batches]
        self.trace_seconds = time.perf_counter() - started
        self._lock = threading.Lock()
        self._best: tuple[float, int, int] | None = None  # (score, correct count, layer) of the round so far

    def _patched_layer(self, layer: int) -> nn.Module:
        """Decoder layer `layer` with the student as attention; shares every other submodule."""
        original = decoder_layers(self.model)[layer]
        patched = copy.copy(original)
        patched._modules = dict(original._modules)  # a new dict: the original layer is untouched
        patched._modules["self_attn"] = self.students[layer]
        return patched

    def _logits(self, trace: layerwise.BatchTrace, layer: int, patched: nn.Module) -> torch.Tensor:
        """Logits of M + layer from the traced hidden states entering `layer` (mirrors layerwise.logits_from)."""
        layers = decoder_layers(self.model)
        hidden = trace.hidden[layer]
        for index in range(layer, self.num_layers):
            module = patched if index == layer else layers[index]
            out = module(hidden, **trace.layer_kwargs[index])
            hidden = out[0] if isinstance(out, tuple) else out
        return layerwise.head_logits(self.model, trace, hidden)

    def _rejects(self, layer: int, seen: list[BatchScores]) -> float | None:
        """The candidate's upper bound if it can no longer be the round's argmax, else None."""
        with self._lock:
            best = self._best
        if best is None:
            return None
        best_score, best_count, best_layer = best
        seen_examples = sum(s.example_index.numel() for s in seen)
        if self.task.kind == "classification":
            correct = int(sum(int(s.values.sum().item()) for s in seen))  # exact integer counts
            reachable = correct + self.num_examples - seen_examples
            if reachable < best_count or (reachable == best_count and best_layer < layer):
                return reachable / self.num_examples
            return None
        if self.task.kind == "language_modeling":
            nll = float(sum(float(s.values.sum().item()) for s in seen))
            bound = float(torch.exp(torch.tensor(-nll / self.total_weight, dtype=torch.float64)))
            return bound if bound < best_score * (1.0 - _LM_BOUND_SLACK) else None
        return None

    def score(self, layer: int) -> CandidateScore:
        """Validation score of M with `layer` also swapped (or an early rejection with its bound)."""
        if layer in self.committed:
            raise ValueError(f"layer {layer} is already committed in this round ({self.committed})")
        if layer not in self.students:
            raise ValueError(f"no student for layer {layer}; available: {sorted(self.students)}")
        patched = self._patched_layer(layer)
        seen: list[BatchScores] = []
        with torch.inference_mode():
            for trace, batch in zip(self.traces, self.batches):
                seen.append(score_logits(batch, self._logits(trace, layer, patched)))
                if self.early_rejection and len(seen) < len(self.batches):
                    bound = self._rejects(layer, seen)
                    if bound is not None:
                        fraction = sum(s.example_index.numel() for s in seen) / self.num_examples
                        return CandidateScore(None, None, fraction, rejected_early=True, upper_bound=bound)
        result = summarize(self.task, self.split, seen)
        count = int(round(sum(result.per_example))) if self.task.kind == "classification" else 0
        with self._lock:
            best = self._best
            if best is None or result.score > best[0] or (result.score == best[0] and layer < best[2]):
                self._best = (result.score, count, layer)
        return CandidateScore(result.score, tuple(result.per_example))
