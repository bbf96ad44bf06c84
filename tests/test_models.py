"""Built-in model sources: the in-code byte tokenizer is the same in every process; random models' shapes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from transformers import AutoConfig

from dtr_core.models import SHAPE_CONFIGS, TINY_VOCAB, byte_tokenizer, load_model, model_fingerprint, smollm2_folder


def test_byte_tokenizer_ids_are_byte_values():
    tokenizer = byte_tokenizer()
    text = "Hi é\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (256, 257, 258)
    assert len(tokenizer) == TINY_VOCAB


def test_byte_tokenizer_vocab_is_identical_in_another_process():
    script = "from dtr_core.models import byte_tokenizer; print(sorted(byte_tokenizer().get_vocab().items()))"
    # A different hash seed is what used to reorder the vocabulary between processes.
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert other.stdout.strip() == str(sorted(byte_tokenizer().get_vocab().items()))


def test_smollm2_random_is_seeded_and_has_smollm2s_shape():
    first, tokenizer = load_model("smollm2-135m-random")
    second, _ = load_model("smollm2-135m-random")
    config = first.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (576, 1536, 49152)
    assert sum(p.numel() for p in first.parameters()) == 134_515_008  # SmolLM2-135M's count (tied embeddings)
    assert model_fingerprint(first) == model_fingerprint(second)
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == [97, 98]


@pytest.mark.slow
def test_smollm2_random_config_matches_the_real_model():
    real = AutoConfig.from_pretrained(smollm2_folder()).to_dict()
    shape = SHAPE_CONFIGS["smollm2-135m-random"]().to_dict()
    ignored = {"_name_or_path", "_model_name_or_path", "dtype", "transformers_version", "unk_token_id",
               "architectures", "initializer_range", "use_cache"}
    differing = {key for key in real.keys() | shape.keys() if key not in ignored and real.get(key) != shape.get(key)}
    assert not differing, {key: (real.get(key), shape.get(key)) for key in differing}
