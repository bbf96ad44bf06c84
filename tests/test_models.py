"""Built-in model sources: the in-code byte tokenizer is the same in every process."""

from __future__ import annotations

import subprocess
import sys

from dtr_core.models import TINY_VOCAB, byte_tokenizer


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
