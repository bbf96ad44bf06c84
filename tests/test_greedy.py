"""Greedy search decisions (dtr_core/search/decisions.py) and acceptance rules (dtr_core/search/acceptance.py) on hand-built
score tables: no model involved."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dtr_core.search.acceptance import Acceptance, Tolerance, accept_point, bootstrap_lcb, decide
from dtr_core.search.decisions import CandidateScore, GreedyResult, RoundRecord, greedy_replace, layer_cap, select_next_layer

# Teacher 0.80, relative 5% -> P_min = 0.76. Keys: the committed set before the round.
TABLE = {
    frozenset(): {0: 0.70, 1: 0.81, 2: 0.79, 3: 0.75},
    frozenset({1}): {0: 0.72, 2: 0.78, 3: 0.78},  # tie 2/3 -> layer 2
    frozenset({1, 2}): {0: 0.60, 3: 0.755},  # below P_min -> stop
    frozenset({1, 2, 3}): {0: 0.50},
}


def table_scorer(table, calls=None):
    def score(committed, candidates, order_hint):
        if calls is not None:
            calls.append((committed, list(candidates), order_hint))
        row = table[frozenset(committed)]
        return {layer: CandidateScore(row[layer]) for layer in candidates}

    return score


def run(table=TABLE, **kwargs):
    kwargs.setdefault("tolerance", Tolerance("relative", 0.05))
    return greedy_replace(table_scorer(table), 4, range(4), 0.80, **kwargs)


def test_trajectory_best_and_opt_differ():
    result = run()
    assert result.p_min == pytest.approx(0.76)
    assert result.trajectory == [(1, 0.81, True), (2, 0.78, True), (3, 0.755, False)]
    assert result.best_layers == (1,) and result.best_score == 0.81  # M_best: highest score on the path
    assert result.opt_layers == (1, 2) and result.opt_score == 0.78  # M_opt: most layers within tolerance
    assert result.swap_order == (1, 2)
    assert result.stop_reason == "rejected"
    assert [r.new_best for r in result.rounds] == [True, False, False]
    assert result.rounds[0].candidates[3].score == 0.75  # every candidate's score is kept


def test_ties_go_to_lowest_layer():
    assert select_next_layer({3: 0.5, 1: 0.5, 2: 0.4}) == 1
    assert select_next_layer({2: CandidateScore(0.5), 0: CandidateScore(None, rejected_early=True, upper_bound=0.9)}) == 2
    with pytest.raises(ValueError):
        select_next_layer({0: CandidateScore(None, rejected_early=True, upper_bound=0.1)})


def test_immediate_stop_keeps_the_teacher():
    table = {frozenset(): {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.3}}
    result = run(table)
    assert result.trajectory == [(2, 0.3, False)]
    assert result.opt_layers == () and result.opt_score == 0.80
    assert result.best_layers == () and result.best_score == 0.80


def test_best_updates_even_when_not_accepted():
    # absolute P_min above the teacher: 0.85 beats the teacher (M_best) but is not accepted (M_opt stays full)
    table = {frozenset(): {0: 0.85, 1: 0.70, 2: 0.70, 3: 0.70}}
    result = run(table, tolerance=Tolerance("absolute", 0.9))
    assert result.best_layers == (0,) and result.best_score == 0.85
    assert result.opt_layers == () and result.stop_reason == "rejected"


def test_equal_to_best_moves_best_to_more_layers():
    table = {frozenset(): {0: 0.80, 1: 0.1, 2: 0.1, 3: 0.1}, frozenset({0}): {1: 0.80, 2: 0.5, 3: 0.1},
             frozenset({0, 1}): {2: 0.1, 3: 0.1}}  # fmt: skip
    result = run(table)
    assert result.best_layers == (0, 1) and result.best_score == 0.80


def test_runs_to_full_replacement_and_caps():
    table = {frozenset(s): {l: 0.9 - 0.01 * l for l in range(4) if l not in s}
             for s in [(), (0,), (0, 1), (0, 1, 2)]}  # fmt: skip
    full = run(table)
    assert full.swap_order == (0, 1, 2, 3) and full.stop_reason == "all_replaced" and len(full.rounds) == 4
    capped = run(table, max_layers=1)
    assert capped.swap_order == (0,) and capped.stop_reason == "cap" and len(capped.rounds) == 1
    half = run(table, target_fraction=0.5)
    assert half.swap_order == (0, 1) and half.stop_reason == "cap"
    assert layer_cap(10, None, 0.3) == 3 and layer_cap(10, 2, 0.3) == 2 and layer_cap(10) is None
    with pytest.raises(ValueError):
        layer_cap(10, None, 1.5)


def test_failed_students_are_never_offered():
    calls = []
    table = {frozenset(): {0: 0.7, 2: 0.79, 3: 0.75}, frozenset({2}): {0: 0.5, 3: 0.5}}
    result = greedy_replace(table_scorer(table, calls), 4, [0, 2, 3], 0.80, Tolerance())
    assert result.swap_order == (2,) and result.available_layers == (0, 2, 3)
    assert all(1 not in candidates for _, candidates, _ in calls)
    assert calls[0][0] == () and calls[0][1] == [0, 2, 3]


def test_order_hint_is_last_rounds_scores():
    calls = []
    greedy_replace(table_scorer(TABLE, calls), 4, range(4), 0.80, Tolerance())
    assert calls[0][2] is None
    assert calls[1][2] == {0: 0.70, 1: 0.81, 2: 0.79, 3: 0.75}
    assert calls[1][0] == (1,) and calls[2][0] == (1, 2)


def test_bad_scorer_output_raises():
    with pytest.raises(ValueError, match="expected"):
        greedy_replace(lambda c, cand, h: {0: CandidateScore(0.5)}, 4, range(4), 0.8, Tolerance())


def test_resume_replays_persisted_rounds():
    persisted = []
    first = greedy_replace(table_scorer(TABLE), 4, range(4), 0.80, Tolerance(), on_round=persisted.append)
    assert len(persisted) == 3
    stored = [RoundRecord.from_dict(json.loads(json.dumps(r.to_dict()))) for r in persisted[:2]]
    calls, new = [], []
    resumed = greedy_replace(table_scorer(TABLE, calls), 4, range(4), 0.80, Tolerance(), completed_rounds=stored,
                             on_round=new.append)  # fmt: skip
    assert [c[0] for c in calls] == [(1, 2)]  # only the unfinished round is evaluated
    assert [r.index for r in new] == [2]
    assert resumed.to_dict() == first.to_dict()
    wrong = [RoundRecord.from_dict({**stored[0].to_dict(), "committed_before": [3]})]
    with pytest.raises(ValueError, match="persisted round 0"):
        greedy_replace(table_scorer(TABLE), 4, range(4), 0.80, Tolerance(), completed_rounds=wrong)


def test_result_json_round_trip():
    result = run()
    data = json.loads(json.dumps(result.to_dict()))
    assert GreedyResult.from_dict(data) == result


# ---- acceptance -------------------------------------------------------------------------------------


def test_tolerance():
    assert Tolerance("relative", 0.05).threshold(0.8) == pytest.approx(0.76)
    assert Tolerance("relative", 0.05).threshold(-20.0) == pytest.approx(-21.0)  # negated perplexity
    assert Tolerance("absolute", 0.5).threshold(0.8) == 0.5
    for bad in [dict(mode="relative", value=1.0), dict(mode="relative", value=-0.1), dict(mode="percent", value=0.1)]:
        with pytest.raises(ValueError):
            Tolerance(**bad)


def _noisy_pair(n=400):
    teacher = np.zeros(n)
    teacher[:320] = 1  # accuracy 0.80
    candidate = teacher.copy()
    candidate[:80] = 0  # loses 80 teacher-correct examples...
    candidate[320:392] = 1  # ...wins 72 teacher-wrong ones: accuracy 0.78, but noisy
    return teacher, candidate


def test_bootstrap_is_stricter_than_point_on_a_noisy_candidate():
    teacher, candidate = _noisy_pair()
    p_min = Tolerance().threshold(0.80)  # 0.76
    assert accept_point(candidate.mean(), p_min)
    acc = Acceptance(mode="bootstrap", n_resamples=2000, seed=1)
    decision = decide(acc, float(candidate.mean()), p_min, candidate, teacher, 0.80)
    assert not decision.accepted and decision.lcb < p_min < candidate.mean()
    # the same score reached by a near-copy of the teacher is accepted: the bound tracks the noise
    quiet = teacher.copy()
    quiet[:8] = 0  # accuracy 0.78 too
    assert quiet.mean() == candidate.mean()
    quiet_decision = decide(acc, float(quiet.mean()), p_min, quiet, teacher, 0.80)
    assert quiet_decision.accepted and quiet_decision.lcb >= p_min


def test_bootstrap_deterministic_and_exact_on_identical():
    teacher, candidate = _noisy_pair()
    a = bootstrap_lcb(candidate, teacher, 0.8, n_resamples=500, seed=3)
    assert a == bootstrap_lcb(candidate, teacher, 0.8, n_resamples=500, seed=3)
    assert a != bootstrap_lcb(candidate, teacher, 0.8, n_resamples=500, seed=4)
    assert bootstrap_lcb(teacher, teacher, 0.8) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="mean of per-example"):
        bootstrap_lcb(candidate, teacher, 0.5)
    with pytest.raises(ValueError):
        bootstrap_lcb(candidate[:10], teacher, 0.8)


def test_greedy_with_bootstrap_stops_where_point_commits():
    teacher, candidate = _noisy_pair()
    good = teacher.copy()
    table = {frozenset(): {0: CandidateScore(float(candidate.mean()), tuple(candidate)),
                           1: CandidateScore(0.5, tuple([1.0] * 50 + [0.0] * 50))},
             frozenset({0}): {1: CandidateScore(float(good.mean()), tuple(good))}}  # fmt: skip

    def score(committed, candidates, hint):
        return {layer: table[frozenset(committed)][layer] for layer in candidates}

    point = greedy_replace(score, 2, [0, 1], 0.8, Tolerance(), Acceptance("point"))
    boot = greedy_replace(score, 2, [0, 1], 0.8, Tolerance(), Acceptance("bootstrap", seed=1),
                          teacher_per_example=tuple(teacher))  # fmt: skip
    assert point.opt_layers == (0, 1)
    assert boot.opt_layers == () and boot.stop_reason == "rejected" and boot.rounds[0].lcb < boot.p_min
    with pytest.raises(ValueError, match="teacher_per_example"):
        greedy_replace(score, 2, [0, 1], 0.8, Tolerance(), Acceptance("bootstrap"))
