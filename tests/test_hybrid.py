"""Surgery and hybrid models: exact invariants, save/load, cached generation, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

import dtr_core.hybrid  # noqa: F401  registers the hybrid classes
from dtr_core.hybrid.model import cache_bytes, layer_map, make_hybrid
from dtr_core.mixers import MIXERS, MixerConfig, build_student
from dtr_core.models import random_model
from dtr_core.hybrid.surgery import attention_module, restore_layers, swap_layers

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]


PUBLISHED = MixerConfig(gate="swish_norm", qk_activation="silu", short_conv=True, value_kernel="channel")


def students_for(model, layers, name="gated_deltanet", mixer_config=None):
    return {i: build_student(name, model.config, i, mixer_config, teacher_attention=attention_module(model, i))
            for i in layers}


def perturbed(students):
    """Students away from their initial gates, so a wrong state path cannot hide behind near-identity gates."""
    with torch.no_grad():
        for student in students.values():
            for param in student.parameters():
                param.add_(0.02 * torch.randn_like(param))
    return students


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_swaps_reproduce_the_teacher_bit_for_bit(family):
    model = random_model(family)
    ids = torch.randint(0, 250, (2, 33))
    expected = model(ids).logits
    assert swap_layers(model, {}) == {}
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    hybrid = make_hybrid(model, {})
    assert layer_map(hybrid) == ["full"] * 4
    torch.testing.assert_close(hybrid(ids).logits, expected, rtol=0, atol=0)


def test_swap_then_restore_is_exact():
    model = random_model("tiny-llama")
    ids = torch.randint(0, 250, (1, 20))
    expected = model(ids).logits
    originals = swap_layers(model, perturbed(students_for(model, [1, 3])))
    assert not torch.allclose(model(ids).logits, expected)
    restore_layers(model, originals)
    torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_save_load_round_trip_without_remote_code(tmp_path, family, mixer):
    model = random_model(family)
    students = perturbed(students_for(model, [0, 2], mixer))
    hybrid = make_hybrid(model, students)
    ids = torch.randint(0, 250, (2, 21))
    expected = hybrid(ids).logits
    swap_layers(model, students)
    torch.testing.assert_close(model(ids, use_cache=False).logits, expected)  # same as in-place surgery
    hybrid.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == type(hybrid).__name__
    assert loaded.config.dtr_layer_mixers == [mixer, "full", mixer, "full"]
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("published", [False, True], ids=["default", "published"])
@pytest.mark.parametrize("mixer", sorted(MIXERS))
@pytest.mark.parametrize("layers", [[1, 2], [0, 1, 2, 3]], ids=["half", "all-linear"])
def test_cached_greedy_generation_equals_argmax_over_full_forwards(mixer, layers, published):
    """With the published options the short convolution's inputs live in the cache too."""
    model = random_model("tiny-llama")
    hybrid = make_hybrid(model, perturbed(students_for(model, layers, mixer, PUBLISHED if published else None)))
    prompt = torch.randint(0, 250, (1, 12))
    generated = hybrid.generate(prompt, max_new_tokens=15, do_sample=False, min_new_tokens=15)
    ids = prompt
    for _ in range(15):
        next_id = hybrid(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("published", [False, True], ids=["default", "published"])
@pytest.mark.parametrize("mixer", sorted(MIXERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cache_holds_exactly_full_layer_kv_plus_fixed_state(dtype, mixer, published):
    model = random_model("tiny-llama", dtype=dtype)  # 4 query heads, 2 key/value heads of 16 dims
    hybrid = make_hybrid(model, students_for(model, [1, 3], mixer, PUBLISHED if published else None))
    out = hybrid(torch.randint(0, 250, (1, 50)), use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    held = 0
    for layer in cache.layers:
        if hasattr(layer, "recurrent_states"):
            held += sum(t.numel() * t.element_size() for t in layer.recurrent_states.values() if t is not None)
            held += sum(t.numel() * t.element_size() for t in layer.conv_states.values() if t is not None)
        else:
            held += layer.keys.numel() * layer.keys.element_size() * 2
    assert held == cache_bytes(hybrid, context_len=50)
    assert cache.layers[1].recurrent_states[0].shape == (1, 2, 16, 16)  # one state per key/value head
    element = torch.empty((), dtype=dtype).element_size()
    assert cache_bytes(hybrid, 10_000) - cache_bytes(hybrid, 5_000) == 2 * (2 * 2 * 16 * 5_000 * element)


def test_hybrids_saved_by_an_earlier_dtr_are_refused_with_the_fix(tmp_path):
    model = random_model("tiny-llama")
    make_hybrid(model, students_for(model, [1])).save_pretrained(tmp_path)
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())
    assert config["dtr_mixer_config"]["student_format"] == 2
    del config["dtr_mixer_config"]["student_format"]  # what an earlier dtr wrote
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"this dtr_llama hybrid was saved by an earlier dtr \(students with expanded "
                                         r"key/value heads.*build it again with the same `dtr convert`"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_unsupported_architecture_names_supported_families():
    opt = OPTForCausalLM(OPTConfig(num_hidden_layers=1, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                   word_embed_proj_dim=32, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported architecture 'opt'.*gpt_neox, granite, llama, mistral, olmo2, "
                                         "phi3, qwen2, qwen3"):
        swap_layers(opt, {})


def test_layer_out_of_range_is_a_clear_error():
    model = random_model("tiny-llama")
    with pytest.raises(ValueError, match="layer index 7 is out of range; this model has layers 0..3"):
        attention_module(model, 7)
