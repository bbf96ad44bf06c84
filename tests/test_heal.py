"""Healing a hybrid end to end (`dtr_core.heal`): it lowers the held-out KL, trains the students only,
keeps everything else bit-identical, and puts the students back when it diverges."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from dtr_core.heal.config import HealConfig
from dtr_core.heal.training import heal, held_out_kl, student_parameters
from dtr_core.hybrid.build import build_hybrid
from dtr_core.models import random_model

CONFIG = HealConfig(steps=30, batch_size=2, seq_len=32, lr=3e-3, eval_batches=2, log_every=5)


def token_batches(config: HealConfig, seed: int = 0):
    """An endless stream of (B, T) byte-token batches with some structure (repeated motifs), seeded."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        motif = torch.randint(0, 256, (config.batch_size, 8), generator=generator)
        yield motif.repeat(1, config.seq_len // 8)[:, : config.seq_len]


@pytest.fixture
def teacher():
    return random_model("tiny-llama", seed=0)


def hybrid_of(teacher, layers=(1, 2)):
    return build_hybrid(teacher, list(layers), "gated_deltanet")


def frozen_state(model) -> dict[str, torch.Tensor]:
    students = set(student_parameters(model))
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if name not in students}


def test_heal_lowers_the_held_out_kl_and_trains_only_the_students(teacher):
    hybrid = hybrid_of(teacher)
    frozen_before = frozen_state(hybrid)
    students_before = {name: p.detach().clone() for name, p in student_parameters(hybrid).items()}
    result = heal(teacher, hybrid, token_batches(CONFIG), CONFIG)

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


def test_heal_is_deterministic(teacher):
    first, second = hybrid_of(teacher), hybrid_of(teacher)
    heal(teacher, first, token_batches(CONFIG), CONFIG)
    heal(teacher, second, token_batches(CONFIG), CONFIG)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_a_diverging_heal_keeps_the_unhealed_students(teacher):
    hybrid = hybrid_of(teacher)
    before = {name: tensor.clone() for name, tensor in hybrid.state_dict().items()}
    kl_before = held_out_kl(teacher, hybrid, [next(token_batches(CONFIG))], 1.0)

    def poisoned():
        stream = token_batches(CONFIG)
        for index in range(CONFIG.eval_batches + 3):
            yield next(stream)
        with torch.no_grad():  # a NaN enters a student mid-training, as an overflow would
            student_parameters(hybrid)["model.layers.1.self_attn.o_proj.weight"].fill_(float("nan"))
        yield from stream

    result = heal(teacher, hybrid, poisoned(), CONFIG)
    assert not result.ok and "non-finite" in result.reason and result.final_kl is None
    assert result.steps == 3
    after = hybrid.state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert held_out_kl(teacher, hybrid, [next(token_batches(CONFIG))], 1.0) == kl_before


def test_heal_refuses_a_model_without_linear_layers(teacher):
    with pytest.raises(ValueError, match="at least one linear-attention layer"):
        heal(teacher, hybrid_of(teacher, layers=()), token_batches(CONFIG), CONFIG)


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps must be > 0"),
    ("lr", float("nan"), "lr must be a finite number"),
    ("trainable", "everything", "trainable must be one of"),
    ("seq_len", 1, "seq_len must be > 1"),
])
def test_bad_heal_config_is_one_line(field, value, message):
    with pytest.raises(ValueError, match=message):
        replace(CONFIG, **{field: value})


def test_the_kl_of_the_teacher_with_itself_is_zero(teacher):
    assert held_out_kl(teacher, teacher, [next(token_batches(CONFIG))], 1.0) == pytest.approx(0.0, abs=1e-6)
    assert held_out_kl(teacher, hybrid_of(teacher), [next(token_batches(CONFIG))], 1.0) > 1e-3


def run_dtr(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DTR_CACHE_DIR": str(tmp_path / "cache"), "DTR_TORCH_THREADS": "1"}
    env.pop("DTR_VERBOSE", None)
    return subprocess.run([sys.executable, "-m", "dtr.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=env)


def test_dtr_heal_saves_a_healed_hybrid_and_refuses_what_it_cannot_heal(tmp_path, teacher):
    from dtr_core.hybrid.build import save_hybrid
    from dtr_core.hybrid.export import read_export_info
    from dtr_core.models import byte_tokenizer, load_model

    hybrid_dir, healed_dir = tmp_path / "hybrid", tmp_path / "healed"
    save_hybrid(hybrid_of(teacher), byte_tokenizer(), hybrid_dir)
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    byte_tokenizer().save_pretrained(teacher_dir)

    nothing = run_dtr(tmp_path, "heal", "--model", str(teacher_dir), "--teacher", "tiny-llama", "--out", str(healed_dir))
    assert nothing.returncode == 2 and nothing.stderr.strip().splitlines() == [
        f"error: --model {teacher_dir} has no linear-attention layer, so there is nothing to heal; pass a hybrid "
        "(dtr hybridize, or runs/<id>/hybrids/opt)"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("x")
    refused = run_dtr(tmp_path, "heal", "--model", str(hybrid_dir), "--teacher", "tiny-llama", "--out", str(mine))
    assert refused.returncode == 2 and "did not write" in refused.stderr and (mine / "thesis.txt").read_text() == "x"
    assert not healed_dir.exists()

    done = run_dtr(tmp_path, "heal", "--model", str(hybrid_dir), "--teacher", "tiny-llama", "--out", str(healed_dir),
                   "--steps", "20", "--seq-len", "64", "--batch-size", "2", "--lr", "3e-3")
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
