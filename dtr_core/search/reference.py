"""DtR (Xia et al., arXiv 2601.11667) end to end, as one numbered listing on plain Python loops.

This is the method's documentation and the test oracle: the optimised path must choose the same swap
order and the same scores on the same inputs. That path is `greedy.greedy_replace` with its candidates
scored by the fast scorer `scorer.RoundScorer`, one per round: in the Prefect flow one candidate per task
(flows/replace.py -> tasks/candidates.py -> `tasks.runtime.round_scorer`; tests/test_flows.py), in the
library and benchmarks through `search.FastEvaluator` / `search.run_greedy_search` (tests/test_reference.py,
tests/test_scorer.py). This listing calls the library where a step *is* the method (distil, evaluate,
swap) and nothing else: no prefix reuse, no early rejection, no parallelism.

    1. corpus    a stream of distillation token rows (the teacher is run over them, nothing is stored)
    2. distil    for every layer l independently: train a linear-attention student on layer l's teacher
                 input -> output (teacher forcing, MSE); failed layers are never offered to the search
    3. greedy    P_base = P(teacher); P_min = P_base - tolerance * |P_base|
                 repeat: score every still-full layer swapped (one full evaluation each);
                         l* = argmax (ties: lowest layer); P* its score
                         if P* >= P_best: M_best = M + l*
                         if P* >= P_min:  M = M + l* (M_opt = M)   else stop
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import PreTrainedModel

from dtr_core.distill.block import distill_block
from dtr_core.distill.config import DistillConfig
from dtr_core.distill.corpus import Corpus
from dtr_core.distill.training import load_students
from dtr_core.evaluation import Task, evaluate
from dtr_core.hybrid.surgery import num_layers, restore_layers, swap_layers


def run_reference(
    model: PreTrainedModel,
    tokenizer,
    corpus: Corpus,
    task: Task,
    mixer_name: str,
    work_dir: str | os.PathLike,
    distill_config: DistillConfig = DistillConfig(),
    tolerance: float = 0.05,
    limit: int | None = None,
) -> dict:
    """The whole method on `model`. `corpus`: the distillation text's token stream; `tolerance`: relative
    (paper 0.05).

    Returns {"teacher_score", "p_min", "swap_order", "best_layers", "best_score", "opt_layers", "opt_score",
    "rounds": [{"scores": {layer: score}, "chosen", "score", "accepted"}]}.
    """
    # 1-2. distil every layer independently: its student learns layer l's attention from the teacher's own
    # inputs, the teacher streaming `corpus` (each student sees only its own layer's teacher activations)
    students_dir = Path(work_dir) / "students"
    for layer in range(num_layers(model)):
        distill_block(model, [layer], mixer_name, distill_config, corpus, students_dir)
    students = load_students(students_dir, model)  # failed layers are left out

    # 3. greedy replacement, every candidate scored by a full evaluation on the validation split
    def score(linear_layers: list[int]) -> float:
        originals = swap_layers(model, {layer: students[layer] for layer in linear_layers})
        try:
            return evaluate(model, tokenizer, task, "validation", limit=limit).score
        finally:
            restore_layers(model, originals)

    return greedy_listing(score, sorted(students), tolerance)


def greedy_listing(score, layers: list[int], tolerance: float) -> dict:
    """Step 3 on `score(linear_layers) -> P`: rounds until rejected or every layer in `layers` is linear."""
    p_base = score([])
    p_min = p_base - tolerance * abs(p_base)
    linear: list[int] = []  # M (in swap order); M_opt is M when the search stops
    best_layers: list[int] = []  # M_best
    best_score = opt_score = p_base
    rounds = []
    while True:
        candidates = [layer for layer in layers if layer not in linear]
        if not candidates:
            break
        scores = {layer: score(linear + [layer]) for layer in candidates}
        chosen = max(candidates, key=lambda layer: (scores[layer], -layer))  # ties -> lowest layer index
        p_star = scores[chosen]
        accepted = p_star >= p_min
        rounds.append({"scores": scores, "chosen": chosen, "score": p_star, "accepted": accepted})
        if p_star >= best_score:
            best_layers, best_score = linear + [chosen], p_star
        if not accepted:
            break
        linear.append(chosen)
        opt_score = p_star

    return {
        "teacher_score": p_base,
        "p_min": p_min,
        "swap_order": list(linear),
        "best_layers": sorted(best_layers),
        "best_score": best_score,
        "opt_layers": sorted(linear),
        "opt_score": opt_score,
        "rounds": rounds,
    }
