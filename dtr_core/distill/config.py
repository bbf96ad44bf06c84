"""The distillation budget's defaults, written once: what a capture holds and how a student is trained.

Every default of phase 1 lives here: the pipeline's parameter models (`tasks/params.py`: the Prefect form,
`dtr convert`, `deployments/prefect.yaml`) and the benchmarks (`benchmarks/students.py`) take theirs from
these names. The module needs neither torch nor transformers, so the CLI's checks start fast.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

CORPUS = "bbc"  # the built-in BBC news text: downloads nothing
# SmolLM2-135M (30 layers) on 2 CPU cores within ~20 minutes for a whole `dtr convert`: ~8k tokens are
# 32 sequences of 256, of which the last 10% (3) are held out for the normalised loss.
CAPTURE_TOKENS = 8192
CAPTURE_SEQ_LEN = 256

_VERDICT_FIELDS = ("max_normalized_loss",)  # DistillConfig fields that judge a student but do not train it


@dataclass(frozen=True)
class DistillConfig:
    """How one layer's student is trained.

    Learning rates measured on smollm2-135m (2 CPU cores, captured BBC text, seq_len 256), held-out
    normalised loss after 100 steps at batch 4: lr 1e-3 / 3e-3 / 1e-2 gave 0.60 / 0.33 / 0.26
    (jetblock, layer 10), 0.43 / 0.43 (gla, layer 20, 3e-3 / 1e-2), 0.34 / 0.33 (gated_deltanet,
    layer 20); 1e-2 trained layers 0 and 29 without divergence. 300 steps kept improving (jetblock
    layer 20: 0.19). The default is the 2-core budget of a whole conversion instead: 40 steps at 3e-3
    (on layer 15, 30 steps at lr 3e-3 reached a normalised loss of 0.71). Copied-weights students start
    at 3-3000 (their per-head output norm is untrained); `calibrate_output` rescales that output by one
    least-squares factor first. Measured on smollm2-135m, gated_deltanet, 100 steps at lr 1e-2, held-out
    normalised loss without / with it: layer 3 0.465 / 0.351, layer 15 0.266 / 0.240, layer 27
    0.156 / 0.194 (starts 54 / 1.1, 15 / 1.8, 4.6 / 2.2). At 40 steps, lr 3e-3: 1.69 / 0.61, 0.56 / 0.41,
    0.33 / 0.63.
    """

    # 30 layers x 40 steps fit a 20-minute conversion on 2 cores (0.2-0.5 s/step by mixer); 40 x 4 x 256 = 41k
    # tokens seen per layer
    steps: int = 40
    batch_size: int = 4  # sequences per step (4 x 256 tokens)
    lr: float = 3e-3  # a short, hot schedule: 1e-2 is best at 100 steps (above), 3e-3 at 30-40
    weight_decay: float = 0.0  # decay would pull copied teacher projections towards zero
    warmup_steps: int | None = None  # linear warm-up; None: 10% of steps, so Adam's moments settle first
    min_lr_ratio: float = 0.1  # cosine floor = 10% of lr
    grad_clip: float = 1.0  # max gradient norm; guards the first steps of untrained gates
    seed: int = 0
    calibrate_output: bool = True  # before training, rescale the student's output to the teacher's (least squares)
    log_every: int = 10  # loss-curve resolution in meta.json and progress callbacks
    eval_fraction: float = 0.1  # share of captured sequences held out (the last ones)
    max_eval_sequences: int = 16  # cap on held-out sequences: evaluation stays a few seconds
    # A student whose held-out normalised loss is at or above this fails: at 1.0 it predicts the teacher's
    # output no better than each channel's mean, so swapping it in can only hurt. The default convert's 30
    # students measured 0.094-0.864 (docs/BENCHMARKS.md); a run at lr 1.0 gave 5.7-384,780, which a
    # 40-example validation gain still committed. Judges the weights, never changes them: not in the key.
    max_normalized_loss: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            (self.steps > 0, f"steps must be > 0, got {self.steps}"),
            (self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps is None or 0 <= self.warmup_steps <= self.steps,
             f"warmup_steps must be None (10% of steps) or in 0..steps ({self.steps}), got {self.warmup_steps}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (math.isfinite(self.grad_clip) and self.grad_clip > 0,
             f"grad_clip must be a finite number > 0 (a large value disables clipping), got {self.grad_clip}"),
            (self.log_every > 0, f"log_every must be > 0, got {self.log_every}"),
            (0 < self.eval_fraction < 1, f"eval_fraction must be in (0, 1), got {self.eval_fraction}"),
            (self.max_eval_sequences > 0, f"max_eval_sequences must be > 0, got {self.max_eval_sequences}"),
            (math.isfinite(self.max_normalized_loss) and self.max_normalized_loss > 0,
             f"max_normalized_loss must be a finite number > 0 (a large value disables the check), "
             f"got {self.max_normalized_loss}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def for_steps(cls, steps: int, **values: Any) -> DistillConfig:
        """The pipeline's schedule for `steps`: warm-up 10% of the steps (at least one), and a loss curve
        with ~10 points (every step for short runs). Used by `dtr convert` and the benchmarks alike."""
        return cls(steps=steps, warmup_steps=max(1, round(0.1 * steps)), log_every=max(1, min(10, steps // 10)),
                   **values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def defining_dict(self) -> dict[str, Any]:
        """The fields that decide the trained weights (the reuse key): all but the verdict threshold."""
        return {name: value for name, value in asdict(self).items() if name not in _VERDICT_FIELDS}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> DistillConfig:
        return cls(**(values or {}))

    @property
    def num_warmup_steps(self) -> int:
        return round(0.1 * self.steps) if self.warmup_steps is None else self.warmup_steps

    def lr_factor(self, step: int) -> float:
        """Multiplier of `lr` for optimiser step `step` (0-based): linear warm-up, then cosine."""
        warmup = self.num_warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, self.steps - 1 - warmup)
        progress = min(1.0, (step - warmup) / span)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# The failure threshold for teachers with random weights (the tiny test models): they hold no structure a
# student could learn, so their students measure 1.2-3.0 at small budgets (all mixers, seeds 0/1); 10 still
# catches a diverging run (36-390 at lr 1.0 on them).
RANDOM_TEACHER_MAX_NORMALIZED_LOSS = 10.0
