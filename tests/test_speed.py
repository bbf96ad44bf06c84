"""dtr_core.speed on tiny models: well-formed results, exact cache accounting, argument checks (not speed)."""

from __future__ import annotations

import pytest
import torch

from dtr_core.hybrid.model import cache_bytes, make_hybrid
from dtr_core.mixers import build_student
from dtr_core import speed as speed_module
from dtr_core.speed import SpeedResult, measure_speed, measure_speeds, speedup


def _hybrid(teacher, layers):
    students = {i: build_student("gated_deltanet", teacher.config, i, teacher_attention=teacher.model.layers[i].self_attn)
                for i in layers}
    return make_hybrid(teacher, students)


def test_measure_speed_teacher_and_hybrid(tiny_llama):
    teacher, _ = tiny_llama
    hybrid = _hybrid(teacher, (0, 2))
    base = measure_speed(teacher, context_len=48, decode_tokens=3)
    other = measure_speed(hybrid, context_len=48, decode_tokens=3, repeats=2)
    for result in (base, other):
        assert isinstance(result, SpeedResult)
        assert result.prefill_seconds > 0 and result.decode_tokens_per_second > 0
        assert result.prefill_tokens_per_second == pytest.approx(48 / result.prefill_seconds)
        assert result.decode_ms_per_token == pytest.approx(1000 / result.decode_tokens_per_second)
        assert result.threads == torch.get_num_threads()
    assert base.cache_bytes == cache_bytes(teacher, 48)
    assert other.cache_bytes == cache_bytes(hybrid, 48) < base.cache_bytes
    # tiny-llama: 4 layers, 4 query and 2 key/value heads of 16 dims; 2 full layers keep K and V, 2 linear ones a
    # state per key/value head and the short convolution's last 3 q/k/v inputs (float32)
    assert base.cache_bytes == 4 * 2 * 2 * 16 * 48 * 4
    assert other.cache_bytes == 2 * 2 * 2 * 16 * 48 * 4 + 2 * (2 * 16 * 16 + (4 + 2 + 2) * 16 * 3) * 4
    ratios = speedup(base, other)
    assert ratios["cache_reduction"] == pytest.approx(1 - other.cache_bytes / base.cache_bytes)
    assert ratios["prefill_speedup"] == pytest.approx(base.prefill_seconds / other.prefill_seconds)
    assert speedup(base.to_dict(), other.to_dict()) == ratios


def test_measure_speed_leaves_the_model_as_it_was(tiny_llama):
    teacher, _ = tiny_llama
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    measure_speed(teacher, context_len=16, decode_tokens=2)
    assert teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("kwargs", [{"context_len": 0}, {"decode_tokens": 0}, {"repeats": 0},
                                    {"context_len": 5000}])
def test_bad_arguments_raise(tiny_llama, kwargs):
    teacher, _ = tiny_llama
    with pytest.raises(ValueError):
        measure_speed(teacher, **{"context_len": 16, "decode_tokens": 2, **kwargs})


def test_measure_speeds_interleaves_the_models_repeats(tiny_llama, monkeypatch):
    teacher, _ = tiny_llama
    hybrid = _hybrid(teacher, (1,))
    calls = []
    real = speed_module._prefill_and_decode

    def recording(model, tokens, decode_tokens):
        calls.append(("teacher" if model is teacher else "hybrid", tokens.shape[1], tokens.sum().item()))
        return real(model, tokens, decode_tokens)

    monkeypatch.setattr(speed_module, "_prefill_and_decode", recording)
    results = measure_speeds({"teacher": teacher, "hybrid": hybrid}, context_len=24, decode_tokens=2, repeats=3)
    warm = min(speed_module.WARMUP_TOKENS, 24)
    assert [(who, length) for who, length, _ in calls] == (
        [("teacher", warm), ("hybrid", warm)] + [("teacher", 24), ("hybrid", 24)] * 3)
    assert len({checksum for _, length, checksum in calls if length == 24}) == 1  # the same prompt for both
    assert list(results) == ["teacher", "hybrid"]
    assert results["hybrid"].cache_bytes == cache_bytes(hybrid, 24) < results["teacher"].cache_bytes


def test_long_context_decode_from_a_synthetic_cache_reports_exact_cache_bytes():
    from dtr_core.hybrid.build import build_hybrid
    from dtr_core.hybrid.model import cache_bytes
    from dtr_core.models import random_model
    from dtr_core.speed import measure_speeds, speedup

    teacher = random_model("tiny-llama")
    hybrid = build_hybrid(teacher, [0, 1, 2], "gated_deltanet")
    results = measure_speeds({"teacher": teacher, "hybrid": hybrid}, context_len=16, decode_tokens=2,
                             long_context_len=8192)
    for label, model in (("teacher", teacher), ("hybrid", hybrid)):
        result = results[label]
        assert result.long_context_len == 8192 and result.long_decode_tokens_per_second > 0
        assert result.long_cache_bytes == cache_bytes(model, 8192)
    assert results["hybrid"].long_cache_bytes < results["teacher"].long_cache_bytes / 3
    assert "long_decode_speedup" in speedup(results["teacher"], results["hybrid"])
    assert "long_decode_speedup" not in speedup(measure_speeds({"t": teacher}, 16, 2)["t"], results["hybrid"])
