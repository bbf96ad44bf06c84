"""`dtr hybridize` end to end: a saved hybrid that loads and generates; bad input writes nothing; a user's
folder is never replaced without --overwrite."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import dtr_core.hybrid  # noqa: F401


def run_dtr(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dtr.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


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
        (["--layers", ""], "error: --layers is empty; give the layers to make linear, e.g. 3,7,12 or 0-4"),
        (["--layers", "3-1"], "error: --layers '3-1' has the reversed range 3-1; write it as 1-3"),
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


def test_a_users_folder_is_never_replaced_without_overwrite(tmp_path):
    """mkdir precious && echo x > precious/thesis.txt && dtr hybridize --model tiny-llama --layers 1 --out precious"""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("x\n")
    args = ("hybridize", "--model", "tiny-llama", "--layers", "1", "--out", "precious")
    refused = run_dtr(*args, cwd=tmp_path)
    assert refused.returncode == 2 and "saved" not in refused.stdout
    assert refused.stderr.strip().splitlines() == [
        "error: precious is a folder that dtr did not write; choose a new or empty folder, or pass --overwrite to "
        "replace it"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.txt"]
    assert (precious / "thesis.txt").read_text() == "x\n"

    replaced = run_dtr(*args, "--overwrite", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr
    assert "1/4 layers linear" in replaced.stdout and not (precious / "thesis.txt").exists()
    again = run_dtr("hybridize", "--model", "tiny-llama", "--layers", "0-1", "--out", "precious", cwd=tmp_path)
    assert again.returncode == 0, again.stderr  # its own earlier output: replaced without --overwrite
    assert AutoModelForCausalLM.from_pretrained(precious).config.dtr_layer_mixers[:3] == [
        "gated_deltanet", "gated_deltanet", "full"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"], "no temporary folders left behind"
