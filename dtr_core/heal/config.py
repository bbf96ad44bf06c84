"""How a hybrid is healed: the budget and the optimiser, written once (torch-free, so checks start fast)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from dtr_core.schedule import warmup_cosine_factor

TRAINABLE = ("students",)  # which parameters train: the linear-attention students only


@dataclass(frozen=True)
class HealConfig:
    """End-to-end healing of a hybrid: KL(teacher || hybrid) on next-token distributions.

    `steps` optimiser steps of `batch_size` sequences of `seq_len` tokens; AdamW with linear warm-up (10% of
    the steps) then cosine decay to `min_lr_ratio * lr`; gradient-norm clipping. The held-out KL is measured on
    `eval_batches` batches that training never sees (the first batches of the token stream).
    """

    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    temperature: float = 1.0  # softens both distributions before the KL (1.0: the model's own)
    trainable: str = "students"
    eval_batches: int = 2
    seed: int = 0
    log_every: int = 10
    checkpoint_every_steps: int = 50  # a checkpoint every N steps or M minutes, whichever comes first
    checkpoint_every_minutes: float = 10.0
    # heal-then-continue: after the ordinary search, heal and search on, healing again every `every` committed
    # layers (`continued_search.py`); 0: heal M_opt once and stop
    every: int = 0
    # LoRA adapters (rank r) on the frozen full-attention and MLP projections, trained with the students and
    # merged into the saved hybrid (`adapters.py`); 0: the students alone train
    lora_rank: int = 0
    # the task's train split as extra language-modelling data: loss = KL + task_lm_weight x next-token
    # cross-entropy on its prompts and answers (`task_text.py`); 0: the KL alone
    task_lm_weight: float = 0.0

    def __post_init__(self) -> None:
        checks = [
            (self.steps > 0, f"heal steps must be > 0, got {self.steps}"),
            (self.batch_size > 0, f"heal batch_size must be > 0, got {self.batch_size}"),
            (self.seq_len > 1, f"heal seq_len must be > 1, got {self.seq_len}"),
            (math.isfinite(self.lr) and self.lr > 0, f"heal lr must be a finite number > 0, got {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, f"heal min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (math.isfinite(self.grad_clip) and self.grad_clip > 0, f"heal grad_clip must be > 0, got {self.grad_clip}"),
            (math.isfinite(self.temperature) and self.temperature > 0,
             f"heal temperature must be > 0, got {self.temperature}"),
            (self.trainable in TRAINABLE, f"heal trainable must be one of {', '.join(TRAINABLE)}, got {self.trainable!r}"),
            (self.every >= 0, f"heal every must be >= 0 (0: off), got {self.every}"),
            (self.lora_rank >= 0, f"heal lora_rank must be >= 0 (0: no adapters), got {self.lora_rank}"),
            (math.isfinite(self.task_lm_weight) and self.task_lm_weight >= 0,
             f"heal task_lm_weight must be a finite number >= 0 (0: off), got {self.task_lm_weight}"),
            (self.eval_batches > 0, f"heal eval_batches must be > 0, got {self.eval_batches}"),
            (self.log_every > 0, f"heal log_every must be > 0, got {self.log_every}"),
            (self.checkpoint_every_steps > 0, f"heal checkpoint_every_steps must be > 0, got {self.checkpoint_every_steps}"),
            (self.checkpoint_every_minutes > 0,
             f"heal checkpoint_every_minutes must be > 0, got {self.checkpoint_every_minutes}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def defining_dict(self) -> dict[str, Any]:
        """The fields that decide the healed weights (the reuse key): not how often it logs or checkpoints."""
        return {name: value for name, value in asdict(self).items()
                if name not in ("log_every", "checkpoint_every_steps", "checkpoint_every_minutes")}

    @property
    def tokens(self) -> int:
        """Training tokens the budget covers."""
        return self.steps * self.batch_size * self.seq_len

    def lr_factor(self, step: int) -> float:
        """Multiplier of `lr` for optimiser step `step` (0-based): warm-up over 10% of the steps, then cosine."""
        return warmup_cosine_factor(step, self.steps, max(1, round(0.1 * self.steps)), self.min_lr_ratio)
