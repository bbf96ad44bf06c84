"""flash-linear-attention kernels (backend "fla") against our torch chunked forms, on CUDA.

Opt-in: marked `gpu` (deselected without CUDA by the conftest; skipped here too without CUDA or fla).
Compares outputs, final states and gradients in float32 and bfloat16 with a relative-norm tolerance:
fla computes in tf32/bf16 tiles, so elementwise tolerances would be brittle.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dtr_core.ops import dispatch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BATCH = 2
# (H, H_kv): as many key/value heads as query heads, and three query heads per key/value head (the fla path
# repeats k, v, the gates and the state to the query heads, and reads the state back from each group's first)
HEAD_LAYOUTS = {"H3-kv3": (3, 3), "H6-kv2": (6, 2)}
# relative L2 error ||fla - ref|| / ||ref||; the reference is our torch chunked form in float32
TOLERANCE = {torch.float32: 5e-3, torch.bfloat16: 2e-2}
DTYPE_IDS = {torch.float32: "f32", torch.bfloat16: "bf16"}


@pytest.fixture(autouse=True)
def _needs_fla():
    pytest.importorskip("fla.ops.gla", reason="needs flash-linear-attention")
    assert dispatch.select_backend(torch.device("cuda")) == "fla"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-12)).item()


def run_both(front_door, inputs, dtype):
    """(outputs, final state, grads) for backend fla on `dtype` inputs and backend torch on float32."""
    results = []
    for backend, run_dtype in (("fla", dtype), ("torch", torch.float32)):
        leaves = {}
        for name, x in inputs.items():
            # both backends see the same (rounded) inputs, so the comparison measures the kernels only
            cast = x.float() if name == "initial_state" else x.to(dtype).to(run_dtype)
            leaves[name] = cast.detach().clone().requires_grad_(True)
        output, state = front_door(**leaves, output_final_state=True, backend=backend)
        gen = torch.Generator(device="cuda").manual_seed(7)
        weight_o = torch.randn(output.shape, generator=gen, device="cuda")
        weight_s = torch.randn(state.shape, generator=gen, device="cuda")
        ((output.float() * weight_o).sum() + (state.float() * weight_s).sum()).backward()
        results.append((output.detach(), state.detach(), {name: x.grad for name, x in leaves.items()}))
    return results


def check(actual, expected, tolerance):
    output, state, grads = actual
    ref_output, ref_state, ref_grads = expected
    assert output.shape == ref_output.shape and state.shape == ref_state.shape
    assert relative_error(output, ref_output) < tolerance, "output"
    assert relative_error(state, ref_state) < tolerance, "final state"
    for name, grad in grads.items():
        assert torch.isfinite(grad.float()).all(), name
        assert relative_error(grad, ref_grads[name]) < tolerance, f"d{name}"


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("length", [63, 130, 1000])
def test_fla_chunk_gla_matches_torch(dtype, length, layout):
    heads, kv_heads = HEAD_LAYOUTS[layout]
    gen = torch.Generator(device="cuda").manual_seed(length)
    inputs = {
        "q": torch.randn(BATCH, length, heads, 64, generator=gen, device="cuda"),
        "k": torch.randn(BATCH, length, kv_heads, 64, generator=gen, device="cuda"),
        "v": torch.randn(BATCH, length, kv_heads, 64, generator=gen, device="cuda"),
        "gk": F.logsigmoid(torch.randn(BATCH, length, kv_heads, 64, generator=gen, device="cuda")) / 16,
        "initial_state": torch.randn(BATCH, kv_heads, 64, 64, generator=gen, device="cuda"),
    }
    actual, expected = run_both(dispatch.gla, inputs, dtype)
    check(actual, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("length", [63, 130, 1000])
def test_fla_chunk_gated_delta_rule_matches_torch(dtype, length, layout):
    heads, kv_heads = HEAD_LAYOUTS[layout]
    gen = torch.Generator(device="cuda").manual_seed(length)
    inputs = {
        "q": F.normalize(torch.randn(BATCH, length, heads, 64, generator=gen, device="cuda"), dim=-1),
        "k": F.normalize(torch.randn(BATCH, length, kv_heads, 64, generator=gen, device="cuda"), dim=-1),
        "v": torch.randn(BATCH, length, kv_heads, 64, generator=gen, device="cuda"),
        "g": F.logsigmoid(torch.randn(BATCH, length, kv_heads, generator=gen, device="cuda") + 2),
        "beta": torch.rand(BATCH, length, kv_heads, generator=gen, device="cuda"),
        "initial_state": torch.randn(BATCH, kv_heads, 64, 64, generator=gen, device="cuda"),
    }
    actual, expected = run_both(dispatch.gated_delta_rule, inputs, dtype)
    check(actual, expected, TOLERANCE[dtype])


def test_auto_backend_on_cuda_is_fla_and_torch_on_cpu():
    assert dispatch.select_backend(torch.device("cuda"), "auto") == "fla"
    assert dispatch.select_backend(torch.device("cpu"), "auto") == "torch"
