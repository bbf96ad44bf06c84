"""Heal-then-continue: after the ordinary greedy search, go on replacing layers from the healed hybrid.

The ordinary search (`dtr_core.search.decisions.greedy_replace`) stops when no candidate scores above P_min;
its M_best and M_opt keep the paper's meaning. Healing (`dtr_core.heal.training`) trains the committed
students together, which usually lifts the hybrid's score back up; this search uses that headroom:

```
M = M_opt (its layers in swap order);  heal(M)                      heal 1: M_opt healed
repeat:
    stop if every offered layer is linear, or at the layer cap
    P_l = P(M with its healed students + layer l's distilled student)  for every layer l still full
    l* = argmax P_l (ties -> lowest layer);  accepted = P* >= P_min     (the same P_min: relative to the teacher)
    if accepted:  M = M + l*;  heal(M) once H layers were committed since the last heal
    elif a layer was committed since the last heal:  heal(M) and run the round again
    else:  stop                                                        (a round right after a heal committed nothing)
heal(M) if layers were committed since the last heal                   the result is always a healed hybrid
```
Each heal starts from the students the last heal left (the layers committed since then: their distilled
students). A heal that fails (it diverged) ends the search; the result is then the last heal that succeeded.
The decisions are pure: `heal` and `score_candidates` are callbacks (the Prefect flow `flows/heal.py` runs
them as tasks; `dtr_core/search/reference.py` has this search as a plain listing, and they agree: tested).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from dtr_core.search.acceptance import Acceptance, Tolerance, decide
from dtr_core.search.decisions import CandidateScore, RoundRecord, select_next_layer


@dataclass(frozen=True)
class HealStep:
    """What one heal of the continued search gave: whether it succeeded, and the healed hybrid's validation score."""

    ok: bool
    score: float | None = None
    reason: str | None = None


@dataclass(frozen=True)
class HealPoint:
    """Heal number `index` (0: M_opt healed) of the layers `swap_order`; `after_round`: rounds finished before it."""

    index: int
    swap_order: tuple[int, ...]
    ok: bool
    score: float | None
    after_round: int
    reason: str | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.swap_order))

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "swap_order": list(self.swap_order), "layers": list(self.layers),
                "ok": self.ok, "score": self.score, "after_round": self.after_round, "reason": self.reason}


@dataclass(frozen=True)
class ContinuedRound:
    """A round of the continued search, scored with the students of heal `heal_index`."""

    record: RoundRecord
    heal_index: int

    def to_dict(self) -> dict[str, Any]:
        return {**self.record.to_dict(), "heal_index": self.heal_index}


@dataclass(frozen=True)
class ContinuedResult:
    """The continued search's answer. `healed_layers` / `healed_score`: the final healed hybrid (the last heal
    that succeeded; empty when even the first heal failed)."""

    teacher_score: float
    p_min: float
    heal_every: int
    start_order: tuple[int, ...]  # M_opt's layers in swap order: where the search started
    rounds: tuple[ContinuedRound, ...]
    heals: tuple[HealPoint, ...]
    swap_order: tuple[int, ...]  # every layer committed, in order (the last ones may be unhealed on a failure)
    stop_reason: str  # "rejected" | "all_replaced" | "cap" | "heal_failed"
    healed_layers: tuple[int, ...] = field(default=())
    healed_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"teacher_score": self.teacher_score, "p_min": self.p_min, "heal_every": self.heal_every,
                "start_order": list(self.start_order), "rounds": [r.to_dict() for r in self.rounds],
                "heals": [h.to_dict() for h in self.heals], "swap_order": list(self.swap_order),
                "stop_reason": self.stop_reason, "healed_layers": list(self.healed_layers),
                "healed_score": self.healed_score}


HealCallback = Callable[[int, tuple[int, ...]], HealStep]  # (heal index, layers in swap order) -> HealStep
# (heal index whose students the committed layers use, committed in swap order, candidates, order hint) -> scores
ScoreAfterHeal = Callable[[int, tuple[int, ...], list[int], Mapping[int, float] | None], Mapping[int, CandidateScore]]


