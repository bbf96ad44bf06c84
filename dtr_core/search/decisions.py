"""Greedy layer replacement: the paper's Algorithm 1 (Xia et al., arXiv 2601.11667, Phase 2) as pure decisions.

```
P_base = P(M_full);  P_min = tolerance(P_base);  M = M_full;  M_best = M_opt = M;  P_best = P_base
repeat:
    P_l = P(M with layer l swapped to its student)    for every layer l still full in M (and with a student)
    l* = argmax P_l;  P* = P_l*                         ties -> the lowest layer index (ours; the paper is silent)
    if P* >= P_best:  M_best = M + l*;  P_best = P*
    if accepted(P*):  M = M + l*;  M_opt = M           (P* >= P_min, or the bootstrap LCB rule)
    else:             stop
```
The search also stops when every offered layer is linear, or at a cap (`max_layers`, `target_fraction`).
How P_l is computed is not this module's business: the caller passes `score_candidates`, either the plain
evaluator (`search.PlainEvaluator`: one full forward per candidate, the paper's cost) or the fast scorer
(`dtr_core/search/scorer.py`, through `search.FastEvaluator` or the flow's one task per candidate); both give the
same answer. Candidates rejected early by an exact bound come back with `score=None`;
they can never be the argmax.

Resume: `on_round` receives each newly finished round (persist it); `completed_rounds` replays persisted
rounds in order instead of re-evaluating them. Decisions are always recomputed from the stored scores.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from dtr_core.search.acceptance import Acceptance, Tolerance, decide

__all__ = [
    "Acceptance",
    "CandidateScore",
    "GreedyResult",
    "RoundRecord",
    "ScoreCandidates",
    "Tolerance",
    "greedy_replace",
    "layer_cap",
    "select_next_layer",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CandidateScore:
    """Validation score of one candidate (current hybrid + one more swapped layer).

    `score` is None exactly when the candidate was rejected early: then `upper_bound` is the best score it
    could still have reached, and `evaluated_fraction` the share of validation examples it saw.
    """

    score: float | None
    per_example: tuple[float, ...] | None = None
    evaluated_fraction: float = 1.0
    rejected_early: bool = False
    upper_bound: float | None = None

    def __post_init__(self) -> None:
        if (self.score is None) != self.rejected_early:
            raise ValueError("a CandidateScore has score=None exactly when it was rejected early")
        if self.rejected_early and self.upper_bound is None:
            raise ValueError("an early-rejected candidate must carry its upper bound")
        if self.per_example is not None and not isinstance(self.per_example, tuple):
            object.__setattr__(self, "per_example", tuple(float(v) for v in self.per_example))

    @property
    def order_key(self) -> float:
        """What the next round orders candidates by: the score, else the bound that rejected it."""
        return self.score if self.score is not None else float(self.upper_bound)  # type: ignore[arg-type]

    def to_dict(self, keep_per_example: bool = True) -> dict:
        return {
            "score": self.score,
            "per_example": list(self.per_example) if keep_per_example and self.per_example is not None else None,
            "evaluated_fraction": self.evaluated_fraction,
            "rejected_early": self.rejected_early,
            "upper_bound": self.upper_bound,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> CandidateScore:
        per_example = data.get("per_example")
        return cls(
            score=data["score"],
            per_example=tuple(per_example) if per_example is not None else None,
            evaluated_fraction=float(data.get("evaluated_fraction", 1.0)),
            rejected_early=bool(data.get("rejected_early", False)),
            upper_bound=data.get("upper_bound"),
        )


class ScoreCandidates(Protocol):
    def __call__(
        self, committed: tuple[int, ...], candidates: list[int], order_hint: Mapping[int, float] | None
    ) -> Mapping[int, CandidateScore]:
        """Score `committed + (l,)` for every l in `candidates`. `committed` is in swap order.

        `order_hint` (last round's scores or bounds) may only change the evaluation order, never a result.
        """
        ...


@dataclass(frozen=True)
class RoundRecord:
    """One finished round. Only the chosen candidate keeps its per-example values (bootstrap replay)."""

    index: int
    committed_before: tuple[int, ...]
    candidates: dict[int, CandidateScore]
    chosen: int
    score: float
    accepted: bool
    lcb: float | None = None
    new_best: bool = False

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "committed_before": list(self.committed_before),
            "candidates": [
                {"layer": layer, **cand.to_dict(keep_per_example=layer == self.chosen)}
                for layer, cand in sorted(self.candidates.items())
            ],
            "chosen": self.chosen,
            "score": self.score,
            "accepted": self.accepted,
            "lcb": self.lcb,
            "new_best": self.new_best,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> RoundRecord:
        return cls(
            index=int(data["index"]),
            committed_before=tuple(int(v) for v in data["committed_before"]),
            candidates={int(c["layer"]): CandidateScore.from_dict(c) for c in data["candidates"]},
            chosen=int(data["chosen"]),
            score=float(data["score"]),
            accepted=bool(data["accepted"]),
            lcb=data.get("lcb"),
            new_best=bool(data.get("new_best", False)),
        )


@dataclass(frozen=True)
class GreedyResult:
    """The search's answer. Layer sets are sorted; `swap_order` is M_opt's layers in commit order."""

    teacher_score: float
    p_min: float
    tolerance: Tolerance
    acceptance: Acceptance
    rounds: tuple[RoundRecord, ...]
    best_layers: tuple[int, ...]  # M_best: highest validation score on the path (ties -> more layers)
    best_score: float
    opt_layers: tuple[int, ...]  # M_opt: most linear layers with an accepted score
    opt_score: float
    swap_order: tuple[int, ...]
    stop_reason: str  # "rejected" | "all_replaced" | "cap"
    num_layers: int = 0
    available_layers: tuple[int, ...] = field(default=())

    @property
    def trajectory(self) -> list[tuple[int, float, bool]]:
        """(chosen layer, score, accepted) per round: what must agree between plain and fast search."""
        return [(r.chosen, r.score, r.accepted) for r in self.rounds]

    def to_dict(self) -> dict:
        return {
            "teacher_score": self.teacher_score,
            "p_min": self.p_min,
            "tolerance": self.tolerance.to_dict(),
            "acceptance": self.acceptance.to_dict(),
            "rounds": [r.to_dict() for r in self.rounds],
            "best_layers": list(self.best_layers),
            "best_score": self.best_score,
            "opt_layers": list(self.opt_layers),
            "opt_score": self.opt_score,
            "swap_order": list(self.swap_order),
            "stop_reason": self.stop_reason,
            "num_layers": self.num_layers,
            "available_layers": list(self.available_layers),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> GreedyResult:
        return cls(
            teacher_score=float(data["teacher_score"]),
            p_min=float(data["p_min"]),
            tolerance=Tolerance.from_dict(data["tolerance"]),
            acceptance=Acceptance.from_dict(data["acceptance"]),
            rounds=tuple(RoundRecord.from_dict(r) for r in data["rounds"]),
            best_layers=tuple(data["best_layers"]),
            best_score=float(data["best_score"]),
            opt_layers=tuple(data["opt_layers"]),
            opt_score=float(data["opt_score"]),
            swap_order=tuple(data["swap_order"]),
            stop_reason=str(data["stop_reason"]),
            num_layers=int(data.get("num_layers", 0)),
            available_layers=tuple(data.get("available_layers", ())),
        )


def select_next_layer(scores: Mapping[int, CandidateScore | float]) -> int:
    """l* = argmax of the scores; ties go to the lowest layer index (our rule; deterministic).

    Early-rejected candidates (score None) are never chosen. Raises ValueError if nothing is scored.
    """
    best_layer: int | None = None
    best_score = -math.inf
    for layer in sorted(scores):
        value = scores[layer]
        score = value.score if isinstance(value, CandidateScore) else float(value)
        if score is None:
            continue
        if math.isnan(score):
            raise ValueError(f"candidate layer {layer} scored NaN")
        if best_layer is None or score > best_score:  # strict: an equal later layer loses the tie
            best_layer, best_score = layer, score
    if best_layer is None:
        raise ValueError("no candidate has a full score; cannot select a layer")
    return best_layer


def layer_cap(num_layers: int, max_layers: int | None = None, target_fraction: float | None = None) -> int | None:
    """The most layers the search may make linear. `target_fraction` f gives floor(f * num_layers)."""
    caps = []
    if max_layers is not None:
        if max_layers < 0:
            raise ValueError(f"max_layers must be >= 0, got {max_layers}")
        caps.append(max_layers)
    if target_fraction is not None:
        if not 0.0 <= target_fraction <= 1.0:
            raise ValueError(f"target_fraction must be in [0, 1], got {target_fraction}")
        caps.append(math.floor(target_fraction * num_layers + 1e-9))  # + eps: 0.3 * 10 is 2.999...
    return min(caps) if caps else None


@dataclass
class _SearchPath:
    """The search so far: M's layers in commit order, the layers still full, M_best and the finished rounds."""

    remaining: list[int]
    best_score: float
    opt_score: float
    committed: list[int] = field(default_factory=list)
    best_layers: tuple[int, ...] = ()
    rounds: list[RoundRecord] = field(default_factory=list)
    hint: dict[int, float] | None = None  # last round's scores or bounds: the next round's evaluation order

    def stop_before_round(self, cap: int | None) -> str | None:
        """Why no further round runs ("all_replaced" | "cap"), or None."""
        if not self.remaining:
            return "all_replaced"
        if cap is not None and len(self.committed) >= cap:
            return "cap"
        return None


def greedy_replace(
    score_candidates: ScoreCandidates | Callable[..., Mapping[int, CandidateScore]],
    num_layers: int,
    available_layers: Iterable[int],
    teacher_score: float,
    tolerance: Tolerance,
    acceptance: Acceptance = Acceptance(),
    *,
    teacher_per_example: Sequence[float] | None = None,
    max_layers: int | None = None,
    target_fraction: float | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    completed_rounds: Sequence[RoundRecord] = (),
) -> GreedyResult:
    """Run Algorithm 1. `available_layers`: layers with a usable student (failed students are never offered).

    `teacher_per_example` is needed for `Acceptance(mode="bootstrap")`.
    """
    available = sorted(set(int(layer) for layer in available_layers))
    if any(not 0 <= layer < num_layers for layer in available):
        raise ValueError(f"available layers {available} out of range for a {num_layers}-layer model")
    cap = layer_cap(num_layers, max_layers, target_fraction)
    p_min = tolerance.threshold(teacher_score)
    if acceptance.mode == "bootstrap" and teacher_per_example is None:
        raise ValueError("bootstrap acceptance needs teacher_per_example")

    path = _SearchPath(remaining=list(available), best_score=float(teacher_score), opt_score=float(teacher_score))
    while (stop_reason := path.stop_before_round(cap)) is None:
        scores, replayed = _round_scores(path, score_candidates, completed_rounds)
        record = _decide_round(path, scores, acceptance, p_min, teacher_per_example, teacher_score)
        if on_round is not None and not replayed:
            on_round(record)
        if not record.accepted:
            stop_reason = "rejected"
            break
        path.committed.append(record.chosen)
        path.remaining.remove(record.chosen)
        path.opt_score = record.score

    if len(completed_rounds) > len(path.rounds):
        logger.warning(
            "%d persisted rounds were not reached (the decisions differ from the persisted run); ignored",
            len(completed_rounds) - len(path.rounds),
        )
    return GreedyResult(
        teacher_score=float(teacher_score),
        p_min=p_min,
        tolerance=tolerance,
        acceptance=acceptance,
        rounds=tuple(path.rounds),
        best_layers=path.best_layers,
        best_score=path.best_score,
        opt_layers=tuple(sorted(path.committed)),
        opt_score=path.opt_score,
        swap_order=tuple(path.committed),
        stop_reason=stop_reason,
        num_layers=num_layers,
        available_layers=tuple(available),
    )


def _round_scores(
    path: _SearchPath, score_candidates: ScoreCandidates, completed_rounds: Sequence[RoundRecord]
) -> tuple[dict[int, CandidateScore], bool]:
    """(P_l for every candidate l of the next round, whether they were replayed from a persisted round)."""
    index = len(path.rounds)
    if index < len(completed_rounds):
        persisted = completed_rounds[index]
        if persisted.committed_before != tuple(path.committed) or set(persisted.candidates) != set(path.remaining):
            raise ValueError(
                f"persisted round {index} was run from committed={persisted.committed_before} with candidates "
                f"{sorted(persisted.candidates)}, but the search is at committed={tuple(path.committed)} with "
                f"candidates {path.remaining}"
            )
        return dict(persisted.candidates), True
    scores = dict(score_candidates(tuple(path.committed), list(path.remaining), path.hint))
    if set(scores) != set(path.remaining):
        raise ValueError(f"score_candidates returned layers {sorted(scores)}, expected {path.remaining}")
    return scores, False


def _decide_round(
    path: _SearchPath,
    scores: Mapping[int, CandidateScore],
    acceptance: Acceptance,
    p_min: float,
    teacher_per_example: Sequence[float] | None,
    teacher_score: float,
) -> RoundRecord:
    """l* and its acceptance for one round's scores; updates M_best and the hint, appends the round to `path`."""
    index = len(path.rounds)
    chosen = select_next_layer(scores)
    best = scores[chosen]
    score = float(best.score)  # type: ignore[arg-type]  # the argmax is never rejected early
    new_best = score >= path.best_score
    if new_best:
        path.best_layers = tuple(sorted([*path.committed, chosen]))
        path.best_score = score
    decision = decide(acceptance, score, p_min, best.per_example, teacher_per_example, teacher_score)
    record = RoundRecord(
        index=index,
        committed_before=tuple(path.committed),
        candidates={
            layer: cand if layer == chosen else replace(cand, per_example=None) for layer, cand in scores.items()
        },
        chosen=chosen,
        score=score,
        accepted=decision.accepted,
        lcb=decision.lcb,
        new_best=new_best,
    )
    path.rounds.append(record)
    path.hint = {layer: cand.order_key for layer, cand in scores.items()}
    logger.info(
        "round %d: layer %d scores %.4f (P_min %.4f)%s -> %s",
        index, chosen, score, p_min, "" if decision.lcb is None else f", LCB {decision.lcb:.4f}",
        "commit" if decision.accepted else "stop",
    )  # fmt: skip
    return record
