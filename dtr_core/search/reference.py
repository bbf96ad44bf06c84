"""DtR (Xia et al., arXiv 2601.11667) end to end, as one numbered listing on plain Python loops.

This is the method's documentation and the test oracle: the optimised path must choose the same swap
order and the same scores on the same inputs. That path is `greedy.greedy_replace` with its candidates
scored by the fast scorer `scorer.RoundScorer`, one per round: in the Prefect flow one candidate per task
(flows/replace.py -> tasks/candidates.py -> `tasks.runtime.round_scorer`; tests/test_flows.py), in the
library and benchmarks through `search.FastEvaluator` / `search.run_greedy_search` (tests/test_reference.py,
tests/test_scorer.py). This listing calls the library where a step *is* the method (capture, distil,
evaluate, swap) and nothing else: no prefix reuse, no early rejection, no resume, no parallelism.

    1. capture   run the teacher once over distillation tokens; keep every layer's attention input/output
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

import torch
from transformers import PreTrainedModel

from dtr_core.distill.capture import capture_activations
from dtr_core.distill.training import DistillConfig, distill_layer, load_students
from dtr_core.evaluation import Task, evaluate
from dtr_core.hybrid.surgery import num_layers, restore_layers, swap_layers


def run_reference(
    model: PreTrainedModel,
    tokenizer,
    token_ids: torch.Tensor,
    task: Task,
    mixer_name: str,
    work_dir: str | os.PathLike,
    distill_config: DistillConfig = DistillConfig(),
    tolerance: float = 0.05,
    limit: int | None = None,
) -> dict:
    """The whole method on `model`. `token_ids`: (N, T) distillation chunks; `tolerance`: relative (paper 0.05).

    Returns {"teacher_score", "p_min", "swap_order", "best_layers", "best_score", "opt_layers", "opt_score",
    "rounds": [{"scores": {layer: score}, "chosen", "score", "accepted"}]}.
    """
    work_dir = Path(work_dir)
    layers = range(num_layers(model))

    # 1. capture the teacher's attention inputs and outputs, every layer, one forward pass
    activations_dir = work_dir / "activations"
    capture_activations(model, token_ids, activations_dir)

    # 2. distil every layer independently (each student sees only its own layer's teacher activations)
    students_dir = work_dir / "students"
    for layer in layers:
        distill_layer(model, layer, activations_dir, mixer_name, distill_config, students_dir)
    students = load_students(students_dir, model)  # failed layers are left out

    # 3. greedy replacement, every candidate scored by a full evaluation on the validation split
    def score(linear_layers: list[int]) -> float:
        originals = swap_layers(model, {layer: students[layer] for layer in linear_layers})
        try:
            return evaluate(model, tokenizer, task, "validation", limit=limit).score
        finally:
            restore_layers(model, originals)

    p_base = score([])
    p_min = p_base - tolerance * abs(p_base)
    linear: list[int] = []  # M (in swap order); M_opt is M when the search stops
    best_layers: list[int] = []  # M_best
    best_score = opt_score = p_base
    rounds = []
    while True:
        candidates = [layer for layer in sorted(students) if layer not in linear]
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
