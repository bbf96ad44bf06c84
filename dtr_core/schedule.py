"""The learning-rate schedule every training loop in dtr uses: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based).

    Linear warm-up over `warmup_steps` (step 0 gets 1/warmup), then a cosine from 1 down to `min_ratio` at the
    last step.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
