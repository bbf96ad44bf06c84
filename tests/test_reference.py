"""The reference listing (dtr_core/search/reference.py) is the oracle: the library's optimised path
(`run_greedy_search`: the fast scorer through `FastEvaluator` + greedy_replace, on the same distilled
students) must choose the same swap order, M_best and M_opt, with the same scores."""

from __future__ import annotations

import pytest
import torch

from dtr_core.search.acceptance import Tolerance
from distill_support import write_corpus
from pipeline_support import toy_texts
from dtr_core.distill.config import DistillConfig
from dtr_core.distill.corpus import Corpus
from dtr_core.distill.training import load_students, read_layer_results
from dtr_core.evaluation.tasks import ClassificationTask, Example, LanguageModelingTask
from dtr_core.models import load_model
from dtr_core.search.reference import run_reference
from dtr_core.search.greedy_search import encode_split, run_greedy_search


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matmuls: one thread is fastest


def toy_tasks():
    cls_examples = [Example(uid=f"c{i}", text=t, label="x" if i % 3 else "y") for i, t in enumerate(toy_texts(60, 0))]
    lm_examples = [Example(uid=f"d{i}", text=t) for i, t in enumerate(toy_texts(24, 1))]
    return [
        ClassificationTask(name="toy-cls", load=lambda: cls_examples, validation_size=40, test_size=4,
                           template="{text} =", verbalisers={"x": "A", "y": "B"}),
        LanguageModelingTask(name="toy-lm", load=lambda: lm_examples, validation_size=12, test_size=4, max_tokens=40),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """tiny-llama with students distilled by the reference's own steps 1-2 (shared by the tests below)."""
    model, tokenizer = load_model("tiny-llama")
    work_dir = tmp_path_factory.mktemp("dtr-reference")
    corpus = Corpus(write_corpus(work_dir / "corpus.txt"), tokenizer)
    # 4 steps leave the students worse than predicting the mean; the verdict threshold is off so that every
    # layer stays a candidate (the search, not the students' quality, is under test)
    config = DistillConfig(steps=4, batch_size=2, seq_lens=(32,), eval_sequences=2, warmup_steps=1, log_every=1,
                           max_normalized_loss=1e9)
    return model, tokenizer, corpus, config, work_dir


@pytest.mark.parametrize("task_index", [0, 1], ids=["accuracy", "perplexity"])
@pytest.mark.parametrize("tolerance", [0.05, 0.5])
def test_optimised_path_matches_reference(distilled, task_index, tolerance):
    model, tokenizer, corpus, config, work_dir = distilled
    task = toy_tasks()[task_index]
    reference = run_reference(model, tokenizer, corpus, task, "gla", work_dir, config, tolerance=tolerance)

    students = load_students(work_dir / "students", model)
    assert sorted(students) == [0, 1, 2, 3]
    losses = read_layer_results(work_dir / "students")
    first_hint = {layer: -losses[layer].normalized_loss for layer in students}
    batches = encode_split(task, tokenizer)  # the batches `evaluate` builds: scores agree bit for bit
    result, teacher, cost = run_greedy_search(model, task, batches, students, Tolerance("relative", tolerance),
                                              first_hint=first_hint)  # fmt: skip

    assert teacher.score == reference["teacher_score"]
    assert list(result.swap_order) == reference["swap_order"]
    assert list(result.best_layers) == reference["best_layers"]
    assert list(result.opt_layers) == reference["opt_layers"]
    assert [r.chosen for r in result.rounds] == [r["chosen"] for r in reference["rounds"]]
    assert [r.accepted for r in result.rounds] == [r["accepted"] for r in reference["rounds"]]
    assert [r.score for r in result.rounds] == [r["score"] for r in reference["rounds"]]
    for fast_round, reference_round in zip(result.rounds, reference["rounds"]):
        for layer, candidate in fast_round.candidates.items():
            if candidate.score is not None:
                assert candidate.score == reference_round["scores"][layer]
            else:  # rejected early: its bound proves it could not have been chosen
                assert candidate.upper_bound >= reference_round["scores"][layer] * (1 - 1e-9)
                assert reference_round["scores"][layer] <= reference_round["score"]
    if tolerance == 0.5:
        assert len(result.rounds) >= 2


@pytest.mark.parametrize(("task_index", "heal_every", "tolerance"), [
    (0, 1, Tolerance("relative", 0.5)),
    (1, 2, Tolerance("relative", 0.05)),
    (0, 2, Tolerance("absolute", 0.66)),  # above the random teacher: rounds are rejected, then healed and rerun
], ids=["accuracy-every-1", "perplexity-every-2", "rejections-every-2"])
def test_continued_search_matches_the_reference_listing(distilled, task_index, heal_every, tolerance):
    """Heal-then-continue: `run_continued_search` (the core decisions `continue_with_healing`, fast scorer,
    in-memory heals) and the listing's step 4 heal the same layers, score the same and commit the same order."""
    from dtr_core.heal.config import HealConfig
    from dtr_core.search.reference import run_continued_reference
    from dtr_core.search.greedy_search import run_continued_search

    model, tokenizer, corpus, config, work_dir = distilled
    task = toy_tasks()[task_index]
    ordinary = run_reference(model, tokenizer, corpus, task, "gla", work_dir, config, tolerance=0.5)
    start = ordinary["swap_order"][:1] or [ordinary["rounds"][0]["chosen"]]  # room left for the continued rounds
    heal_config = HealConfig(steps=3, batch_size=2, seq_len=32, lr=1e-2, eval_batches=1, log_every=1)
    reference = run_continued_reference(model, tokenizer, corpus, task, work_dir / "students", start, heal_config,
                                        heal_every, tolerance=tolerance.value, tolerance_mode=tolerance.mode)

    students = load_students(work_dir / "students", model)
    before = {layer: {k: v.clone() for k, v in s.state_dict().items()} for layer, s in students.items()}
    result, healed = run_continued_search(model, task, encode_split(task, tokenizer), students, start, heal_config,
                                          corpus, heal_every, tolerance)

    assert result.p_min == reference["p_min"]
    assert list(result.swap_order) == reference["swap_order"]
    assert result.stop_reason == reference["stop_reason"]
    assert [list(h.swap_order) for h in result.heals] == [h["swap_order"] for h in reference["heals"]]
    assert [h.score for h in result.heals] == [h["score"] for h in reference["heals"]]
    assert [(r.record.chosen, r.record.score, r.record.accepted, r.heal_index) for r in result.rounds] == \
        [(r["chosen"], r["score"], r["accepted"], r["heal_index"]) for r in reference["rounds"]]
    for ours, listed in zip(result.rounds, reference["rounds"]):
        for layer, candidate in ours.record.candidates.items():
            if candidate.score is not None:
                assert candidate.score == listed["scores"][layer]
    assert list(result.healed_layers) == reference["healed_layers"] == sorted(healed)
    assert result.healed_score == reference["healed_score"]
    assert len(result.rounds) >= 1 and len(result.heals) >= 1  # the search did continue from a heal
    if tolerance.mode == "absolute":  # rejected right after a heal: stop (a heal and rerun: tests/test_heal.py)
        assert not result.rounds[-1].record.accepted and result.stop_reason == "rejected"
    else:
        assert len(result.heals) >= 2  # healed again after committing
    # the healed students moved; the caller's students did not
    assert any(not torch.equal(healed[layer].state_dict()[name], before[layer][name])
               for layer in healed for name in before[layer])
    assert all(torch.equal(students[layer].state_dict()[name], tensor)
               for layer, state in before.items() for name, tensor in state.items())
