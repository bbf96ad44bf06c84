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


def test_checkpoints_resume_to_the_same_weights(teacher, corpus, tmp_path):
    """In process: a heal stopped after its checkpoint at step 10 continues from it (the SIGKILL version of
    this is `test_dtr_heal_killed_then_run_again_...`)."""
    whole = hybrid_of(teacher)
    heal(teacher, whole, corpus, CONFIG)

    class Stop(Exception):
        pass

    def stop_at_12(step, steps, loss):
        if step >= 12:
            raise Stop

    stopped = hybrid_of(teacher)
    with pytest.raises(Stop):
        heal(teacher, stopped, corpus, replace(CONFIG, checkpoint_every_steps=10, log_every=1), stop_at_12,
             state_dir=tmp_path / "state", key="k")
    assert json.loads((tmp_path / "state" / "checkpoint" / "state.json").read_text())["step"] == 10
    resumed = hybrid_of(teacher)
    result = heal(teacher, resumed, corpus, replace(CONFIG, checkpoint_every_steps=10), state_dir=tmp_path / "state",
                  key="k")
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
