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
    4. heal and continue (optional, `run_continued_reference`): heal M_opt end to end (KL to the teacher's
                 next-token distribution, students only); then more greedy rounds where M's layers use their
                 healed students and each candidate its distilled one, against the same P_min; heal again
                 after every H committed layers, and after a rejected round that followed commits (then the
                 round runs again); stop when a round right after a heal commits nothing or at the cap; heal
                 what was committed since the last heal. The healed hybrid is the last heal's.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from transformers import PreTrainedModel

from dtr_core.distill.block import distill_block
from dtr_core.distill.config import DistillConfig
from dtr_core.distill.corpus import Corpus
from dtr_core.distill.training import load_students
from dtr_core.evaluation import Task, evaluate
from dtr_core.heal.config import HealConfig
from dtr_core.heal.training import heal
from dtr_core.hybrid.model import make_hybrid
from dtr_core.hybrid.surgery import attention_module, num_layers, restore_layers, swap_layers


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


def run_continued_reference(
    model: PreTrainedModel,
    tokenizer,
    corpus: Corpus,
    task: Task,
    students_dir: str | os.PathLike,
    start_order: list[int],
    heal_config: HealConfig,
    heal_every: int,
    tolerance: float = 0.05,
    max_layers: int | None = None,
    limit: int | None = None,
    tolerance_mode: str = "relative",
) -> dict:
    """Step 4 from M_opt's swap order `start_order`, on the distilled students in `students_dir`.
    `tolerance_mode` "absolute" makes `tolerance` P_min itself.

    Returns {"p_min", "swap_order", "healed_layers", "healed_score", "stop_reason",
    "rounds": [{"scores", "chosen", "score", "accepted", "heal_index"}], "heals": [{"swap_order", "score"}]}.
    """
    students = load_students(students_dir, model)  # M's layers: healed once healed; the rest: distilled

    def score(linear_layers: list[int]) -> float:
        originals = swap_layers(model, {layer: students[layer] for layer in linear_layers})
        try:
            return evaluate(model, tokenizer, task, "validation", limit=limit).score
        finally:
            restore_layers(model, originals)

    def heal_listing(linear_layers: list[int]) -> float | None:
        """Heal the hybrid with `linear_layers` linear; its students replace theirs. Its score, None if it failed."""
        hybrid = make_hybrid(model, {layer: copy.deepcopy(students[layer]) for layer in linear_layers})
        if not heal(model, hybrid, corpus, heal_config).ok:
            return None
        for layer in linear_layers:
            students[layer] = attention_module(hybrid, layer)
        return score(linear_layers)

    p_base = score([])
    p_min = tolerance if tolerance_mode == "absolute" else p_base - tolerance * abs(p_base)
    linear = list(start_order)
    heals = [{"swap_order": list(linear), "score": heal_listing(linear)}]
    rounds, since_heal, stop_reason = [], 0, None
    if heals[-1]["score"] is None:
        stop_reason = "heal_failed"
    while stop_reason is None:
        candidates = [layer for layer in sorted(students) if layer not in linear]
        if not candidates:
            stop_reason = "all_replaced"
            break
        if max_layers is not None and len(linear) >= max_layers:
            stop_reason = "cap"
            break
        scores = {layer: score(linear + [layer]) for layer in candidates}
        chosen = max(candidates, key=lambda layer: (scores[layer], -layer))  # ties -> lowest layer index
        accepted = scores[chosen] >= p_min
        rounds.append({"scores": scores, "chosen": chosen, "score": scores[chosen], "accepted": accepted,
                       "heal_index": len(heals) - 1})
        if accepted:
            linear.append(chosen)
            since_heal += 1
        elif since_heal == 0:
            stop_reason = "rejected"  # a round right after a heal committed nothing
            break
        if not accepted or since_heal == heal_every:
            since_heal = 0
            heals.append({"swap_order": list(linear), "score": heal_listing(linear)})
            if heals[-1]["score"] is None:
                stop_reason = "heal_failed"
    if since_heal > 0:
        heals.append({"swap_order": list(linear), "score": heal_listing(linear)})
        if heals[-1]["score"] is None:
            stop_reason = "heal_failed"
    last = [h for h in heals if h["score"] is not None]
    return {
        "p_min": p_min,
        "swap_order": linear,
        "healed_layers": sorted(last[-1]["swap_order"]) if last else [],
        "healed_score": last[-1]["score"] if last else None,
        "stop_reason": stop_reason,
        "rounds": rounds,
        "heals": heals,
    }
