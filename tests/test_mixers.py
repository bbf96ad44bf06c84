"""Conformance suite, run over every registered mixer and both forms (today's defaults, the published forms,
and the earlier options with JetBlock's per-channel kernel): reference vs chunked forms, recurrent decoding, causality, teacher initialisation, grouped
key/value heads against the expanded copy, the student format."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from dtr_core.mixers import MIXERS, MixerConfig, build_student, get_mixer_class
from dtr_core.mixers.base import SHORT_CONV_SIZE, STUDENT_FORMAT
from dtr_core.mixers.state_cache import HybridCache
from dtr_core.models import random_model
from mixer_op_count import GEMMS, decode_ops

MIXER_NAMES = sorted(MIXERS)
VARIANTS = {
    "default": MixerConfig(),
    "earlier": MixerConfig(gate="sigmoid", qk_activation="none", short_conv=False, value_kernel="channel"),
}
# ceilings on the aten ops of one decoded token (`tests/mixer_op_count.py`; the numbers in dtr_core/mixers/base.py)
DECODE_OPS = {"gla": (74, 4), "gated_deltanet": (91, 4), "jetblock": (107, 5)}


def odd_config(kv_heads: int = 1) -> LlamaConfig:
    """Odd sizes on purpose: head_dim 60, 3 query heads sharing 1 key/value head."""
    return LlamaConfig(
        vocab_size=50, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=kv_heads, head_dim=60,
    )


def perturb(student, scale: float = 0.05):
    """Move every parameter away from its initial value so the tests exercise data-dependent gates."""
    with torch.no_grad():
        for param in student.parameters():
            param.add_(scale * torch.randn_like(param))
    return student


def make_student(name: str, variant: str = "default", chunk_size: int = 16, seed: int = 0):
    config = odd_config()
    torch.manual_seed(seed)
    mixer_config = dataclasses.replace(VARIANTS[variant], chunk_size=chunk_size)
    student = build_student(name, config, layer_idx=1, mixer_config=mixer_config,
                            teacher_attention=LlamaAttention(config, layer_idx=1))
    return config, perturb(student)


def rope(config, batch: int, length: int, offset: int = 0):
    positions = torch.arange(offset, offset + length).unsqueeze(0).expand(batch, -1)
    x = torch.zeros(batch, length, config.hidden_size)
    return LlamaRotaryEmbedding(config)(x, positions)


def repeat_heads(x: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """Rows of `x` in `heads` equal blocks, each repeated `groups` times (HF's `repeat_kv` order)."""
    return x.reshape(heads, -1, *x.shape[1:]).repeat_interleave(groups, dim=0).reshape(-1, *x.shape[1:])


def expanded_twin(student, config):
    """The expanded form of a grouped student: every query head gets its own copy of its key/value head (k, v,
    their gates, the output gate and the short convolution's k/v taps), as students were before grouping."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    groups = heads // kv_heads
    expanded_config = LlamaConfig(**{**config.to_dict(), "num_key_value_heads": heads})
    twin = get_mixer_class(student.name)(expanded_config, student.layer_idx, student.mixer_config)
    shared = {"q", "gk_down", "kernel_down"}  # rows that do not depend on the key/value heads
    state = {}
    for suffix in ("weight", "bias"):
        whole = getattr(student.in_proj, suffix)
        state[f"in_proj.{suffix}"] = torch.cat([
            whole[student.input_rows(name)] if name in shared else
            repeat_heads(whole[student.input_rows(name)], kv_heads, groups)
            for name in student.input_widths])
    for name, value in student.state_dict().items():
        if name.startswith("in_proj."):
            continue
        if name in ("A_log", "dt_bias") or name.startswith(("gk_up.", "kernel_up.")):
            value = repeat_heads(value, kv_heads, groups)
        elif name == "short_conv":
            q_width = heads * student.head_dim
            k, v = value[q_width:].chunk(2)
            value = torch.cat([value[:q_width], repeat_heads(k, kv_heads, groups), repeat_heads(v, kv_heads, groups)])
        state[name] = value
    twin.load_state_dict(state, strict=True)
    return twin


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MIXER_NAMES)
def test_chunked_form_equals_naive_reference_outputs_and_gradients(name, variant):
    config, student = make_student(name, variant)
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


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MIXER_NAMES)
def test_recurrent_decoding_equals_parallel_forward(name, variant):
    config, student = make_student(name, variant)
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
    assert cache.layers[1].recurrent_states[0].shape == (2, 1, 60, 60)  # one state per key/value head


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MIXER_NAMES)
def test_causality_future_tokens_do_not_change_the_past(name, variant):
    config, student = make_student(name, variant)
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
def test_teacher_projections_are_copied_into_the_fused_projection(name):
    model = random_model("tiny-qwen2")  # q/k/v biases; 4 query heads, 2 key/value heads
    teacher = model.model.layers[0].self_attn
    student = build_student(name, model.config, 0, teacher_attention=teacher)
    for part in ("q", "k", "v"):
        source = getattr(teacher, f"{part}_proj")
        torch.testing.assert_close(student.in_proj.weight[student.input_rows(part)], source.weight, rtol=0, atol=0)
        torch.testing.assert_close(student.in_proj.bias[student.input_rows(part)], source.bias, rtol=0, atol=0)
    assert student.in_proj.weight[student.input_rows("k")].shape == teacher.k_proj.weight.shape  # (2 * 16, 64)
    torch.testing.assert_close(student.o_proj.weight, teacher.o_proj.weight, rtol=0, atol=0)
    x = torch.randn(1, 5, model.config.hidden_size)
    q, k, v, _, _ = student.project(x, model.model.rotary_emb(x, torch.arange(5)[None]), None)
    assert q.shape == (1, 5, 4, 16) and k.shape == v.shape == (1, 5, 2, 16)
    torch.testing.assert_close(v.reshape(1, 5, -1), teacher.v_proj(x))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MIXER_NAMES)
def test_grouped_student_at_init_is_the_expanded_copy_of_the_same_teacher(name, variant):
    """Students before grouping gave each query head its own copy of its key/value head; at initialisation the
    grouped student computes the same function."""
    config, expanded_config = odd_config(kv_heads=1), odd_config(kv_heads=3)
    torch.manual_seed(3)
    teacher = LlamaAttention(config, layer_idx=1)
    expanded_teacher = LlamaAttention(expanded_config, layer_idx=1)
    with torch.no_grad():
        for part in ("q", "o"):
            getattr(expanded_teacher, f"{part}_proj").load_state_dict(getattr(teacher, f"{part}_proj").state_dict())
        for part in ("k", "v"):
            getattr(expanded_teacher, f"{part}_proj").weight.copy_(
                repeat_heads(getattr(teacher, f"{part}_proj").weight, 1, 3))
    mixer_config = VARIANTS[variant]
    torch.manual_seed(4)
    grouped = build_student(name, config, 1, mixer_config, teacher_attention=teacher)
    torch.manual_seed(4)
    expanded = build_student(name, expanded_config, 1, mixer_config, teacher_attention=expanded_teacher)
    assert sum(p.numel() for p in grouped.parameters()) < sum(p.numel() for p in expanded.parameters())
    x = torch.randn(2, 45, config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(grouped(x, position_embeddings=rope(config, 2, 45))[0],
                                   expanded(x, position_embeddings=rope(config, 2, 45))[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MIXER_NAMES)
def test_grouped_student_equals_its_expanded_twin_after_training_moves_it(name, variant):
    """Any grouped student (not only at init) equals the expanded student whose key/value-head weights are
    copies: sharing a key/value head's state is exact."""
    config, student = make_student(name, variant)
    twin = expanded_twin(student, config)
    x = torch.randn(2, 40, config.hidden_size)
    pe = rope(config, 2, 40)
    with torch.no_grad():
        torch.testing.assert_close(student(x, position_embeddings=pe)[0], twin(x, position_embeddings=pe)[0],
                                   rtol=1e-4, atol=1e-5)


def test_jetblock_starts_as_its_gated_deltanet_twin():
    """The dynamic convolution is initialised to the identity."""
    config = odd_config()
    teacher = LlamaAttention(config, layer_idx=1)
    torch.manual_seed(1)
    gdn = perturb(build_student("gated_deltanet", config, 1, teacher_attention=teacher))
    jet = build_student("jetblock", config, 1, teacher_attention=teacher)
    state = gdn.state_dict()
    rows = state["in_proj.weight"].shape[0]  # JetBlock's own rows (the kernel generator) come last
    state["in_proj.weight"] = torch.cat([state["in_proj.weight"], jet.in_proj.weight[rows:].detach()])
    state["in_proj.bias"] = torch.cat([state["in_proj.bias"], jet.in_proj.bias[rows:].detach()])
    jet.load_state_dict(state, strict=False)
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


def test_state_bytes_are_independent_of_context_and_per_key_value_head():
    short_conv = (3 + 1 + 1) * 60 * (SHORT_CONV_SIZE - 1)  # q, k, v channels, last 3 inputs
    _, student = make_student("jetblock", "earlier")
    assert student.state_bytes(1) == (1 * 60 * 60 + 1 * 60 * 3) * 4  # one key/value head: state + 3 values
    _, student = make_student("jetblock")
    assert student.state_bytes(1) == (1 * 60 * 60 + 1 * 60 * 3 + short_conv) * 4
    _, student = make_student("gated_deltanet")
    assert student.state_bytes(2, torch.bfloat16) == 2 * (60 * 60 * 4 + short_conv * 2)


def test_output_gates_start_as_the_identity():
    for gate in ("sigmoid", "swish_norm"):
        student = build_student("gla", odd_config(), 1, MixerConfig(gate=gate))
        logits = student.in_proj.bias[student.input_rows("gate")]
        value = torch.nn.functional.silu(logits) if gate == "swish_norm" else 2 * torch.sigmoid(logits)
        torch.testing.assert_close(value, torch.ones_like(value))
        assert not student.in_proj.weight[student.input_rows("gate")].any()


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_one_decoded_token_runs_no_more_ops_than_documented(name):
    ops = decode_ops(name)
    total, gemms = DECODE_OPS[name]
    assert sum(ops[op] for op in GEMMS) <= gemms, dict(ops)
    assert sum(ops.values()) <= total, dict(ops)


def test_unknown_mixer_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown mixer 'mamba'; choose one of: gated_deltanet, gla, jetblock"):
        get_mixer_class("mamba")


def test_mixer_config_validates():
    with pytest.raises(ValueError, match="backend"):
        MixerConfig(backend="cuda")
    with pytest.raises(ValueError, match="gate must be one of sigmoid, swish_norm; got 'relu'"):
        MixerConfig(gate="relu")
    with pytest.raises(ValueError, match="value_kernel must be one of head, channel"):
        MixerConfig(value_kernel="token")
    with pytest.raises(ValueError, match="qk_activation must be one of none, silu"):
        MixerConfig(qk_activation="elu")
    earlier = VARIANTS["earlier"]
    assert MixerConfig.from_dict(earlier.to_dict()) == earlier
    assert MixerConfig.from_dict(None) == MixerConfig()


def test_student_format_is_part_of_the_defining_dict():
    assert MixerConfig().defining_dict()["student_format"] == STUDENT_FORMAT == 2
    assert MixerConfig(short_conv=False).defining_dict() != MixerConfig().defining_dict()
    assert MixerConfig(chunk_size=8, backend="torch").defining_dict() == MixerConfig().defining_dict()


def test_students_saved_by_an_earlier_dtr_are_refused_with_the_fix():
    earlier = {"use_rope": True, "conv_size": 4, "chunk_size": 32, "backend": "auto"}  # a format-1 meta.json
    with pytest.raises(ValueError, match=r"saved by an earlier dtr \(students with expanded key/value heads.*"
                                         r"distil it again with the same `dtr convert` command"):
        MixerConfig.from_dict(earlier)
    with pytest.raises(ValueError, match="saved by an earlier dtr"):
        MixerConfig.from_dict({**earlier, "student_format": 1})
    with pytest.raises(ValueError, match="newer than this dtr"):
        MixerConfig(student_format=STUDENT_FORMAT + 1)


def padded_rows(lengths: list[int], hidden: int, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Rows of `lengths` tokens (B separate (1, L, hidden) tensors) and the same rows left-padded into one batch
    (B, max L, hidden) with garbage on the pads, and its 2D mask (1 = real)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    rows = [torch.randn(1, length, hidden, generator=generator) for length in lengths]
    batch = torch.randn(len(lengths), width, hidden, generator=generator) * 10  # pads: large garbage
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for index, row in enumerate(rows):
        batch[index, width - row.shape[1]:] = row[0]
        mask[index, width - row.shape[1]:] = 1
    return rows, batch, mask


def padded_rope(config, mask: torch.Tensor, offset: torch.Tensor | None = None):
    """RoPE at each row's own positions (0 at its first real token), as `generate` gives a left-padded batch."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if offset is not None:
        positions = positions + offset
    x = torch.zeros(*mask.shape, config.hidden_size)
    return LlamaRotaryEmbedding(config)(x, positions)


def four_d(mask: torch.Tensor, additive: bool) -> torch.Tensor:
    """HF's sdpa (boolean) or eager (additive) causal mask (B, 1, T, T) of a 2D padding mask."""
    length = mask.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min) if additive else allowed


@pytest.mark.parametrize("mask_form", ["2d", "sdpa", "eager"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MIXER_NAMES)
def test_left_padded_rows_equal_each_row_alone_in_the_parallel_forward(name, variant, mask_form):
    config, student = make_student(name, variant, chunk_size=4)
    student.eval()
    lengths = [9, 3, 6]
    rows, batch, mask = padded_rows(lengths, config.hidden_size)
    attention_mask = mask if mask_form == "2d" else four_d(mask, additive=mask_form == "eager")
    with torch.no_grad():
        cache = HybridCache(layer_map=["full", name])
        together, _ = student(batch, position_embeddings=padded_rope(config, mask), attention_mask=attention_mask,
                              cache=cache)
        for index, row in enumerate(rows):
            alone_cache = HybridCache(layer_map=["full", name])
            alone, _ = student(row, position_embeddings=rope(config, 1, row.shape[1]), cache=alone_cache)
            torch.testing.assert_close(together[index:index + 1, -row.shape[1]:], alone, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(cache.layers[1].recurrent_states[0][index:index + 1],
                                       alone_cache.layers[1].recurrent_states[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", MIXER_NAMES)
def test_left_padded_rows_equal_each_row_alone_in_cached_generation(name, variant):
    """Prefill a left-padded batch, then decode token by token (a decoded token is never a pad)."""
    config, student = make_student(name, variant)
    student.eval()
    lengths, steps = [7, 2, 5], 4
    rows, batch, mask = padded_rows(lengths, config.hidden_size, seed=1)
    following = torch.randn(len(lengths), steps, config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = HybridCache(layer_map=["full", name])
        pieces = [student(batch, position_embeddings=padded_rope(config, mask), attention_mask=mask, cache=cache)[0]]
        for t in range(steps):
            mask = torch.cat([mask, torch.ones(len(lengths), 1, dtype=torch.long)], dim=1)
            step_rope = padded_rope(config, mask)
            pieces.append(student(following[:, t:t + 1], position_embeddings=tuple(p[:, -1:] for p in step_rope),
                                  attention_mask=mask, cache=cache)[0])
        together = torch.cat(pieces, dim=1)
        for index, row in enumerate(rows):
            whole = torch.cat([row, following[index:index + 1]], dim=1)
            alone, _ = student(whole, position_embeddings=rope(config, 1, whole.shape[1]))
            torch.testing.assert_close(together[index:index + 1, -whole.shape[1]:], alone, rtol=1e-4, atol=1e-5)


def test_an_all_real_mask_changes_nothing():
    config, student = make_student("gated_deltanet")
    x = torch.randn(2, 11, config.hidden_size)
    pe = rope(config, 2, 11)
    with torch.no_grad():
        plain, _ = student(x, position_embeddings=pe)
        masked, _ = student(x, position_embeddings=pe, attention_mask=torch.ones(2, 11, dtype=torch.long))
    torch.testing.assert_close(masked, plain, rtol=0, atol=0)
