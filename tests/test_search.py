"""Fast candidate evaluation (dtr_core/search/layerwise.py; the fast scorer dtr_core/search/scorer.py through
search.FastEvaluator): bit-identical logits from cached hidden states, and the fast search choosing exactly
what the plain search chooses."""

from __future__ import annotations

import copy

import pytest
import torch
from pipeline_support import toy_texts
from transformers import AutoModelForCausalLM

from dtr_core.search import layerwise
from dtr_core.search.acceptance import Acceptance, Tolerance
from dtr_core.evaluation.tasks import ClassificationTask, Example, LanguageModelingTask
from dtr_core.search.decisions import select_next_layer
from dtr_core.mixers import build_student
from dtr_core.models import TINY_CONFIGS, byte_tokenizer, load_model
from dtr_core.search.greedy_search import FastEvaluator, PlainEvaluator, encode_split, run_greedy_search
from dtr_core.hybrid.surgery import attention_module, restore_layers, swap_layers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- fixtures: a 6-layer tiny Llama, perturbed students, toy tasks ------------------------------------


def six_layer_llama(seed: int = 0):
    config = TINY_CONFIGS["tiny-llama"]()
    config.num_hidden_layers = 6
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def students_for(model, layers, noise=(0.0, 0.02, 0.05, 0.1, 0.2, 0.4), exact=()):
    """GLA students copied from the teacher, perturbed by layer-dependent noise (so scores differ);
    `exact` layers get a copy of the teacher's own attention (their swap changes nothing: ties)."""
    generator = torch.Generator().manual_seed(1)
    students = {}
    for layer in layers:
        if layer in exact:
            students[layer] = copy.deepcopy(attention_module(model, layer))
            continue
        student = build_student("gla", model.config, layer, teacher_attention=attention_module(model, layer))
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.add_(noise[layer % len(noise)] * torch.randn(parameter.shape, generator=generator))
        students[layer] = student.eval()
    return students


def toy_classification(verbalisers=None):
    texts = toy_texts(40, 0)
    examples = [Example(uid=f"c{i}", text=t, label="x" if i % 2 else "y") for i, t in enumerate(texts)]
    return ClassificationTask(
        name="toy-cls", load=lambda: examples, validation_size=24, test_size=4, template="{text} =",
        verbalisers=verbalisers or {"x": "A", "y": "B"},  # single bytes: one token each
    )


def toy_three_class(metric="accuracy", verbaliser_scoring=None):
    """Three imbalanced classes (x 1/2, y 1/3, z 1/6 of the rows) searched on `metric`."""
    texts = toy_texts(60, 2)
    labels = ("x", "x", "x", "y", "y", "z")
    examples = [Example(uid=f"t{i}", text=t, label=labels[i % 6]) for i, t in enumerate(texts)]
    return ClassificationTask(
        name="toy-3", load=lambda: examples, validation_size=30, test_size=6, template="{text} =",
        verbalisers={"x": "A", "y": "B", "z": "C"}, metric=metric, verbaliser_scoring=verbaliser_scoring,
    )


METRICS = ["accuracy", "macro_f1", "balanced_accuracy", "recall:y", "recall:z"]


def toy_lm():
    examples = [Example(uid=f"d{i}", text=t) for i, t in enumerate(toy_texts(20, 1))]
    return LanguageModelingTask(name="toy-lm", load=lambda: examples, validation_size=8, test_size=4, max_tokens=40)


def comparable(result):
    """What must agree between plain and fast search: decisions and every fully evaluated score."""
    return result.trajectory, result.best_layers, result.best_score, result.opt_layers, result.opt_score


def assert_same_scores(fast, plain):
    assert comparable(fast) == comparable(plain)
    for fast_round, plain_round in zip(fast.rounds, plain.rounds):
        assert set(fast_round.candidates) == set(plain_round.candidates)
        for layer, cand in fast_round.candidates.items():
            truth = plain_round.candidates[layer].score
            if cand.rejected_early:
                assert cand.upper_bound < plain_round.score or (
                    cand.upper_bound == plain_round.score and plain_round.chosen < layer
                ) or cand.upper_bound >= truth  # a bound is a bound
                assert truth <= cand.upper_bound * (1 + 1e-9)
            else:
                assert cand.score == truth


