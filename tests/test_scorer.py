"""The fast greedy scorer (dtr_core/search/scorer.py) against the plain forms: `PlainEvaluator`'s full scores and the
reference listing's swap order and scores, with early rejection on and off, on one thread and several."""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_reference import distilled, toy_tasks  # noqa: F401  (a fixture: tiny-llama with students distilled)
from test_search import METRICS, six_layer_llama, students_for, toy_classification, toy_lm, toy_three_class

from dtr_core.search import layerwise
from dtr_core.search.acceptance import Tolerance
from dtr_core.distill.training import load_students
from dtr_core.evaluation.metrics import accuracy, score_upper_bound
from dtr_core.search.decisions import greedy_replace, select_next_layer
from dtr_core.models import byte_tokenizer
from dtr_core.search.reference import run_reference
from dtr_core.search.scorer import CommittedHybrid, RoundScorer, rejected
from dtr_core.search.greedy_search import PlainEvaluator, encode_split
from dtr_core.hybrid.surgery import attention_module, decoder_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup():
    model = six_layer_llama()
    return model, byte_tokenizer(), students_for(model, range(6))


def batches_for(task):
    return encode_split(task, byte_tokenizer(), batch_size=4 if task.kind == "classification" else 2)


def assert_same_as_plain(scores, plain, early_rejection):
    """Full scores equal the plain ones bit for bit; a rejected candidate's bound proves it could not win."""
    chosen = select_next_layer(plain)
    assert select_next_layer(scores) == chosen
    for layer, cand in scores.items():
        truth = plain[layer]
        if cand.rejected_early:
            assert early_rejection and layer != chosen and cand.evaluated_fraction < 1
            assert truth.score <= cand.upper_bound * (1 + 1e-12)
        else:
            assert cand.score == truth.score and cand.per_example == truth.per_example


TASK_FACTORIES = [toy_classification, toy_lm] + [functools.partial(toy_three_class, metric) for metric in METRICS]
TASK_IDS = ["accuracy", "perplexity"] + [f"3-class-{metric}" for metric in METRICS]


@pytest.mark.parametrize("early_rejection", [True, False], ids=["rejection", "no-rejection"])
@pytest.mark.parametrize("task_factory", TASK_FACTORIES, ids=TASK_IDS)
def test_round_scorer_equals_plain_evaluator(setup, task_factory, early_rejection):
    model, _, students = setup
    task = task_factory()
    batches = batches_for(task)
    teacher_attention = [attention_module(model, layer) for layer in range(6)]
    plain = PlainEvaluator(model, task, batches, students)
    rejections = 0
    for committed in [(), (3,), (3, 1)]:
        candidates = [layer for layer in range(6) if layer not in committed]
        hybrid = CommittedHybrid(model, batches, students, committed)
        scorer = RoundScorer(hybrid, task, early_rejection=early_rejection)
        scores = {layer: scorer.score(layer) for layer in scorer.order(candidates)}
        assert_same_as_plain(scores, plain(committed, candidates), early_rejection)
        rejections += sum(cand.rejected_early for cand in scores.values())
        assert [attention_module(hybrid.model, layer) is students[layer] for layer in range(6)] == \
            [layer in committed for layer in range(6)]  # scoring swapped nothing into the hybrid
    assert [attention_module(model, layer) for layer in range(6)] == teacher_attention  # the teacher is untouched
    if early_rejection and task.kind == "classification":  # the perplexity bound (0 nats unseen) rarely fires
        assert rejections > 0


def test_threads_score_one_round_like_plain(setup):
    """Candidates scored concurrently share the round's best (rejection) and score exactly as one thread."""
    model, _, students = setup
    task = toy_classification()
    batches = batches_for(task)
    plain = PlainEvaluator(model, task, batches, students)((2,), [0, 1, 3, 4, 5])
    for early_rejection in (True, False):
        scorer = RoundScorer(CommittedHybrid(model, batches, students, (2,)), task, early_rejection=early_rejection)
        with ThreadPoolExecutor(max_workers=3) as pool:
            scores = dict(zip([0, 1, 3, 4, 5], pool.map(scorer.score, [0, 1, 3, 4, 5])))
        assert_same_as_plain(scores, plain, early_rejection)
        assert scorer.cost.candidate_evaluations == 5
        assert scorer.cost.completed_evaluations + scorer.cost.rejected_early == 5


