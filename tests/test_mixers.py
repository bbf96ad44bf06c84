"""Conformance suite, run over every registered mixer: reference vs chunked forms, recurrent decoding,
causality, teacher initialisation."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from dtr_core.mixers.state_cache import HybridCache
from dtr_core.mixers import MIXERS, MixerConfig, build_student, get_mixer_class
from dtr_core.models import random_model

MIXER_NAMES = sorted(MIXERS)


def odd_config() -> LlamaConfig:
    """Odd sizes on purpose: head_dim 60, 3 query heads sharing 1 key/value head."""
    return LlamaConfig(
        vocab_size=50, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=1, head_dim=60,
    )


def make_student(name: str, chunk_size: int = 16, seed: int = 0):
    config = odd_config()
    torch.manual_seed(seed)
    teacher = tiny_attention(config)
    student = build_student(name, config, layer_idx=1, mixer_config=MixerConfig(chunk_size=chunk_size),
                            teacher_attention=teacher)
    # Move every gate away from its initial value so the test exercises data-dependent gates.
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return config, student


def tiny_attention(config):
    from transformers.models.llama.modeling_llama import LlamaAttention

    return LlamaAttention(config, layer_idx=1)


def rope(config, batch: int, length: int, offset: int = 0):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    positions = torch.arange(offset, offset + length).unsqueeze(0).expand(batch, -1)
    x = torch.zeros(batch, length, config.hidden_size)
    return LlamaRotaryEmbedding(config)(x, positions)


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_chunked_form_equals_naive_reference_outputs_and_gradients(name):
    config, student = make_student(name)
    x = torch.randn(2, 63, config.hidden_size, requires_grad=True)
    pe = rope(config, 2, 63)
    outputs, grads = {}, {}
    for impl in ("naive", "chunk"):
        student.impl = impl
        student.zero_grad()
        x.grad = None
        out, _ = student(x, position_embeddings=pe)
        out.square().sum().backward()
        outputs[impl] = out.detach()
        grads[impl] = [x.grad.clone()] + [p.grad.clone() for p in student.parameters()]
    torch.testing.assert_close(outputs["chunk"], outputs["naive"], rtol=1e-4, atol=1e-5)
    for chunk_grad, naive_grad in zip(grads["chunk"], grads["naive"]):
        torch.testing.assert_close(chunk_grad, naive_grad, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_recurrent_decoding_equals_parallel_forward(name):
    config, student = make_student(name)
    student.eval()
    length, prefix = 37, 20
    x = torch.randn(2, length, config.hidden_size)
    with torch.no_grad():
        parallel, _ = student(x, position_embeddings=rope(config, 2, length))
        cache = HybridCache(layer_map=["full", name])
        pieces = [student(x[:, :prefix], position_embeddings=rope(config, 2, prefix), cache=cache)[0]]
        for t in range(prefix, length):
            pieces.append(student(x[:, t:t + 1], position_embeddings=rope(config, 2, 1, offset=t), cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), parallel, rtol=1e-4, atol=1e-5)
    assert cache.layers[1].seen_tokens == length


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_causality_future_tokens_do_not_change_the_past(name):
    config, student = make_student(name)
    x = torch.randn(1, 40, config.hidden_size)
    changed = x.clone()
    changed[:, 25:] = torch.randn_like(changed[:, 25:])
    pe = rope(config, 1, 40)
    with torch.no_grad():
        before, _ = student(x, position_embeddings=pe)
        after, _ = student(changed, position_embeddings=pe)
    torch.testing.assert_close(after[:, :25], before[:, :25], rtol=0, atol=0)
    assert not torch.allclose(after[:, 25:], before[:, 25:])


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_teacher_projections_are_copied_with_gqa_heads_expanded(name):
    config = odd_config()
    teacher = tiny_attention(config)
    student = build_student(name, config, 1, teacher_attention=teacher)
    x = torch.randn(1, 5, config.hidden_size)
    # HF's repeat_kv gives query head h the key/value head h // groups.
    teacher_k = teacher.k_proj(x).view(1, 5, 1, 60).repeat_interleave(3, dim=2)
    torch.testing.assert_close(student.k_proj(x).view(1, 5, 3, 60), teacher_k)
    torch.testing.assert_close(student.q_proj.weight, teacher.q_proj.weight)
    torch.testing.assert_close(student.o_proj.weight, teacher.o_proj.weight)


def test_jetblock_starts_as_its_gated_deltanet_twin():
    """The dynamic convolution is initialised to the identity."""
    config = odd_config()
    teacher = tiny_attention(config)
    torch.manual_seed(1)
    gdn = build_student("gated_deltanet", config, 1, teacher_attention=teacher)
    jet = build_student("jetblock", config, 1, teacher_attention=teacher)
    jet.load_state_dict(gdn.state_dict(), strict=False)
    x = torch.randn(1, 30, config.hidden_size)
    pe = rope(config, 1, 30)
    with torch.no_grad():
        torch.testing.assert_close(jet(x, position_embeddings=pe)[0], gdn(x, position_embeddings=pe)[0])


@pytest.mark.parametrize("name", MIXER_NAMES)
@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"])
def test_students_drop_into_every_family(name, family):
    model = random_model(family)
    teacher = model.model.layers[0].self_attn
    student = build_student(name, model.config, 0, teacher_attention=teacher)
    if family == "tiny-qwen3":
        torch.testing.assert_close(student.q_norm.weight, teacher.q_norm.weight)
    model.model.layers[0].self_attn = student
    logits = model(torch.randint(0, 250, (2, 17)), use_cache=False).logits
    assert logits.shape == (2, 17, model.config.vocab_size) and torch.isfinite(logits).all()


def test_state_bytes_are_independent_of_context():
    config, student = make_student("jetblock")
    assert student.state_bytes(1) == (3 * 60 * 60 + 3 * 60 * 3) * 4


def test_unknown_mixer_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown mixer 'mamba'; choose one of: gated_deltanet, gla, jetblock"):
        get_mixer_class("mamba")


def test_mixer_config_validates():
    with pytest.raises(ValueError, match="backend"):
        MixerConfig(backend="cuda")
    assert MixerConfig.from_dict(MixerConfig(use_rope=False).to_dict()) == MixerConfig(use_rope=False)
