"""Slow: the invariants again on the real pretrained SmolLM2-135M (converted from the packaged GGUF)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dtr_core.hybrid.build import build_hybrid, save_hybrid
from dtr_core.hybrid.model import cache_bytes, layer_map, make_hybrid
from dtr_core.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_smollm2_is_the_documented_model(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.hidden_size == 576 and config.tie_word_embeddings
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        generated = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, ids.shape[1]:])


def test_zero_swap_hybrid_reproduces_smollm2_logits(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("Movie review: a gripping, beautiful film.\nSentiment (positive or negative):", return_tensors="pt").input_ids
    with torch.inference_mode():
        torch.testing.assert_close(make_hybrid(model, {})(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("mixer", ["gated_deltanet", "jetblock"])
def test_smollm2_hybrid_saves_loads_and_decodes_with_its_cache(smollm2, tmp_path, mixer):
    model, tokenizer = smollm2
    hybrid = build_hybrid(model, [3, 10, 20], mixer)
    save_hybrid(hybrid, tokenizer, tmp_path / "h")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    assert layer_map(loaded).count(mixer) == 3
    ids = tokenizer("Once upon a time", return_tensors="pt").input_ids
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids).logits, hybrid(ids).logits, rtol=0, atol=0)
        generated = loaded.generate(ids, max_new_tokens=6, do_sample=False)
        uncached = ids
        for _ in range(6):
            next_id = loaded(uncached, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            uncached = torch.cat([uncached, next_id], dim=1)
    assert torch.equal(generated, uncached)
    # 27 full layers keep K and V (3 heads x 64 dims, fp32); 3 layers keep a 9 x 64 x 64 state.
    assert cache_bytes(loaded, 2048) == 27 * 2 * 3 * 64 * 2048 * 4 + 3 * hybrid.model.layers[3].self_attn.state_bytes()
