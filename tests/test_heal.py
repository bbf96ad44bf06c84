"""Healing a hybrid end to end (`dtr_core.heal`, `dtr heal`): it lowers the held-out KL, trains the students
only, keeps everything else bit-identical, puts the students back when it diverges, and a killed heal
continues from its checkpoint to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from distill_support import write_corpus
from pipeline_support import wait_for

from dtr_core.distill.corpus import Corpus
from dtr_core.heal.config import HealConfig
from dtr_core.heal.training import heal, held_out_kl, student_parameters
from dtr_core.hybrid.build import build_hybrid, save_hybrid
from dtr_core.models import byte_tokenizer, random_model

CONFIG = HealConfig(steps=30, batch_size=2, seq_len=32, lr=3e-3, eval_batches=2, log_every=5)


@pytest.fixture
def teacher():
    return random_model("tiny-llama", seed=0)


@pytest.fixture
def corpus(tmp_path):
    return Corpus(write_corpus(tmp_path / "corpus.txt"), byte_tokenizer())


def hybrid_of(teacher, layers=(1, 2)):
    return build_hybrid(teacher, list(layers), "gated_deltanet")


def frozen_state(model) -> dict[str, torch.Tensor]:
    students = set(student_parameters(model))
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if name not in students}


def some_batch(corpus) -> torch.Tensor:
    return corpus.rows().take(CONFIG.batch_size, CONFIG.seq_len)


def test_heal_lowers_the_held_out_kl_and_trains_only_the_students(teacher, corpus):
    hybrid = hybrid_of(teacher)
    frozen_before = frozen_state(hybrid)
    students_before = {name: p.detach().clone() for name, p in student_parameters(hybrid).items()}
    result = heal(teacher, hybrid, corpus, CONFIG)

    assert result.ok and result.linear_layers == [1, 2] and result.steps == CONFIG.steps
    assert result.final_kl < 0.8 * result.initial_kl, result
    assert result.tokens == CONFIG.steps * CONFIG.batch_size * CONFIG.seq_len
    assert [point[0] for point in result.loss_curve] == [5, 10, 15, 20, 25, 30]
    frozen_after = frozen_state(hybrid)
    assert frozen_after.keys() == frozen_before.keys()
    assert all(torch.equal(frozen_after[name], frozen_before[name]) for name in frozen_before)
    changed = [name for name, p in student_parameters(hybrid).items() if not torch.equal(p, students_before[name])]
    assert changed, "no student parameter moved"
    assert all(p.grad is None for p in teacher.parameters())
    students = set(student_parameters(hybrid))
    assert all(p.grad is None for name, p in hybrid.named_parameters() if name not in students)
    assert all(p.requires_grad for p in hybrid.parameters())  # flags restored as they were


def test_heal_is_deterministic(teacher, corpus):
    first, second = hybrid_of(teacher), hybrid_of(teacher)
    heal(teacher, first, corpus, CONFIG)
    heal(teacher, second, corpus, CONFIG)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


@pytest.mark.parametrize("lora_rank, task_lm_weight", [(0, 0.0), (4, 0.0), (0, 0.5)],
                         ids=["students", "students+lora", "task-text"])
def test_checkpoints_resume_to_the_same_weights(teacher, corpus, tmp_path, lora_rank, task_lm_weight):
    """In process: a heal stopped after its checkpoint at step 10 continues from it (the SIGKILL version of
    this is `test_dtr_heal_killed_then_run_again_...`). With LoRA, the adapters resume with the students; with
    task text, its stream resumes where it was."""
    from dtr_core.heal.task_text import TaskTextCorpus

    config = replace(CONFIG, lora_rank=lora_rank, task_lm_weight=task_lm_weight)
    task_corpus = TaskTextCorpus([f"review {i} = {'yes' if i % 3 else 'no'}" for i in range(50)], byte_tokenizer())
    whole = hybrid_of(teacher)
    heal(teacher, whole, corpus, config, task_corpus=task_corpus)

    class Stop(Exception):
        pass

    def stop_at_12(step, steps, loss):
        if step >= 12:
            raise Stop

    stopped = hybrid_of(teacher)
    with pytest.raises(Stop):
        heal(teacher, stopped, corpus, replace(config, checkpoint_every_steps=10, log_every=1), stop_at_12,
             state_dir=tmp_path / "state", key="k", task_corpus=task_corpus)
    assert json.loads((tmp_path / "state" / "checkpoint" / "state.json").read_text())["step"] == 10
    resumed = hybrid_of(teacher)
    result = heal(teacher, resumed, corpus, replace(config, checkpoint_every_steps=10), state_dir=tmp_path / "state",
                  key="k", task_corpus=task_corpus)
    assert result.ok and result.resumed_from_step == 10 and result.steps == CONFIG.steps
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert not (tmp_path / "state").exists()  # the checkpoint goes when the heal ends


def test_a_diverging_heal_keeps_the_unhealed_students(teacher, corpus):
    hybrid = hybrid_of(teacher)
    before = {name: tensor.clone() for name, tensor in hybrid.state_dict().items()}
    kl_before = held_out_kl(teacher, hybrid, [some_batch(corpus)], 1.0)

    def poison(step, steps, loss):  # a NaN enters a student mid-training, as an overflow would
        if step == 3:
            with torch.no_grad():
                student_parameters(hybrid)["model.layers.1.self_attn.o_proj.weight"].fill_(float("nan"))

    result = heal(teacher, hybrid, corpus, replace(CONFIG, log_every=1), poison)
    assert not result.ok and "non-finite" in result.reason and result.final_kl is None
    assert result.steps == 3
    after = hybrid.state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert held_out_kl(teacher, hybrid, [some_batch(corpus)], 1.0) == kl_before


def test_heal_refuses_a_model_without_linear_layers(teacher, corpus):
    with pytest.raises(ValueError, match="at least one linear-attention layer"):
        heal(teacher, hybrid_of(teacher, layers=()), corpus, CONFIG)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be > 0"),
    ("lr", float("nan"), "lr must be a finite number"),
    ("trainable", "everything", "trainable must be one of"),
    ("seq_len", 1, "seq_len must be > 1"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps must be > 0"),
    ("every", -1, "every must be >= 0"),
    ("lora_rank", -2, "lora_rank must be >= 0"),
])
def test_bad_heal_config_is_one_line(field, value, message):
    with pytest.raises(ValueError, match=message):
        replace(CONFIG, **{field: value})


def test_the_kl_of_the_teacher_with_itself_is_zero(teacher, corpus):
    assert held_out_kl(teacher, teacher, [some_batch(corpus)], 1.0) == pytest.approx(0.0, abs=1e-6)
    assert held_out_kl(teacher, hybrid_of(teacher), [some_batch(corpus)], 1.0) > 1e-3


# --- `dtr heal`, real processes ---------------------------------------------------------------------------

def dtr(tmp_path, *args: str, cache: str = "cache", **popen) -> subprocess.Popen:
    env = {**os.environ, "DTR_CACHE_DIR": str(tmp_path / cache), "DTR_TORCH_THREADS": "1"}
    env.pop("DTR_VERBOSE", None)
    return subprocess.Popen([sys.executable, "-m", "dtr.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env, **popen)


def run_dtr(tmp_path, *args: str, cache: str = "cache") -> subprocess.CompletedProcess:
    process = dtr(tmp_path, *args, cache=cache)
    out, err = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


@pytest.fixture
def saved(tmp_path, teacher):
    hybrid_dir, teacher_dir = tmp_path / "hybrid", tmp_path / "teacher"
    save_hybrid(hybrid_of(teacher), byte_tokenizer(), hybrid_dir)
    teacher.save_pretrained(teacher_dir)
    byte_tokenizer().save_pretrained(teacher_dir)
    corpus_file = write_corpus(tmp_path / "corpus.txt")
    return hybrid_dir, teacher_dir, corpus_file


def heal_args(hybrid_dir, out, corpus_file, steps=20):
    return ["heal", "--model", str(hybrid_dir), "--teacher", "tiny-llama", "--out", str(out), "--corpus", corpus_file,
            "--steps", str(steps), "--seq-len", "64", "--batch-size", "2", "--lr", "3e-3"]


def test_dtr_heal_saves_a_healed_hybrid_and_refuses_what_it_cannot_heal(tmp_path, saved):
    from dtr_core.hybrid.export import read_export_info
    from dtr_core.models import load_model

    hybrid_dir, teacher_dir, corpus_file = saved
    healed_dir = tmp_path / "healed"
    nothing = run_dtr(tmp_path, "heal", "--model", str(teacher_dir), "--teacher", "tiny-llama", "--out", str(healed_dir))
    assert nothing.returncode == 2 and nothing.stderr.strip().splitlines() == [
        f"error: --model {teacher_dir} has no linear-attention layer, so there is nothing to heal; pass a hybrid "
        "(dtr hybridize, or runs/<id>/hybrids/opt)"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("x")
    refused = run_dtr(tmp_path, *heal_args(hybrid_dir, mine, corpus_file))
    assert refused.returncode == 2 and "did not write" in refused.stderr and (mine / "thesis.txt").read_text() == "x"
    no_corpus = run_dtr(tmp_path, *heal_args(hybrid_dir, healed_dir, str(tmp_path / "no-such.txt")))
    assert no_corpus.returncode == 2 and "does not exist" in no_corpus.stderr
    assert not healed_dir.exists()

    done = run_dtr(tmp_path, *heal_args(hybrid_dir, healed_dir, corpus_file))
    assert done.returncode == 0, done.stderr
    assert "heal: step 20/20" in done.stderr and "ETA" in done.stderr
    info = read_export_info(healed_dir)
    heal_record = info["metadata"]["heal"]
    assert info["linear_layers"] == [1, 2] and heal_record["final_kl"] < heal_record["initial_kl"]
    healed, _ = load_model(str(healed_dir))
    original, _ = load_model(str(hybrid_dir))
    students = set(student_parameters(original))
    for name, tensor in original.state_dict().items():  # the frozen weights come back bit-identical from disk
        if name not in students:
            assert torch.equal(healed.state_dict()[name], tensor), name


def test_dtr_heal_killed_then_run_again_continues_to_the_same_weights(tmp_path, saved):
    from safetensors.torch import load_file

    hybrid_dir, _, corpus_file = saved
    whole = run_dtr(tmp_path, *heal_args(hybrid_dir, tmp_path / "whole", corpus_file, steps=40), cache="cache-whole")
    assert whole.returncode == 0, whole.stderr

    args = [*heal_args(hybrid_dir, tmp_path / "killed", corpus_file, steps=40), "--checkpoint-every-steps", "5"]
    process = dtr(tmp_path, *args, start_new_session=True)

    def checkpoint_step() -> int:
        states = list((tmp_path / "cache" / "heal").glob("*/checkpoint/state.json"))
        return json.loads(states[0].read_text())["step"] if states else 0

    try:
        assert wait_for(lambda: checkpoint_step() >= 10, 300, process), process.communicate()[1]
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL and not (tmp_path / "killed").exists()

    again = run_dtr(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    from dtr_core.hybrid.export import read_export_info

    assert read_export_info(tmp_path / "killed")["metadata"]["heal"]["resumed_from_step"] >= 10
    assert not list((tmp_path / "cache" / "heal").glob("*/checkpoint"))
    resumed, uninterrupted = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("killed", "whole"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[name], uninterrupted[name]) for name in resumed)


def scripted_search(scores_by_heal, heal_every, heal_fails_at=None, cap=None, start=(0,)):
    """`continue_with_healing` on scripted scores: `scores_by_heal[h][layer]` is a candidate's score while the
    committed layers use heal h's students (the last entry for every later heal); heal h scores 1.0 + h / 10."""
    from dtr_core.heal.continued_search import HealStep, continue_with_healing
    from dtr_core.search.acceptance import Tolerance
    from dtr_core.search.decisions import CandidateScore

    calls = []

    def heal_stage(index, order):
        calls.append(("heal", index, order))
        if index == heal_fails_at:
            return HealStep(False, reason="diverged")
        return HealStep(True, 1.0 + index / 10)

    def score(heal_index, committed, candidates, hint):
        calls.append(("round", heal_index, committed))
        return {layer: CandidateScore(scores_by_heal[min(heal_index, len(scores_by_heal) - 1)][layer])
                for layer in candidates}

    result = continue_with_healing(heal_stage, score, range(6), list(start), 1.0, Tolerance("relative", 0.1),
                                   heal_every, cap=cap, first_round_index=3)
    return result, calls