def continue_with_healing(
    heal: HealCallback,
    score_candidates: ScoreAfterHeal,
    available_layers: Iterable[int],
    start_order: Sequence[int],
    teacher_score: float,
    tolerance: Tolerance,
    heal_every: int,
    acceptance: Acceptance = Acceptance(),
    *,
    teacher_per_example: Sequence[float] | None = None,
    cap: int | None = None,
    first_round_index: int = 0,
    on_round: Callable[[ContinuedRound], None] | None = None,
    on_heal: Callable[[HealPoint], None] | None = None,
) -> ContinuedResult:
    """Run the module docstring's search from `start_order` (M_opt's swap order). `available_layers`: the layers
    with a usable student; `cap`: the most linear layers; `first_round_index`: the index of the first continued
    round (the ordinary search's round count, so indices run on)."""
    if heal_every < 1:
        raise ValueError(f"heal_every must be >= 1, got {heal_every}")
    if not start_order:
        raise ValueError("the continued search starts from a hybrid with at least one linear layer")
    p_min = tolerance.threshold(teacher_score)
    committed = [int(layer) for layer in start_order]
    remaining = [layer for layer in sorted(set(int(layer) for layer in available_layers)) if layer not in committed]
    rounds: list[ContinuedRound] = []
    heals: list[HealPoint] = []
    hint: dict[int, float] | None = None

    def heal_now() -> bool:
        step = heal(len(heals), tuple(committed))
        point = HealPoint(len(heals), tuple(committed), step.ok, step.score, len(rounds), step.reason)
        heals.append(point)
        if on_heal is not None:
            on_heal(point)
        return step.ok

    since_heal = 0  # layers committed since the last heal
    stop_reason = None if heal_now() else "heal_failed"
    while stop_reason is None:
        if not remaining:
            stop_reason = "all_replaced"
            break
        if cap is not None and len(committed) >= cap:
            stop_reason = "cap"
            break
        heal_index = len(heals) - 1
        scores = dict(score_candidates(heal_index, tuple(committed), list(remaining), hint))
        if set(scores) != set(remaining):
            raise ValueError(f"score_candidates returned layers {sorted(scores)}, expected {remaining}")
        record = _decide(first_round_index + len(rounds), tuple(committed), scores, acceptance, p_min,
                         teacher_per_example, teacher_score)
        rounds.append(ContinuedRound(record, heal_index))
        if on_round is not None:
            on_round(rounds[-1])
        hint = {layer: candidate.order_key for layer, candidate in scores.items()}
        if record.accepted:
            committed.append(record.chosen)
            remaining.remove(record.chosen)
            since_heal += 1
            if since_heal < heal_every:
                continue
        elif since_heal == 0:
            stop_reason = "rejected"
            break
        since_heal = 0
        if not heal_now():
            stop_reason = "heal_failed"
    if since_heal > 0 and not heal_now():
        stop_reason = "heal_failed"
    last_ok = next((point for point in reversed(heals) if point.ok), None)
    return ContinuedResult(
        teacher_score=float(teacher_score), p_min=p_min, heal_every=heal_every, start_order=tuple(start_order),
        rounds=tuple(rounds), heals=tuple(heals), swap_order=tuple(committed), stop_reason=stop_reason,
        healed_layers=last_ok.layers if last_ok else (), healed_score=last_ok.score if last_ok else None)


def _decide(index: int, committed: tuple[int, ...], scores: Mapping[int, CandidateScore], acceptance: Acceptance,
            p_min: float, teacher_per_example: Sequence[float] | None, teacher_score: float) -> RoundRecord:
    """l* and its acceptance (the ordinary search's rules: `select_next_layer`, `acceptance.decide`)."""
    chosen = select_next_layer(scores)
    best = scores[chosen]
    decision = decide(acceptance, float(best.score), p_min, best.per_example, teacher_per_example, teacher_score)
    return RoundRecord(
        index=index, committed_before=committed,
        candidates={layer: cand if layer == chosen else replace(cand, per_example=None)
                    for layer, cand in scores.items()},
        chosen=chosen, score=float(best.score), accepted=decision.accepted, lcb=decision.lcb)
