"""The distillation budget's defaults, written once: what the teacher streams and how a student is trained.

Every default of phase 1 lives here: the pipeline's parameter models (`tasks/params.py`: the Prefect form,
`dtr convert`, `deployments/prefect.yaml`) and the benchmarks (`benchmarks/students.py`) take theirs from
these names. The module needs neither torch nor transformers, so the CLI's checks start fast.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from dtr_core.schedule import warmup_cosine_factor

CORPUS = "bbc"  # the built-in BBC news text: downloads nothing
SEQ_LEN = 256  # tokens per training sequence (the first length of a mix)
BATCH_SIZE = 4  # sequences of SEQ_LEN per step
# SmolLM2-135M (30 layers) on 2 CPU cores within ~20 minutes for a whole `dtr convert`: 40 steps of 4 x 256
# training tokens per layer (0.2-0.5 s/step by mixer)
TOKENS = 40 * BATCH_SIZE * SEQ_LEN
EVAL_SEQUENCES = 8  # held-out sequences (of the first length): the normalised loss, a few seconds to measure
CHECKPOINT_EVERY_STEPS = 50  # a block's checkpoint: whichever of the two comes first
CHECKPOINT_EVERY_MINUTES = 10.0

# DistillConfig fields that judge a student or say how often to checkpoint and log, but do not change its weights
_NOT_IN_KEY = ("max_normalized_loss", "checkpoint_every_steps", "checkpoint_every_minutes", "log_every")


@dataclass(frozen=True)
class DistillConfig:
    """How the students of a block are trained on the teacher's streamed attention inputs/outputs.

    Step i trains on `batch_size x seq_lens[0]` tokens as sequences of `seq_lens[i % len(seq_lens)]`
    (`sequences_at(i)`: fewer, longer sequences for longer lengths, at least one). The first
    `eval_sequences` sequences of the stream (of `seq_lens[0]` tokens) are held out and never trained on.

    Learning rates measured on smollm2-135m (2 CPU cores, BBC text, seq_len 256), held-out
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

    steps: int = TOKENS // (BATCH_SIZE * SEQ_LEN)  # optimiser steps per layer (`for_tokens` derives it)
    batch_size: int = BATCH_SIZE  # sequences of seq_lens[0] per step
    seq_lens: tuple[int, ...] = (SEQ_LEN,)  # one length, or a mix taken in turn step by step
    eval_sequences: int = EVAL_SEQUENCES
    lr: float = 3e-3  # a short, hot schedule: 1e-2 is best at 100 steps (above), 3e-3 at 30-40
    weight_decay: float = 0.0  # decay would pull copied teacher projections towards zero
    warmup_steps: int | None = None  # linear warm-up; None: 10% of steps, so Adam's moments settle first
    min_lr_ratio: float = 0.1  # cosine floor = 10% of lr
    grad_clip: float = 1.0  # max gradient norm; guards the first steps of untrained gates
    seed: int = 0
    calibrate_output: bool = True  # before training, rescale the student's output to the teacher's (least squares)
    log_every: int = 10  # loss-curve resolution in meta.json and progress callbacks (not in the key)
    # A student whose held-out normalised loss is at or above this fails: at 1.0 it predicts the teacher's
    # output no better than each channel's mean, so swapping it in can only hurt. The default convert's 30
    # students measured 0.094-0.864 (docs/BENCHMARKS.md); a run at lr 1.0 gave 5.7-384,780, which a
    # 40-example validation gain still committed. Judges the weights, never changes them: not in the key.
    max_normalized_loss: float = 1.0
    checkpoint_every_steps: int = CHECKPOINT_EVERY_STEPS  # a kill loses at most this many steps...
    checkpoint_every_minutes: float = CHECKPOINT_EVERY_MINUTES  # ...or this many minutes of training

    def __post_init__(self) -> None:
        object.__setattr__(self, "seq_lens", tuple(int(n) for n in self.seq_lens))
        checks = [
            (self.steps > 0, f"steps must be > 0, got {self.steps}"),
            (self.batch_size > 0, f"batch_size must be > 0, got {self.batch_size}"),
            (len(self.seq_lens) > 0 and all(n > 0 for n in self.seq_lens),
             f"seq_lens must be one or more lengths > 0, got {list(self.seq_lens)}"),
            (self.eval_sequences > 0, f"eval_sequences must be > 0, got {self.eval_sequences}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be a finite number > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps is None or 0 <= self.warmup_steps <= self.steps,
             f"warmup_steps must be None (10% of steps) or in 0..steps ({self.steps}), got {self.warmup_steps}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (math.isfinite(self.grad_clip) and self.grad_clip > 0,
             f"grad_clip must be a finite number > 0 (a large value disables clipping), got {self.grad_clip}"),
            (self.log_every > 0, f"log_every must be > 0, got {self.log_every}"),
            (math.isfinite(self.max_normalized_loss) and self.max_normalized_loss > 0,
             f"max_normalized_loss must be a finite number > 0 (a large value disables the check), "
             f"got {self.max_normalized_loss}"),
            (self.checkpoint_every_steps > 0, f"checkpoint_every_steps must be > 0, got {self.checkpoint_every_steps}"),
            (self.checkpoint_every_minutes > 0,
             f"checkpoint_every_minutes must be > 0, got {self.checkpoint_every_minutes}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def for_steps(cls, steps: int, **values: Any) -> DistillConfig:
        """The pipeline's schedule for `steps`: warm-up 10% of the steps (at least one), and a loss curve (and
        progress line) every tenth of the steps, at least every 100 steps (every step for short runs); `values`
        set the other fields (or override those two). Used by `dtr convert` and the benchmarks alike."""
        return cls(**{"warmup_steps": max(1, round(0.1 * steps)), "log_every": max(1, min(100, steps // 10)),
                      **values, "steps": steps})

    @classmethod
    def for_tokens(cls, tokens: int, steps: int | None = None, **values: Any) -> DistillConfig:
        """`for_steps` with the steps that train each layer on `tokens` tokens (`steps`, when given, wins)."""
        batch_size = values.get("batch_size", BATCH_SIZE)
        seq_lens = tuple(values.get("seq_lens", (SEQ_LEN,)))
        return cls.for_steps(steps if steps is not None else steps_for_tokens(tokens, batch_size, seq_lens[0]),
                             **values)

    def sequences_at(self, step: int) -> tuple[int, int]:
        """(sequences, seq_len) of training step `step` (0-based): `batch_size x seq_lens[0]` tokens in all."""
        seq_len = self.seq_lens[step % len(self.seq_lens)]
        return max(1, self.batch_size * self.seq_lens[0] // seq_len), seq_len

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_lens[0]

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["seq_lens"] = list(self.seq_lens)
        return values

    def defining_dict(self) -> dict[str, Any]:
        """The fields that decide the trained weights (the reuse key): all but the verdict and checkpoint cadence."""
        return {name: value for name, value in self.to_dict().items() if name not in _NOT_IN_KEY}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> DistillConfig:
        return cls(**(values or {}))

    @property
    def num_warmup_steps(self) -> int:
        return round(0.1 * self.steps) if self.warmup_steps is None else self.warmup_steps

    def lr_factor(self, step: int) -> float:
        """Multiplier of `lr` for optimiser step `step` (0-based): linear warm-up, then cosine."""
        return warmup_cosine_factor(step, self.steps, self.num_warmup_steps, self.min_lr_ratio)


def steps_for_tokens(tokens: int, batch_size: int, seq_len: int) -> int:
    """Optimiser steps that train on at least `tokens` tokens at `batch_size x seq_len` tokens a step."""
    if tokens <= 0:
        raise ValueError(f"tokens must be > 0, got {tokens}")
    return max(1, math.ceil(tokens / (batch_size * seq_len)))


def check_seq_lens(seq_lens: tuple[int, ...] | list[int], max_positions: int | None) -> None:
    """ValueError when a sequence length exceeds the model's `max_position_embeddings` (None: no limit known)."""
    too_long = [n for n in seq_lens if max_positions is not None and n > max_positions]
    if too_long:
        raise ValueError(f"sequence length {too_long[0]} is above the model's max_position_embeddings "
                         f"({max_positions}); use a seq_len of at most {max_positions}")


# The failure threshold for teachers with random weights (the tiny test models): they hold no structure a
# student could learn, so their students measure 1.2-3.0 at small budgets (all mixers, seeds 0/1); 10 still
# catches a diverging run (36-390 at lr 1.0 on them).
RANDOM_TEACHER_MAX_NORMALIZED_LOSS = 10.0
