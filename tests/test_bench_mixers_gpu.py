"""The mixer benchmark on a CUDA GPU: fla rows next to the torch forms (tiny sizes; says nothing about speed)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import mixers

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_tiny_cuda_run_has_fla_rows(capsys):
    pytest.importorskip("fla.ops.gla", reason="needs flash-linear-attention")
    assert mixers.main(["--tiny", "--json", "--device", "cuda"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["meta"]["device"] != "cpu"
    impls = {(row["op"], row["impl"]) for row in result["rows"]}
    assert {("gla", "fla"), ("gated_delta_rule", "fla")} <= impls