@pytest.mark.parametrize("kept", [6, 3], ids=["all-layers", "capped"])
def test_commit_retraces_like_a_fresh_hybrid(setup, kept):
    model, _, students = setup
    task = toy_classification()
    batches = batches_for(task)
    tokens = sum(batch.input_ids.numel() for batch in batches)
    limit = kept * layerwise.hidden_bytes(tokens, model.config.hidden_size)  # 3 layers: every second one
    hybrid = CommittedHybrid(model, batches, students, (2,), cache_limit_bytes=limit)
    stale = RoundScorer(hybrid, task)
    traced = hybrid.cost.layer_forwards
    hybrid.commit(1)
    fresh = CommittedHybrid(model, batches, students, (2, 1), cache_limit_bytes=limit)
    assert hybrid.kept_layers == fresh.kept_layers == ((0, 2, 4) if kept == 3 else tuple(range(6)))
    for ours, theirs in zip(hybrid.traces, fresh.traces):
        assert ours.hidden.keys() == theirs.hidden.keys()
        assert all(torch.equal(ours.hidden[i], theirs.hidden[i]) for i in ours.hidden)
    assert 0 < hybrid.cost.layer_forwards - traced < traced  # only the layers up to the last kept one ran again
    assert hybrid.cost.trace_passes == 1
    with pytest.raises(RuntimeError, match="moved on"):
        stale.score(0)
    plain = PlainEvaluator(model, task, batches, students)((2, 1), [0, 3, 4, 5])
    scorer = RoundScorer(hybrid, task)
    assert_same_as_plain({layer: scorer.score(layer) for layer in scorer.order([0, 3, 4, 5])}, plain, True)
    with pytest.raises(ValueError, match="already committed"):
        scorer.score(1)
    with pytest.raises(ValueError, match="no student"):
        RoundScorer(CommittedHybrid(model, batches, {0: students[0]}), task).order([0, 1])


def test_rejection_rule_is_exact():
    """Ties go to the lower layer (classification); language modelling drops only clearly below the best."""
    assert not rejected("classification", 0.5, None, 3)
    assert rejected("classification", 0.45, (0.5, 4), 3)
    assert rejected("classification", 0.5, (0.5, 1), 3)  # a tie, and the best has the lower layer
    assert not rejected("classification", 0.5, (0.5, 4), 3)
    assert not rejected("language_modeling", 0.5, (0.5, 1), 3)
    assert not rejected("language_modeling", 0.5 * (1 - 1e-10), (0.5, 1), 3)
    assert rejected("language_modeling", 0.5 * (1 - 1e-8), (0.5, 1), 3)
    # the classification bound and an accuracy with the same count are the same float; one count more is larger
    for n in range(1, 201):
        previous = -math.inf
        for count in range(n + 1):
            values = [1.0] * count + [0.0] * (n - count)
            bound = score_upper_bound("classification", values, [1.0] * n, n)
            assert bound == accuracy(["a"] * n, ["a"] * count + ["b"] * (n - count)) and bound > previous
            previous = bound


@pytest.mark.parametrize("task_index", [0, 1], ids=["accuracy", "perplexity"])
def test_per_round_scorers_match_the_reference_listing(distilled, task_index):  # noqa: F811
    """The flow's way (a fresh hybrid and scorer per round, candidates on two threads in hint order) chooses
    the reference listing's swap order with its scores, with early rejection on and off."""
    model, tokenizer, token_ids, config, work_dir = distilled
    task = toy_tasks()[task_index]
    reference = run_reference(model, tokenizer, token_ids, task, "gla", work_dir, config, tolerance=0.5)
    students = load_students(work_dir / "students", model)
    batches = encode_split(task, tokenizer)
    teacher = PlainEvaluator(model, task, batches, students).evaluate_layers(())
    assert teacher.score == reference["teacher_score"]

    for early_rejection in (True, False):
        def score_candidates(committed, candidates, hint):
            scorer = RoundScorer(CommittedHybrid(model, batches, students, committed), task,
                                 early_rejection=early_rejection)
            order = sorted(candidates, key=lambda layer: (-(hint or {}).get(layer, -math.inf), layer))
            with ThreadPoolExecutor(max_workers=2) as pool:
                return dict(zip(order, pool.map(scorer.score, order)))

        result = greedy_replace(score_candidates, len(decoder_layers(model)), students, teacher.score,
                                Tolerance("relative", 0.5))
        assert list(result.swap_order) == reference["swap_order"] and len(result.rounds) >= 2
        assert list(result.best_layers) == reference["best_layers"]
        assert list(result.opt_layers) == reference["opt_layers"]
        assert [(r.chosen, r.score, r.accepted) for r in result.rounds] == \
            [(r["chosen"], r["score"], r["accepted"]) for r in reference["rounds"]]
        for ours, theirs in zip(result.rounds, reference["rounds"]):
            for layer, candidate in ours.candidates.items():
                if candidate.rejected_early:
                    assert early_rejection and theirs["scores"][layer] <= candidate.upper_bound * (1 + 1e-12)
                else:
                    assert candidate.score == theirs["scores"][layer]
