"""`dtr hybridize` end to end: a saved hybrid that loads and generates; bad input writes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import dtr_core  # noqa: F401


def run_dtr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dtr.cli", *args], capture_output=True, text=True, timeout=300)


def test_hybridize_saves_a_loadable_hybrid(tmp_path):
    out = tmp_path / "hybrid"
    result = run_dtr("hybridize", "--model", "tiny-qwen3", "--layers", "0,2", "--mixer", "gla", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "2/4 layers linear (gla)" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.dtr_layer_mixers == ["gla", "full", "gla", "full"]
    generated = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "1,9"], "error: layer index 9 is out of range; this model has layers 0..3"),
        (["--layers", "1", "--mixer", "mamba"], "error: unknown mixer 'mamba'; choose one of"),
        (["--layers", "x"], "error: --layers 'x' is not a list of layer indices"),
        (["--layers", "1", "--students", "/no/such/dir"], "error: students folder /no/such/dir does not exist"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "hybrid"
    result = run_dtr("hybridize", "--model", "tiny-llama", "--out", str(out), *args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_model_path_is_a_clear_error(tmp_path):
    result = run_dtr("hybridize", "--model", str(tmp_path / "nope"), "--layers", "1", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "is neither a built-in name" in result.stderr