def test_continued_search_heals_every_h_layers_and_reruns_a_rejected_round_after_healing():
    # P_min = 0.9. Heal 0 (M_opt = [0]): layers 1, 2 pass, then heal 1 ([0, 1, 2]); 3 fails; heal 1 is right
    # before, so the search stops there
    scores = [{1: 0.95, 2: 0.92, 3: 0.5, 4: 0.4, 5: 0.3}, {3: 0.8, 4: 0.7, 5: 0.6}]
    result, calls = scripted_search(scores, heal_every=2)
    assert calls == [("heal", 0, (0,)), ("round", 0, (0,)), ("round", 0, (0, 1)), ("heal", 1, (0, 1, 2)),
                     ("round", 1, (0, 1, 2))]
    assert result.stop_reason == "rejected" and result.swap_order == (0, 1, 2)
    assert result.healed_layers == (0, 1, 2) and result.healed_score == 1.1
    assert [r.record.index for r in result.rounds] == [3, 4, 5]  # numbered on from the ordinary search
    assert [r.heal_index for r in result.rounds] == [0, 0, 1]

    # every 3: layer 3 is rejected with 2 unhealed commits: heal, then the same round again on healed students;
    # after 3 commits, 4 is rejected: heal [0..3], 4 rejected again right after a heal: stop
    scores = [{1: 0.95, 2: 0.92, 3: 0.5, 4: 0.4, 5: 0.3}, {3: 0.91, 4: 0.7, 5: 0.6}, {4: 0.5, 5: 0.5}]
    result, calls = scripted_search(scores, heal_every=3)
    assert [c for c in calls if c[0] == "heal"] == \
        [("heal", 0, (0,)), ("heal", 1, (0, 1, 2)), ("heal", 2, (0, 1, 2, 3))]
    assert [(r.record.chosen, r.record.accepted) for r in result.rounds] == \
        [(1, True), (2, True), (3, False), (3, True), (4, False), (4, False)]
    assert result.healed_layers == (0, 1, 2, 3) and result.stop_reason == "rejected"


