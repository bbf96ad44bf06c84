"""Acceptance rules for the greedy search (DtR Phase 2): may the best candidate of a round be committed?

The paper (Xia et al., arXiv 2601.11667, Algorithm 1) commits the round's best swap when its validation
score P* reaches the threshold P_min (`accept_point`). A point score on a few hundred validation examples
over-fits (the paper's 7 of 18 tasks whose test drop exceeded the tolerance), so we also offer a stricter
rule (`accept_bootstrap`): commit only when a lower confidence bound of the candidate's score reaches P_min.

Definitions (all pure functions, deterministic):
- `Tolerance` turns the teacher's score P_base into P_min. `relative`: P_min = P_base - value * |P_base|
  (= 0.95 * P_base for value 0.05 and a positive score, the paper's setting; the |.| keeps the threshold
  below the teacher for negated-perplexity scores). `absolute`: P_min = value.
- Paired bootstrap LCB. With per-example values c_i (candidate) and t_i (teacher) on the same n validation
  examples, d_i = c_i - t_i. Draw B resamples of n indices with replacement (numpy PCG64 seeded with `seed`),
  m_b = mean(d[idx_b]). LCB = P_base + quantile(m, 1 - confidence) (numpy's default linear interpolation).
  The candidate's point score is P_base + mean(d), so this needs a metric whose score is the mean of its
  per-example values (accuracy: 0/1 correctness; `metrics.BOOTSTRAP_METRICS`); we check that and raise
  otherwise. Macro-F1, balanced accuracy, per-class recall and perplexity are not such means: a search on
  them with bootstrap acceptance is refused before any work (`metrics.check_bootstrap_metric`, called by
  `greedy_search.run_greedy_search` and the convert parameter checks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

__all__ = [
    "Acceptance",
    "AcceptanceDecision",
    "Tolerance",
    "accept_bootstrap",
    "accept_point",
    "bootstrap_lcb",
    "decide",
]

# Scores from `evaluate` are means of per-example values in float64; this only absorbs summation order.
_MEAN_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Tolerance:
    """How far below the teacher the search may go. `relative` 0.05 is the paper's 5% rule."""

    mode: Literal["relative", "absolute"] = "relative"
    value: float = 0.05  # paper: P_min = 0.95 * P_base

    def __post_init__(self) -> None:
        if self.mode not in ("relative", "absolute"):
            raise ValueError(f"unknown tolerance mode {self.mode!r}; choose one of: absolute, relative")
        if not math.isfinite(self.value):
            raise ValueError(f"tolerance value must be finite, got {self.value}")
        if self.mode == "relative" and not 0.0 <= self.value < 1.0:
            raise ValueError(f"relative tolerance must be in [0, 1), got {self.value}")

    def threshold(self, teacher_score: float) -> float:
        """P_min for a teacher score P_base."""
        if self.mode == "absolute":
            return float(self.value)
        return float(teacher_score - self.value * abs(teacher_score))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Tolerance:
        return cls(mode=data["mode"], value=float(data["value"]))


@dataclass(frozen=True)
class Acceptance:
    """Which acceptance rule the search uses. `point` is the paper's; `bootstrap` is ours (stricter)."""

    mode: Literal["point", "bootstrap"] = "point"
    n_resamples: int = 2000  # why: the 5th percentile of 2000 draws moves by < 0.2 points of accuracy
    confidence: float = 0.95  # one-sided: LCB is the 5th percentile
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("point", "bootstrap"):
            raise ValueError(f"unknown acceptance mode {self.mode!r}; choose one of: bootstrap, point")
        if self.n_resamples < 1:
            raise ValueError(f"n_resamples must be >= 1, got {self.n_resamples}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Acceptance:
        return cls(**data)


@dataclass(frozen=True)
class AcceptanceDecision:
    accepted: bool
    lcb: float | None  # bootstrap lower confidence bound of the candidate's score; None for `point`


def accept_point(score: float, p_min: float) -> bool:
    """The paper's rule: commit when P* >= P_min."""
    return score >= p_min


def bootstrap_lcb(
    candidate_per_example: Sequence[float],
    teacher_per_example: Sequence[float],
    teacher_score: float,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> float:
    """Lower confidence bound of the candidate's score by paired bootstrap (see the module docstring)."""
    candidate = np.asarray(candidate_per_example, dtype=np.float64)
    teacher = np.asarray(teacher_per_example, dtype=np.float64)
    if candidate.ndim != 1 or candidate.shape != teacher.shape or candidate.size == 0:
        raise ValueError(
            f"paired bootstrap needs equal, non-empty per-example lists; got {candidate.shape} and {teacher.shape}"
        )
    if abs(float(teacher.mean()) - teacher_score) > _MEAN_TOLERANCE * max(1.0, abs(teacher_score)):
        raise ValueError(
            f"bootstrap acceptance needs a score that is the mean of per-example values (e.g. accuracy); "
            f"teacher score {teacher_score} != mean of per-example values {float(teacher.mean())}"
        )
    diff = candidate - teacher  # (n,)
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, diff.size, size=(n_resamples, diff.size))  # (B, n)
    means = diff[indices].mean(axis=1)  # (B,)
    return float(teacher_score + np.quantile(means, 1.0 - confidence))


def accept_bootstrap(
    candidate_per_example: Sequence[float],
    teacher_per_example: Sequence[float],
    teacher_score: float,
    p_min: float,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[bool, float]:
    """Commit only when the bootstrap LCB of the candidate's score is >= P_min. Returns (accepted, lcb)."""
    lcb = bootstrap_lcb(candidate_per_example, teacher_per_example, teacher_score, n_resamples, confidence, seed)
    return lcb >= p_min, lcb


def decide(
    acceptance: Acceptance,
    score: float,
    p_min: float,
    candidate_per_example: Sequence[float] | None = None,
    teacher_per_example: Sequence[float] | None = None,
    teacher_score: float | None = None,
) -> AcceptanceDecision:
    """Apply `acceptance` to a round's best candidate.

    The bootstrap rule is only ever stricter than the point rule: a candidate whose point score is below
    P_min is refused whatever its LCB (the LCB can exceed the point score on skewed samples).
    """
    if acceptance.mode == "point":
        return AcceptanceDecision(accept_point(score, p_min), None)
    if candidate_per_example is None or teacher_per_example is None or teacher_score is None:
        raise ValueError("bootstrap acceptance needs per-example values of the candidate and the teacher")
    if abs(float(np.mean(np.asarray(candidate_per_example, dtype=np.float64))) - score) > _MEAN_TOLERANCE * max(
        1.0, abs(score)
    ):
        raise ValueError("bootstrap acceptance needs a score that is the mean of per-example values (e.g. accuracy)")
    ok, lcb = accept_bootstrap(
        candidate_per_example,
        teacher_per_example,
        teacher_score,
        p_min,
        n_resamples=acceptance.n_resamples,
        confidence=acceptance.confidence,
        seed=acceptance.seed,
    )
    return AcceptanceDecision(ok and accept_point(score, p_min), lcb)