# ---- layerwise: logits from cached hidden states == the model's own ----------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
def test_layerwise_logits_are_bit_identical(name):
    model, _ = load_model(name)
    ids = torch.randint(0, 256, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding, as the scorer builds batches
    mask[2, 5:] = 0
    committed = {1: build_student("gla", model.config, 1, teacher_attention=attention_module(model, 1))}
    student = build_student("gated_deltanet", model.config, 2, teacher_attention=attention_module(model, 2))
    with torch.inference_mode():
        for logits_to_keep in (0, torch.tensor([4, 8, 12])):
            inputs = dict(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=logits_to_keep)
            originals = swap_layers(model, committed)
            try:
                reference = model(**inputs).logits
                trace = layerwise.trace_batch(model, inputs, keep=range(4))
                for start in range(4):
                    logits, spent = layerwise.logits_from(model, trace, start)
                    assert spent == 4 - start
                    assert torch.equal(logits, reference)
                # a candidate swap above the trace point: equal to a full forward of that hybrid
                candidate = swap_layers(model, {2: student})
                full = model(**inputs).logits
                logits, _ = layerwise.logits_from(model, trace, 2)
                restore_layers(model, candidate)
                assert torch.equal(logits, full) and not torch.equal(full, reference)
                # restarting from a kept layer below, or from the embeddings, is still exact
                sparse = layerwise.trace_batch(model, inputs, keep=[0])
                assert torch.equal(layerwise.logits_from(model, sparse, 3)[0], reference)
                none_kept = layerwise.trace_batch(model, inputs, keep=[])
                assert torch.equal(layerwise.logits_from(model, none_kept, 2)[0], reference)
            finally:
                restore_layers(model, originals)


def test_checkpoint_layers_under_a_budget():
    assert layerwise.checkpoint_layers(6, 10, None) == tuple(range(6))
    assert layerwise.checkpoint_layers(6, 10, 60) == tuple(range(6))
    assert layerwise.checkpoint_layers(6, 10, 35) == (0, 2, 4)
    assert layerwise.checkpoint_layers(6, 10, 10) == (0,)
    assert layerwise.checkpoint_layers(6, 10, 5) == ()
    assert layerwise.hidden_bytes(100, 64, 6) == 100 * 64 * 6 * 4


# ---- the fast search equals the plain search ---------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    model = six_layer_llama()
    return model, byte_tokenizer(), students_for(model, range(6))


@pytest.mark.parametrize("task_factory", [toy_classification, toy_lm], ids=["accuracy", "perplexity"])
def test_fast_search_equals_plain_search(setup, task_factory):
    model, tokenizer, students = setup
    task = task_factory()
    batches = encode_split(task, tokenizer, batch_size=task.kind == "classification" and 4 or 2)
    assert len(batches) > 2
    tolerance = Tolerance("relative", 0.5)  # lenient: several rounds
    plain, plain_teacher, plain_cost = run_greedy_search(model, task, batches, students, tolerance, fast=False)
    fast, fast_teacher, fast_cost = run_greedy_search(model, task, batches, students, tolerance, fast=True)
    assert fast_teacher.score == plain_teacher.score
    assert len(plain.rounds) >= 3
    assert_same_scores(fast, plain)
    assert plain_cost.candidate_evaluations == sum(len(r.candidates) for r in plain.rounds)
    assert fast_cost.layer_forwards < plain_cost.layer_forwards
    assert fast_cost.trace_passes == 1  # later rounds only recompute the states above the committed layer
    if task.kind == "classification":  # the perplexity bound (unseen tokens at 0 nats) is weak: rarely fires
        assert fast_cost.rejected_early > 0
    # prefix reuse alone (no rejection, plain order) gives the same too
    slow_order, _, reuse_cost = run_greedy_search(model, task, batches, students, tolerance, early_rejection=False)
    assert comparable(slow_order) == comparable(plain) and reuse_cost.rejected_early == 0
    assert fast_cost.layer_forwards <= reuse_cost.layer_forwards < plain_cost.layer_forwards


@pytest.mark.parametrize("metric", METRICS)
def test_fast_search_equals_plain_search_for_every_metric(setup, metric):
    """Each metric's early-rejection bound keeps the fast search's answer the plain search's, and the greedy
    listing's (dtr_core/search/reference.py) on the same full evaluations."""
    from dtr_core.evaluation.results import evaluate
    from dtr_core.search.reference import greedy_listing

    model, tokenizer, students = setup
    task = toy_three_class(metric)
    batches = encode_split(task, tokenizer, batch_size=4)
    tolerance = Tolerance("relative", 0.5)
    plain, plain_teacher, _ = run_greedy_search(model, task, batches, students, tolerance, fast=False)
    fast, fast_teacher, fast_cost = run_greedy_search(model, task, batches, students, tolerance, fast=True)
    assert fast_teacher.score == plain_teacher.score == plain_teacher.metrics[metric]
    assert_same_scores(fast, plain)
    assert len(plain.rounds) >= 2

    def score(linear_layers):
        originals = swap_layers(model, {layer: students[layer] for layer in linear_layers})
        try:
            return evaluate(model, tokenizer, task, "validation", batch_size=4).score
        finally:
            restore_layers(model, originals)

    listing = greedy_listing(score, sorted(students), 0.5)
    assert list(fast.swap_order) == listing["swap_order"]
    assert [(r.chosen, r.score, r.accepted) for r in fast.rounds] == \
        [(r["chosen"], r["score"], r["accepted"]) for r in listing["rounds"]]
    for ours, theirs in zip(fast.rounds, listing["rounds"]):
        for layer, candidate in ours.candidates.items():
            if candidate.rejected_early:  # a bound is never below the score it stood for
                assert theirs["scores"][layer] <= candidate.upper_bound
            else:
                assert candidate.score == theirs["scores"][layer]


def test_early_rejection_fires_for_non_accuracy_metrics(setup):
    """The bounds are not vacuous: with several batches, some candidates stop early under each metric."""
    model, tokenizer, students = setup
    for metric in ("macro_f1", "balanced_accuracy"):
        task = toy_three_class(metric)
        batches = encode_split(task, tokenizer, batch_size=2)
        _, _, cost = run_greedy_search(model, task, batches, students, Tolerance("relative", 0.5),
                                       first_hint={layer: -float(layer) for layer in range(6)})
        assert cost.rejected_early > 0, metric


def test_bootstrap_is_refused_up_front_for_non_mean_metrics(setup):
    model, tokenizer, students = setup
    for metric in ("macro_f1", "balanced_accuracy", "recall:y"):
        task = toy_three_class(metric)
        batches = encode_split(task, tokenizer, batch_size=4)
        with pytest.raises(ValueError, match=f"bootstrap acceptance needs .* searched on {metric}"):
            run_greedy_search(model, task, batches, students, Tolerance(), Acceptance("bootstrap"))
    with pytest.raises(ValueError, match="searched on perplexity"):
        run_greedy_search(model, toy_lm(), encode_split(toy_lm(), tokenizer), students, Tolerance(),
                          Acceptance("bootstrap"))


def test_scores_equal_evaluate(setup):
    """The evaluators score exactly as `evaluate` (same batches, same summary)."""
    from dtr_core.evaluation.results import evaluate

    model, tokenizer, students = setup
    task = toy_classification()
    batches = encode_split(task, tokenizer)
    teacher = PlainEvaluator(model, task, batches, students).evaluate_layers(())
    reference = evaluate(model, tokenizer, task, "validation")
    assert teacher.score == reference.score and teacher.per_example == reference.per_example
    scores = FastEvaluator(model, task, batches, students, early_rejection=False)((), [0, 3, 5])
    originals = swap_layers(model, {3: students[3]})
    try:
        assert scores[3].score == evaluate(model, tokenizer, task, "validation").score
    finally:
        restore_layers(model, originals)


def test_ties_and_adversarial_order_choose_like_plain():
    """Exact-copy students tie with each other (all score the teacher); a hint that puts the highest
    layers first must still end on the lowest tied layer, as the plain search does."""
    model = six_layer_llama(seed=3)
    students = students_for(model, range(6), noise=(0.3,), exact=(1, 2, 4))
    task = toy_classification()
    batches = encode_split(task, byte_tokenizer(), batch_size=4)
    plain = PlainEvaluator(model, task, batches, students)
    fast = FastEvaluator(model, task, batches, students, first_hint={layer: float(layer) for layer in range(6)})
    plain_scores = plain((), list(range(6)))
    fast_scores = fast((), list(range(6)))
    assert select_next_layer(fast_scores) == select_next_layer(plain_scores)
    assert plain_scores[1].score == plain_scores[2].score == plain_scores[4].score
    full = greedy = None
    for tolerance in (Tolerance("relative", 0.0), Tolerance("relative", 0.3)):
        full, _, _ = run_greedy_search(model, task, batches, students, tolerance, fast=False)
        greedy, _, _ = run_greedy_search(model, task, batches, students, tolerance,
                                         first_hint={layer: float(layer) for layer in range(6)})  # fmt: skip
        assert_same_scores(greedy, full)


@pytest.mark.parametrize("limit", [0, 3 * 1024])
def test_cache_limit_recomputes_with_same_answer(setup, limit):
    model, tokenizer, students = setup
    task = toy_classification()
    batches = encode_split(task, tokenizer, batch_size=8)
    full = FastEvaluator(model, task, batches, students)
    capped = FastEvaluator(model, task, batches, students, cache_limit_bytes=limit)
    assert len(capped.kept_layers) < 6
    a = full((2,), [0, 1, 3, 4, 5])
    b = capped((2,), [0, 1, 3, 4, 5])
    assert {k: v.score for k, v in a.items()} == {k: v.score for k, v in b.items()}
    assert capped.cost.layer_forwards > full.cost.layer_forwards
    assert capped.cost.cache_bytes <= limit
    # the next round (layer 4 committed) retraces incrementally, and still agrees with a fresh evaluator
    fresh = FastEvaluator(model, task, batches, students, cache_limit_bytes=limit)
    truth = PlainEvaluator(model, task, batches, students)((2, 4), [0, 1, 3, 5])
    for evaluator in (full, capped, fresh):
        scores = evaluator((2, 4), [0, 1, 3, 5])
        assert select_next_layer(scores) == select_next_layer(truth)
        assert all(v.score == truth[k].score for k, v in scores.items() if not v.rejected_early)
    assert full.cost.trace_passes == capped.cost.trace_passes == 1


def test_bootstrap_search_is_identical_too(setup):
    model, tokenizer, students = setup
    task = toy_classification()
    batches = encode_split(task, tokenizer, batch_size=4)
    acceptance = Acceptance("bootstrap", n_resamples=500, seed=0)
    plain, _, _ = run_greedy_search(model, task, batches, students, Tolerance("relative", 0.3), acceptance, fast=False)
    fast, _, _ = run_greedy_search(model, task, batches, students, Tolerance("relative", 0.3), acceptance)
    assert_same_scores(fast, plain)
    assert [r.lcb for r in fast.rounds] == [r.lcb for r in plain.rounds]


def test_evaluator_rejects_bad_calls(setup):
    model, tokenizer, students = setup
    task = toy_classification()
    batches = encode_split(task, tokenizer)
    fast = FastEvaluator(model, task, batches, {0: students[0], 1: students[1]})
    with pytest.raises(ValueError, match="already committed"):
        fast((0,), [0, 1])
    with pytest.raises(ValueError, match="no student"):
        fast((), [2])


def test_search_cost_benchmark_runs_on_a_tiny_model(capsys):
    from benchmarks.search_cost import main

    assert main(["--model", "tiny-llama", "--task", "sentiment", "--limit", "8", "--rounds", "2",
                 "--batch-size", "4", "--mixer", "gla", "--json"]) == 0  # fmt: skip
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["same_answer"] and len(result["trajectory"]) == 2
    plain, fast = result["rows"]
    assert plain["evaluator"] == "plain" and fast["layer_forwards"] < plain["layer_forwards"]