def test_continued_search_heals_what_the_cap_left_and_keeps_the_last_good_heal_on_failure():
    scores = [{1: 0.95, 2: 0.95, 3: 0.95, 4: 0.95, 5: 0.95}]
    result, calls = scripted_search(scores, heal_every=5, cap=3)
    assert result.stop_reason == "cap" and result.swap_order == (0, 1, 2)
    assert calls[-1] == ("heal", 1, (0, 1, 2)) and result.healed_layers == (0, 1, 2)  # the result is always healed

    result, _ = scripted_search(scores, heal_every=1, heal_fails_at=2)
    assert result.stop_reason == "heal_failed" and result.swap_order == (0, 1, 2)
    assert result.healed_layers == (0, 1) and result.healed_score == 1.1  # heal 1's: the last that succeeded

    result, _ = scripted_search(scores, heal_every=1, heal_fails_at=0)
    assert result.stop_reason == "heal_failed" and result.rounds == () and result.healed_layers == ()


def test_lora_adapters_train_leave_the_base_weights_alone_and_are_merged(teacher, corpus, tmp_path, monkeypatch):
    """rank > 0: adapters on the frozen projections train with the students; the base weights are untouched
    until the merge; the healed hybrid is a plain one whose saved copy reproduces its logits."""
    import dtr_core.heal.training as training
    from peft.tuners.lora import LoraLayer

    from dtr_core.heal.adapters import adapter_targets
    from dtr_core.hybrid.export import save_export
    from dtr_core.models import load_model

    hybrid = hybrid_of(teacher)
    before = {name: tensor.clone() for name, tensor in hybrid.state_dict().items()}
    targets = adapter_targets(hybrid)
    assert any(".mlp." in name for name in targets) and all(".layers.1.self_attn" not in name for name in targets)
    assert any(".layers.0.self_attn.q_proj" in name for name in targets)
    base_at_merge = {}
    real_merge = training.merge_adapters

    def merge_after_checking(handle):
        for name, module in hybrid.named_modules():
            if isinstance(module, LoraLayer):
                base_at_merge[name] = module.get_base_layer().weight.detach().clone()
        return real_merge(handle)

    monkeypatch.setattr(training, "merge_adapters", merge_after_checking)
    result = heal(teacher, hybrid, corpus, replace(CONFIG, lora_rank=4))
    assert result.ok and result.final_kl < result.initial_kl
    assert sorted(base_at_merge) == sorted(targets)
    assert all(torch.equal(base_at_merge[name], before[name + ".weight"]) for name in targets)  # untouched in training

    after = hybrid.state_dict()
    assert after.keys() == before.keys() and not any(isinstance(m, LoraLayer) for m in hybrid.modules())
    moved = {name for name in before if not torch.equal(after[name], before[name])}
    assert {name + ".weight" for name in targets} <= moved  # every adapted weight took its adapter's update
    students = set(student_parameters(hybrid))
    assert moved & students  # the students trained too
    assert moved <= students | {name + ".weight" for name in targets}  # nothing else moved

    save_export(hybrid, byte_tokenizer(), tmp_path / "healed", "key", "gated_deltanet")
    loaded, _ = load_model(str(tmp_path / "healed"))
    tokens = some_batch(corpus)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, hybrid(input_ids=tokens).logits, rtol=0, atol=0)


