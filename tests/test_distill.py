"""Blockwise local distillation on a tiny model: it learns, is deterministic, reuses, fails safely."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from dtr_core.distill.capture import capture_activations, open_layer_activations
from dtr_core.distill.training import DistillConfig, LayerResult, distill_layer, load_students, read_layer_results
from dtr_core.mixers import MIXERS, MixerConfig
from dtr_core.hybrid.surgery import attention_module, restore_layers, swap_layers

N, T = 20, 32
FAST = DistillConfig(steps=40, batch_size=4, log_every=5, max_eval_sequences=4)


@pytest.fixture(scope="module")
def teacher():
    from dtr_core.models import load_model

    model, _ = load_model("tiny-llama")
    return model


@pytest.fixture(scope="module")
def activations(teacher, tmp_path_factory):
    directory = tmp_path_factory.mktemp("activations")
    token_ids = torch.randint(0, 256, (N, T), generator=torch.Generator().manual_seed(2))
    capture_activations(teacher, token_ids, directory, layers=[0, 1, 2], batch_size=8)
    return directory


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "steps must be > 0"),
    (dict(batch_size=0), "batch_size"),
    (dict(lr=0.0), "lr must be"),
    (dict(lr=float("nan")), "lr must be"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(steps=10, warmup_steps=11), "warmup_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(grad_clip=0.0), "grad_clip"),
    (dict(grad_clip=math.inf), "grad_clip"),
    (dict(log_every=0), "log_every"),
    (dict(eval_fraction=1.0), "eval_fraction"),
    (dict(max_normalized_loss=0.0), "max_normalized_loss must be"),
    (dict(max_normalized_loss=math.inf), "max_normalized_loss must be"),
    (dict(max_normalized_loss=float("nan")), "max_normalized_loss must be"),
])
def test_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**bad)


def test_lr_schedule_warmup_then_cosine():
    config = DistillConfig(steps=100, min_lr_ratio=0.1)
    assert config.num_warmup_steps == 10 and DistillConfig(steps=100, warmup_steps=3).num_warmup_steps == 3
    factors = [config.lr_factor(step) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))  # non-increasing after warm-up
    assert factors[-1] == pytest.approx(0.1)
    assert DistillConfig(steps=3).lr_factor(0) == 1.0  # warm-up rounds to 0 steps: no warm-up
    assert DistillConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_distillation_beats_the_copied_student(teacher, activations, tmp_path, mixer):
    calls = []
    result = distill_layer(teacher, 1, activations, mixer, FAST, tmp_path,
                           progress=lambda step, total, loss: calls.append((step, total, loss)))
    assert result.ok and not result.reused and result.reason is None
    # the calibrated start (least-squares output scale) is already close on this tiny teacher
    assert result.final_loss < 0.75 * result.initial_loss
    assert result.normalized_loss < 0.75 * result.initial_normalized_loss
    assert result.steps == FAST.steps and result.tokens == FAST.steps * FAST.batch_size * T
    assert result.eval_sequences == 2  # 10% of 20 held out
    assert [c[0] for c in calls] == list(range(5, 41, 5)) and all(c[1] == 40 for c in calls)
    meta = read_layer_results(tmp_path)[1]
    assert meta == result
    # the saved student reproduces the reported held-out loss
    student = load_students(tmp_path, teacher)[1]
    inputs, outputs = open_layer_activations(activations, 1)
    cos, sin = teacher.model.rotary_emb(inputs[:1], torch.arange(T)[None])
    with torch.no_grad():
        prediction, _ = student(hidden_states=inputs[-2:], position_embeddings=(cos, sin))
    assert torch.mean((prediction - outputs[-2:]) ** 2).item() == pytest.approx(result.final_loss, rel=1e-4)


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_output_calibration_is_the_least_squares_scale(teacher, activations, mixer):
    from dtr_core.distill.training import _calibrate_output_scale
    from dtr_core.mixers import build_student

    student = build_student(mixer, teacher.config, 1, teacher_attention=attention_module(teacher, 1))
    inputs, outputs = open_layer_activations(activations, 1)
    x, y = inputs[:4].float(), outputs[:4].float()
    rope = teacher.model.rotary_emb(x, torch.arange(T)[None].expand(4, -1))
    with torch.no_grad():
        before, _ = student(hidden_states=x, position_embeddings=rope)
        factor = _calibrate_output_scale(student, x, y, rope)
        after, _ = student(hidden_states=x, position_embeddings=rope)
    torch.testing.assert_close(after, factor * before, rtol=1e-4, atol=1e-6)
    p, t = before.double().flatten(), y.double().flatten()
    least_squares, floor = float(p @ t / (p @ p)), 0.1 * float(t.norm() / p.norm())
    assert factor == pytest.approx(max(least_squares, floor))

    def mse(scale):
        return torch.mean((scale * before - y) ** 2).item()

    assert mse(factor) < mse(1.0)
    if least_squares > floor:
        assert mse(factor) <= min(mse(0.9 * factor), mse(1.1 * factor))
    # a teacher output that is exactly a multiple of the student's: the factor is that multiple
    with torch.no_grad():
        student.scale_output(1 / factor)
        assert _calibrate_output_scale(student, x, 0.05 * before, rope) == pytest.approx(0.05, rel=1e-5)


def test_calibrated_student_starts_closer_to_the_teacher(teacher, activations, tmp_path):
    plain = distill_layer(teacher, 1, activations, "gated_deltanet",
                          DistillConfig(steps=1, calibrate_output=False), tmp_path / "plain")
    calibrated = distill_layer(teacher, 1, activations, "gated_deltanet", DistillConfig(steps=1), tmp_path / "cal")
    assert plain.output_scale is None and calibrated.output_scale > 0
    assert calibrated.initial_loss < plain.initial_loss
    trained = distill_layer(teacher, 1, activations, "gated_deltanet", replace(FAST, calibrate_output=False),
                            tmp_path / "trained")
    assert trained.final_loss < 0.5 * trained.initial_loss  # training alone also learns the scale
    assert plain.key != calibrated.key  # the flag is part of the reuse key


def test_teacher_is_untouched(teacher, activations, tmp_path):
    before = {k: v.clone() for k, v in attention_module(teacher, 0).state_dict().items()}
    distill_layer(teacher, 0, activations, "gla", FAST, tmp_path)
    after = attention_module(teacher, 0).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_same_seed_gives_identical_weights(teacher, activations, tmp_path):
    first = distill_layer(teacher, 2, activations, "gated_deltanet", FAST, tmp_path / "a")
    second = distill_layer(teacher, 2, activations, "gated_deltanet", FAST, tmp_path / "b")
    assert first.key == second.key and first.final_loss == second.final_loss
    weights_a = load_file(str(tmp_path / "a" / "layer_002" / "weights.safetensors"))
    weights_b = load_file(str(tmp_path / "b" / "layer_002" / "weights.safetensors"))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    other = distill_layer(teacher, 2, activations, "gated_deltanet",
                          DistillConfig(**{**FAST.to_dict(), "seed": 1}), tmp_path / "c")
    assert other.key != first.key and other.final_loss != first.final_loss


def test_completed_layer_is_reused(teacher, activations, tmp_path):
    first = distill_layer(teacher, 1, activations, "jetblock", FAST, tmp_path)
    assert first.ok
    weights = tmp_path / "layer_001" / "weights.safetensors"
    stamp = weights.stat().st_mtime_ns
    calls = []
    again = distill_layer(teacher, 1, activations, "jetblock", FAST, tmp_path,
                          progress=lambda *args: calls.append(args))
    assert again.reused and calls == [] and weights.stat().st_mtime_ns == stamp
    assert {**again.to_dict(), "reused": False} == first.to_dict()
    # how the student is computed (chunk size, backend) is not what it computes: still reused
    other_execution = MixerConfig(chunk_size=8, backend="torch")
    assert distill_layer(teacher, 1, activations, "jetblock", FAST, tmp_path, mixer_config=other_execution).reused
    assert not distill_layer(teacher, 1, activations, "jetblock", FAST, tmp_path,
                             mixer_config=MixerConfig(use_rope=False)).reused
    # any change to what determines the result retrains and replaces the layer
    changed = distill_layer(teacher, 1, activations, "jetblock", DistillConfig(**{**FAST.to_dict(), "steps": 20}),
                            tmp_path)
    assert not changed.reused and changed.steps == 20 and changed.key != first.key
    assert read_layer_results(tmp_path)[1].key == changed.key


def test_non_finite_loss_marks_layer_failed(teacher, tmp_path):
    token_ids = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(3))

    def poison(module, args, output):  # the teacher's layer-1 attention output contains a NaN
        attn_out, weights = output
        attn_out = attn_out.clone()
        attn_out[0, 3, 5] = float("nan")
        return attn_out, weights

    handle = attention_module(teacher, 1).register_forward_hook(poison)
    try:
        capture_activations(teacher, token_ids, tmp_path / "act", layers=[0, 1])
    finally:
        handle.remove()
    # this test is about non-finite losses: the loss threshold is set out of the way (layer 0 of the tiny
    # teacher stays above 1.0 in 10 steps)
    config = DistillConfig(steps=10, warmup_steps=0, max_eval_sequences=2, max_normalized_loss=1e6)
    ok = distill_layer(teacher, 0, tmp_path / "act", "gla", config, tmp_path / "students")
    failed = distill_layer(teacher, 1, tmp_path / "act", "gla", config, tmp_path / "students")
    assert ok.ok
    assert failed.status == "failed" and "non-finite" in failed.reason
    assert _files(tmp_path / "students" / "layer_001") == ["meta.json"]
    assert read_layer_results(tmp_path / "students")[1].status == "failed"
    assert list(load_students(tmp_path / "students", teacher)) == [0]
    assert load_students(tmp_path / "students", teacher, layers=[1]) == {}
    # a failed layer is retried, not reused
    assert not distill_layer(teacher, 1, tmp_path / "act", "gla", config, tmp_path / "students").reused


def test_divergent_learning_rate_marks_layer_failed(teacher, activations, tmp_path):
    config = DistillConfig(steps=10, warmup_steps=0, lr=1e30)
    result = distill_layer(teacher, 1, activations, "gla", config, tmp_path)
    assert result.status == "failed" and "non-finite" in result.reason
    assert not (tmp_path / "layer_001" / "weights.safetensors").exists()
    assert load_students(tmp_path, teacher) == {}


@pytest.mark.parametrize("change, error, message", [
    (dict(mixer_name="mamba"), ValueError, "unknown mixer 'mamba'; choose one of"),
    (dict(layer_idx=4), ValueError, "out of range"),
    (dict(layer_idx=-1), ValueError, "out of range"),
    (dict(layer_idx=3), ValueError, "layer 3 was not captured"),
    (dict(activations_dir="missing"), ValueError, "no complete activation capture"),
    (dict(config={"steps": 10}), ValueError, "must be a DistillConfig"),
], ids=["unknown-mixer", "layer-too-large", "layer-negative", "layer-not-captured", "no-capture", "dict-config"])
def test_bad_input_writes_nothing(teacher, activations, tmp_path, change, error, message):
    kwargs = dict(layer_idx=1, activations_dir=activations, mixer_name="gla", config=FAST,
                  out_dir=tmp_path / "students") | change
    if kwargs["activations_dir"] == "missing":
        kwargs["activations_dir"] = tmp_path / "missing"
    with pytest.raises(error, match=message):
        distill_layer(teacher, **kwargs)
    assert not (tmp_path / "students").exists()


def test_other_teacher_is_refused(activations, tmp_path):
    from dtr_core.models import random_model

    stranger = random_model("tiny-llama", seed=7)
    with pytest.raises(ValueError, match="differ from those the activations"):
        distill_layer(stranger, 1, activations, "gla", FAST, tmp_path / "students")
    assert not (tmp_path / "students").exists()


def test_loaded_students_swap_into_the_model(teacher, activations, tmp_path):
    for layer in (1, 2):
        assert distill_layer(teacher, layer, activations, "gla", FAST, tmp_path).ok
    with pytest.raises(ValueError, match="distilled with mixer 'gla'"):
        load_students(tmp_path, teacher, mixer_name="jetblock")
    students = load_students(tmp_path, teacher, mixer_name="gla")
    assert sorted(students) == [1, 2] and all(not s.training for s in students.values())
    assert list(load_students(tmp_path, teacher, layers=[2, 3])) == [2]
    token_ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = teacher(input_ids=token_ids).logits
        originals = swap_layers(teacher, students)
        try:
            hybrid = teacher(input_ids=token_ids).logits
        finally:
            restore_layers(teacher, originals)
        assert torch.isfinite(hybrid).all() and not torch.equal(hybrid, reference)
        assert torch.equal(teacher(input_ids=token_ids).logits, reference)


def _files(directory) -> list[str]:
    """File names in a folder, without dot-files (the dtr artifact marker)."""
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_layer_result_round_trips():
    result = LayerResult(layer=3, mixer="gla", status="ok", key="k", initial_loss=1.0, final_loss=0.5)
    assert LayerResult.from_dict({**result.to_dict(), "loss_curve": [[1, 2.0, 0.1]]}) == result
    assert result.ok and not LayerResult(layer=3, mixer="gla", status="failed", key="k").ok
