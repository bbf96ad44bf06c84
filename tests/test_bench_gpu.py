"""The benchmarks on a CUDA GPU, tiny sizes (well-formed output; says nothing about speed)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import inference, mixers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_tiny_cuda_run_has_fla_rows(capsys):
    pytest.importorskip("fla.ops.gla", reason="needs flash-linear-attention")
    assert mixers.main(["--tiny", "--json", "--device", "cuda"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["meta"]["device"] != "cpu"
    impls = {(row["op"], row["impl"]) for row in result["rows"]}
    assert {("gla", "fla"), ("gated_delta_rule", "fla")} <= impls


def test_tiny_cuda_inference_run_keeps_exact_cache_accounting(tmp_path, capsys):
    argv = ["--model", "tiny-llama", "--contexts", "64,128", "--repeats", "1", "--decode-tokens", "2",
            "--balance-mb", "8", "--device", "cuda", "--out", str(tmp_path), "--json"]
    assert inference.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["device"] == "cuda" and result["settings"]["dtype"] == "bfloat16"
    assert result["machine"]["device"] == torch.cuda.get_device_name()
    assert {r["context"] for r in result["prefill"]} == {64, 128}  # on a GPU every context is prefilled
    assert all(r["peak_bytes"] > 0 for r in result["prefill"] + result["decode"])
    assert result["targets"]["cache_exact"]["met"] is True
    assert f"({torch.cuda.get_device_name()}, batch 1)" in (tmp_path / "inference.md").read_text()