def test_lora_rank_changes_the_reuse_key():
    assert CONFIG.defining_dict() != replace(CONFIG, lora_rank=4).defining_dict()
    assert CONFIG.defining_dict() != replace(CONFIG, every=2).defining_dict()


@pytest.mark.parametrize("args, message", [
    (["--heal-every", "2"], "error: heal.every is 2 but healing is off; add --heal (heal.enabled) or drop "
                            "--heal-every"),
    (["--heal", "--heal-every", "-1"], "error: invalid parameters: heal.every: Input should be greater than or "
                                       "equal to 0"),
    (["--heal", "--heal-lora-rank", "-3"], "error: invalid parameters: heal.lora_rank: Input should be greater"),
    (["--heal", "--heal-every", "1", "--heal-lora-rank", "4"], "error: --heal-every and --heal-lora-rank cannot be"),
    (["--heal-task-lm-weight", "0.5"], "error: heal.task_lm_weight is 0.5 but healing is off; add --heal"),
    (["--heal", "--heal-task-lm-weight", "nan"], "error: invalid parameters: heal.task_lm_weight:"),
], ids=["every-without-heal", "negative-every", "negative-rank", "every-with-lora", "weight-without-heal",
        "nan-weight"])
def test_dtr_convert_refuses_bad_heal_options_in_one_line(tmp_path, args, message):
    refused = run_dtr(tmp_path, "convert", "--profile", "smoke", "-o", str(tmp_path / "runs"), *args)
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "runs").exists()


def test_task_text_as_language_modelling_changes_the_heal_and_its_key(teacher, corpus):
    """task_lm_weight > 0: the loss adds next-token cross-entropy on the task's train prompts + answers."""
    from dtr_core.evaluation.tasks import ClassificationTask, Example
    from dtr_core.heal.task_text import TaskTextCorpus, task_lm_texts

    examples = [Example(uid=f"e{i}", text=f"film number {i} was {'good' if i % 2 else 'bad'}",
                        label="pos" if i % 2 else "neg") for i in range(40)]
    task = ClassificationTask(name="toy", load=lambda: examples, validation_size=8, test_size=8,
                              template="{text} =", verbalisers={"pos": " yes", "neg": " no"})
    texts = task_lm_texts(task)
    assert len(texts) == 24 and all(t.endswith(("= yes", "= no")) for t in texts)
    assert {t.rsplit("=", 1)[0].strip() for t in texts} <= {e.text for e in examples}
    task_corpus = TaskTextCorpus(texts, byte_tokenizer(), "toy")

    config = replace(CONFIG, steps=6)
    plain, with_task = hybrid_of(teacher), hybrid_of(teacher)
    assert heal(teacher, plain, corpus, config).ok
    result = heal(teacher, with_task, corpus, replace(config, task_lm_weight=1.0), task_corpus=task_corpus)
    assert result.ok
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), with_task.state_dict().values()))
    assert CONFIG.defining_dict() != replace(CONFIG, task_lm_weight=1.0).defining_dict()
    other = TaskTextCorpus(texts[:-1], byte_tokenizer(), "toy")
    assert task_corpus.identity != other.identity  # the heal's reuse key holds the text's hash (stage.py)
    with pytest.raises(ValueError, match="needs the task's train text"):
        heal(teacher, hybrid_of(teacher), corpus, replace(config, task_lm_weight=1.0))


def test_heal_export_keys_the_task_text_so_other_text_heals_again(teacher, tmp_path):
    """The heal stage's reuse key holds task_lm_weight and the task text's hash: the same text is reused, other
    text (or weight) heals again."""
    from dtr_core.distill.block import distill_block
    from dtr_core.distill.config import DistillConfig
    from dtr_core.heal.stage import heal_export

    tokenizer = byte_tokenizer()
    corpus_file = write_corpus(tmp_path / "corpus.txt")
    distill_block(teacher, [1], "gated_deltanet", DistillConfig(steps=2, batch_size=2, seq_lens=(32,),
                  eval_sequences=2, warmup_steps=1, max_normalized_loss=1e9), Corpus(corpus_file, tokenizer),
                  tmp_path / "students")
    config = replace(CONFIG, steps=2, task_lm_weight=0.5)
    texts = [f"review {i} = {'yes' if i % 2 else 'no'}" for i in range(30)]

    def run(config, texts):
        return heal_export(teacher, tokenizer, tmp_path / "students", [1], "gated_deltanet", tmp_path / "healed",
                           config, corpus_file, tmp_path / "state", task_texts=texts)

    first = run(config, texts)
    assert first["heal"]["status"] == "ok" and not first["reused"]
    assert run(config, list(texts))["reused"]
    other_text = run(config, texts[:-1])
    assert not other_text["reused"] and other_text["key"] != first["key"]
    assert not run(replace(config, task_lm_weight=0.25), texts[:-1])["reused"]
    with pytest.raises(ValueError, match="needs the task's train text"):
        run(config, None)
