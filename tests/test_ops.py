"""Linear-attention ops: chunked and step forms equal the naive recurrent loop.

Equal on outputs, gradients (q, k, v, gates, beta, initial state) and final state, at odd sizes (T = 1,
63, 130 with chunk 64; head dims 60/64; B = 2), with as many key/value heads as query heads (H = 3) and with
grouped heads (H = 6 query heads sharing H_kv = 2), under initial-state chaining, token-by-token decoding and
strong decay. GLA is checked in float64 (it computes in float64 for float64 inputs); the
gated delta rule's chunked form (transformers' implementation) always computes in float32, so it is
checked against a float64 loop with float32 tolerances.
"""

from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from dtr_core.ops import common, dispatch
from dtr_core.ops.gated_delta_rule import (
    chunk_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
    recurrent_gated_delta_rule_step,
)
from dtr_core.ops.gla import chunk_gla, naive_recurrent_gla, recurrent_gla_step

BATCH, HEADS = 2, 3
GROUPED = (6, 2)  # (H, H_kv): three query heads per key/value head
HEAD_LAYOUTS = [(HEADS, HEADS), GROUPED]
LAYOUT_IDS = ["H3-kv3", "H6-kv2"]
# (T, Dk, Dv, chunk_size): one token, an odd length shorter than a chunk, and three chunks with a short last.
SIZES = [(1, 64, 64, 64), (63, 60, 60, 64), (130, 60, 64, 64), (130, 64, 60, 16)]
SIZE_IDS = [f"T{t}-dk{dk}-dv{dv}-c{c}" for t, dk, dv, c in SIZES]
F32 = {"atol": 2e-4, "rtol": 2e-4}  # float32 math against a float64 oracle
F64 = {"atol": 1e-10, "rtol": 1e-10}


def gla_inputs(length, key_dim, value_dim, dtype=torch.float64, decay=None, seed=0, heads=(HEADS, HEADS)):
    """q [B, T, H, Dk]; k, gk [B, T, H_kv, Dk]; v [B, T, H_kv, Dv]; initial state [B, H_kv, Dk, Dv]."""
    query_heads, kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, length, query_heads, key_dim, generator=gen, dtype=dtype)
    k = torch.randn(BATCH, length, kv_heads, key_dim, generator=gen, dtype=dtype)
    v = torch.randn(BATCH, length, kv_heads, value_dim, generator=gen, dtype=dtype)
    gates = torch.randn(BATCH, length, kv_heads, key_dim, generator=gen, dtype=dtype)
    gk = F.logsigmoid(gates) if decay is None else decay + 0.1 * gates.clamp(max=0)
    h0 = torch.randn(BATCH, kv_heads, key_dim, value_dim, generator=gen, dtype=dtype)
    return {"q": q, "k": k, "v": v, "gk": gk, "initial_state": h0}


def gdr_inputs(length, key_dim, value_dim, dtype=torch.float64, decay=None, seed=0, heads=(HEADS, HEADS)):
    """q [B, T, H, Dk]; k [B, T, H_kv, Dk]; v [B, T, H_kv, Dv]; g, beta [B, T, H_kv]; state [B, H_kv, Dk, Dv]."""
    query_heads, kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(BATCH, length, query_heads, key_dim, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(BATCH, length, kv_heads, key_dim, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(BATCH, length, kv_heads, value_dim, generator=gen, dtype=dtype)
    gates = torch.randn(BATCH, length, kv_heads, generator=gen, dtype=dtype)
    g = F.logsigmoid(gates) if decay is None else decay + 0.1 * gates.clamp(max=0)
    beta = torch.rand(BATCH, length, kv_heads, generator=gen, dtype=dtype)
    h0 = torch.randn(BATCH, kv_heads, key_dim, value_dim, generator=gen, dtype=dtype)
    return {"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": h0}


def expanded(inputs):
    """The same inputs with every key/value-width tensor repeated to the query heads (HF's `repeat_kv` order)."""
    groups = inputs["q"].shape[2] // inputs["k"].shape[2]
    return {name: x if name == "q" else x.repeat_interleave(groups, dim=1 if name == "initial_state" else 2)
            for name, x in inputs.items()}


def outputs_and_grads(fn, inputs, **kwargs):
    """Run fn with every input a leaf; backprop a fixed random projection of output and final state."""
    leaves = {name: x.detach().clone().requires_grad_(True) for name, x in inputs.items()}
    output, state = fn(**leaves, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(123)
    loss = (output * torch.randn(output.shape, generator=gen, dtype=torch.float64).to(output.dtype)).sum()
    loss = loss + (state * torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)).sum()
    loss.backward()
    return output.detach(), state.detach(), {name: x.grad for name, x in leaves.items()}


def assert_all_close(actual, expected, tolerance, what=""):
    output, state, grads = actual
    ref_output, ref_state, ref_grads = expected
    torch.testing.assert_close(output, ref_output.to(output.dtype), **tolerance, msg=f"{what} output")
    torch.testing.assert_close(state, ref_state.to(state.dtype), **tolerance, msg=f"{what} final state")
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name].to(grad.dtype), **tolerance, msg=f"{what} d{name}")


# ---------------------------------------------------------------- GLA


@pytest.mark.parametrize("heads", HEAD_LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize(("length", "key_dim", "value_dim", "chunk"), SIZES, ids=SIZE_IDS)
def test_chunk_gla_matches_naive_outputs_grads_state(length, key_dim, value_dim, chunk, heads):
    inputs = gla_inputs(length, key_dim, value_dim, heads=heads)
    expected = outputs_and_grads(naive_recurrent_gla, inputs)
    actual = outputs_and_grads(chunk_gla, inputs, chunk_size=chunk)
    assert_all_close(actual, expected, F64, "chunk_gla")


def test_chunk_gla_long_sequences_run_in_segments(monkeypatch):
    inputs = gla_inputs(130, 60, 64, heads=GROUPED)
    expected = outputs_and_grads(naive_recurrent_gla, inputs)
    monkeypatch.setattr(common, "SEGMENT_LENGTH", 32)  # 130 tokens: five segments of two chunks
    actual = outputs_and_grads(chunk_gla, inputs, chunk_size=16)
    assert_all_close(actual, expected, F64, "segmented chunk_gla")


@pytest.mark.parametrize("chunk", [1, 2, 8, 32, 128])
def test_chunk_gla_any_power_of_two_chunk(chunk):
    inputs = gla_inputs(70, 60, 64)
    ref_output, ref_state = naive_recurrent_gla(**inputs, output_final_state=True)
    output, state = chunk_gla(**inputs, output_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(output, ref_output, **F64)
    torch.testing.assert_close(state, ref_state, **F64)


def test_chunk_gla_float32_and_scale():
    inputs = {name: x.float() for name, x in gla_inputs(130, 60, 64).items()}
    reference = {name: x.double() for name, x in inputs.items()}
    ref_output, ref_state = naive_recurrent_gla(**reference, scale=0.3, output_final_state=True)
    output, state = chunk_gla(**inputs, scale=0.3, output_final_state=True)
    assert output.dtype == torch.float32 and state.dtype == torch.float32
    torch.testing.assert_close(output, ref_output.float(), **F32)
    torch.testing.assert_close(state, ref_state.float(), **F32)


def test_gla_bfloat16_inputs_return_bfloat16_output_float32_state():
    inputs = {name: x.to(torch.bfloat16) for name, x in gla_inputs(63, 64, 64).items()}
    output, state = chunk_gla(**inputs, output_final_state=True)
    ref_output, ref_state = naive_recurrent_gla(**inputs, output_final_state=True)
    assert output.dtype == torch.bfloat16 and state.dtype == torch.float32
    torch.testing.assert_close(output.float(), ref_output.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(state, ref_state, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("heads", HEAD_LAYOUTS, ids=LAYOUT_IDS)
def test_gla_step_decoding_from_prefix_state_matches_naive(heads):
    inputs = gla_inputs(75, 60, 64, heads=heads)
    ref_output, ref_state = naive_recurrent_gla(**inputs, output_final_state=True)
    prefix = 67
    head = {name: x[:, :prefix] for name, x in inputs.items() if name != "initial_state"}
    _, state = chunk_gla(**head, initial_state=inputs["initial_state"], output_final_state=True)
    for t in range(prefix, 75):
        token = {name: x[:, t : t + 1] for name, x in inputs.items() if name != "initial_state"}
        output, state = recurrent_gla_step(**token, state=state)
        torch.testing.assert_close(output, ref_output[:, t : t + 1], **F64)
    torch.testing.assert_close(state, ref_state, **F64)


def test_gla_step_without_state_starts_from_zeros():
    inputs = gla_inputs(1, 60, 64, heads=GROUPED)
    del inputs["initial_state"]
    output, state = recurrent_gla_step(**inputs, state=None)
    ref_output, ref_state = naive_recurrent_gla(**inputs, output_final_state=True)
    torch.testing.assert_close(output, ref_output, **F64)
    torch.testing.assert_close(state, ref_state, **F64)


def test_gla_initial_state_chaining_equals_full_run():
    inputs = gla_inputs(130, 60, 64, heads=GROUPED)
    full_output, full_state = chunk_gla(**inputs, output_final_state=True)
    split = 61
    first = {name: x[:, :split] for name, x in inputs.items() if name != "initial_state"}
    second = {name: x[:, split:] for name, x in inputs.items() if name != "initial_state"}
    out_1, state_1 = chunk_gla(**first, initial_state=inputs["initial_state"], output_final_state=True)
    out_2, state_2 = chunk_gla(**second, initial_state=state_1, output_final_state=True)
    torch.testing.assert_close(torch.cat([out_1, out_2], dim=1), full_output, **F64)
    torch.testing.assert_close(state_2, full_state, **F64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gla_strong_decay_stays_finite_and_matches(dtype):
    inputs = gla_inputs(130, 64, 64, dtype=dtype, decay=-20.0, heads=GROUPED)
    reference = {name: x.double() for name, x in inputs.items()}
    expected = outputs_and_grads(naive_recurrent_gla, reference)
    actual = outputs_and_grads(chunk_gla, inputs)
    assert all(torch.isfinite(x).all() for x in (actual[0], actual[1], *actual[2].values()))
    assert_all_close(actual, expected, F64 if dtype == torch.float64 else F32, "strong decay")


def test_gla_rejects_bad_shapes_and_chunk():
    inputs = gla_inputs(10, 60, 64)
    with pytest.raises(ValueError, match="power of two"):
        chunk_gla(**inputs, chunk_size=48)
    with pytest.raises(ValueError, match="same shape"):
        chunk_gla(inputs["q"], inputs["k"], inputs["v"], inputs["gk"][..., :10])
    with pytest.raises(ValueError, match="q's 3 heads must be a multiple of k's 2 heads"):
        chunk_gla(inputs["q"], *(x[:, :, :2] for x in (inputs["k"], inputs["v"], inputs["gk"])))
    with pytest.raises(ValueError, match="one token"):
        recurrent_gla_step(inputs["q"], inputs["k"], inputs["v"], inputs["gk"], None)
    with pytest.raises(ValueError, match="state must be"):
        naive_recurrent_gla(**{**inputs, "initial_state": inputs["initial_state"][..., :5]})


# ---------------------------------------------------------------- gated delta rule


@pytest.mark.parametrize("heads", HEAD_LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize(("length", "key_dim", "value_dim", "chunk"), SIZES, ids=SIZE_IDS)
def test_chunk_gated_delta_rule_matches_naive_outputs_grads_state(length, key_dim, value_dim, chunk, heads):
    inputs = gdr_inputs(length, key_dim, value_dim, heads=heads)
    expected = outputs_and_grads(naive_recurrent_gated_delta_rule, inputs)
    actual = outputs_and_grads(chunk_gated_delta_rule, inputs, chunk_size=chunk)
    assert actual[1].dtype == torch.float64  # float64 inputs are computed in float64
    assert_all_close(actual, expected, F64, "chunk_gated_delta_rule")


def test_chunk_gated_delta_rule_long_sequences_run_in_segments(monkeypatch):
    inputs = gdr_inputs(130, 60, 64, heads=GROUPED)
    expected = outputs_and_grads(naive_recurrent_gated_delta_rule, inputs)
    monkeypatch.setattr(common, "SEGMENT_LENGTH", 32)
    actual = outputs_and_grads(chunk_gated_delta_rule, inputs, chunk_size=16)
    assert_all_close(actual, expected, F64, "segmented chunk_gated_delta_rule")


def test_gated_delta_rule_float32_inputs_and_scale():
    inputs = {name: x.float() for name, x in gdr_inputs(130, 60, 64).items()}
    reference = {name: x.double() for name, x in inputs.items()}
    ref_output, ref_state = naive_recurrent_gated_delta_rule(**reference, scale=0.3, output_final_state=True)
    output, state = chunk_gated_delta_rule(**inputs, scale=0.3, output_final_state=True)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output, ref_output.float(), **F32)
    torch.testing.assert_close(state, ref_state.float(), **F32)


@pytest.mark.parametrize("heads", HEAD_LAYOUTS, ids=LAYOUT_IDS)
def test_gated_delta_rule_step_decoding_from_prefix_state_matches_naive(heads):
    inputs = gdr_inputs(75, 60, 64, heads=heads)
    ref_output, ref_state = naive_recurrent_gated_delta_rule(**inputs, output_final_state=True)
    prefix = 67
    head = {name: x[:, :prefix] for name, x in inputs.items() if name != "initial_state"}
    _, state = chunk_gated_delta_rule(**head, initial_state=inputs["initial_state"], output_final_state=True)
    for t in range(prefix, 75):
        token = {name: x[:, t : t + 1] for name, x in inputs.items() if name != "initial_state"}
        output, state = recurrent_gated_delta_rule_step(**token, state=state)
        torch.testing.assert_close(output, ref_output[:, t : t + 1], **F64)
    torch.testing.assert_close(state, ref_state, **F64)


def test_gated_delta_rule_initial_state_chaining_equals_full_run():
    inputs = gdr_inputs(130, 60, 64, heads=GROUPED)
    full_output, full_state = chunk_gated_delta_rule(**inputs, output_final_state=True)
    split = 61
    first = {name: x[:, :split] for name, x in inputs.items() if name != "initial_state"}
    second = {name: x[:, split:] for name, x in inputs.items() if name != "initial_state"}
    out_1, state_1 = chunk_gated_delta_rule(**first, initial_state=inputs["initial_state"], output_final_state=True)
    out_2, state_2 = chunk_gated_delta_rule(**second, initial_state=state_1, output_final_state=True)
    torch.testing.assert_close(torch.cat([out_1, out_2], dim=1), full_output, **F64)
    torch.testing.assert_close(state_2, full_state, **F64)


def test_gated_delta_rule_strong_decay_stays_finite_and_matches():
    inputs = gdr_inputs(130, 64, 64, decay=-20.0, heads=GROUPED)
    expected = outputs_and_grads(naive_recurrent_gated_delta_rule, inputs)
    actual = outputs_and_grads(chunk_gated_delta_rule, inputs)
    assert all(torch.isfinite(x).all() for x in (actual[0], actual[1], *actual[2].values()))
    assert_all_close(actual, expected, F64, "strong decay")


def test_gated_delta_rule_rejects_bad_shapes():
    inputs = gdr_inputs(10, 60, 64)
    with pytest.raises(ValueError, match=r"g and beta must be \[B, T, H_kv\]"):
        chunk_gated_delta_rule(**{**inputs, "g": inputs["g"][..., None]})
    with pytest.raises(ValueError, match="one token"):
        recurrent_gated_delta_rule_step(inputs["q"], inputs["k"], inputs["v"], inputs["g"], inputs["beta"], None)


# ---------------------------------------------------------------- grouped heads


@pytest.mark.parametrize("op", ["gla", "gated_delta_rule"])
def test_grouped_heads_equal_the_same_op_with_key_value_heads_repeated(op):
    """Sharing a key/value head (and its state) between G query heads computes what G copies of it compute."""
    inputs = (gla_inputs if op == "gla" else gdr_inputs)(70, 60, 64, heads=GROUPED)
    chunk = chunk_gla if op == "gla" else chunk_gated_delta_rule
    output, state = chunk(**inputs, output_final_state=True, chunk_size=16)
    ref_output, ref_state = chunk(**expanded(inputs), output_final_state=True, chunk_size=16)
    assert state.shape == (BATCH, GROUPED[1], 60, 64) and output.shape == (BATCH, 70, GROUPED[0], 64)
    torch.testing.assert_close(output, ref_output, **F64)
    torch.testing.assert_close(state, ref_state.view(BATCH, GROUPED[1], 3, 60, 64)[:, :, 0], **F64)


# ---------------------------------------------------------------- dispatch


@pytest.mark.parametrize("op", ["gla", "gated_delta_rule"])
def test_empty_sequence_returns_no_tokens_and_the_initial_state(op):
    inputs = (gla_inputs if op == "gla" else gdr_inputs)(0, 8, 6)
    chunk, naive = (chunk_gla, naive_recurrent_gla) if op == "gla" else (
        chunk_gated_delta_rule, naive_recurrent_gated_delta_rule)
    for fn in (chunk, naive):
        output, state = fn(**inputs, output_final_state=True)
        assert output.shape == (BATCH, 0, HEADS, 6)
        torch.testing.assert_close(state, inputs["initial_state"], atol=0, rtol=0)


@pytest.mark.parametrize("op", ["gla", "gated_delta_rule"])
def test_whole_segments_equal_the_oracle(op, monkeypatch):
    inputs = (gla_inputs if op == "gla" else gdr_inputs)(96, 16, 8)  # three whole segments, no padding
    chunk, naive = (chunk_gla, naive_recurrent_gla) if op == "gla" else (
        chunk_gated_delta_rule, naive_recurrent_gated_delta_rule)
    expected = outputs_and_grads(naive, inputs)
    monkeypatch.setattr(common, "SEGMENT_LENGTH", 32)
    assert_all_close(outputs_and_grads(chunk, inputs, chunk_size=16), expected, F64, f"segmented {op}")


def test_select_backend_on_cpu():
    cpu = torch.device("cpu")
    assert dispatch.select_backend(cpu) == "torch"
    assert dispatch.select_backend(cpu, "torch") == "torch"
    with pytest.raises(ValueError, match="needs a CUDA device"):
        dispatch.select_backend(cpu, "fla")
    with pytest.raises(ValueError, match="unknown backend 'triton'; choose one of: auto, fla, torch"):
        dispatch.select_backend(cpu, "triton")


def test_select_backend_on_cuda_follows_fla_availability(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(dispatch, "_fla_importable", lambda: True)
    assert dispatch.select_backend(cuda) == "fla"
    assert dispatch.select_backend(cuda, "torch") == "torch"
    monkeypatch.setattr(dispatch, "_fla_importable", lambda: False)
    assert dispatch.select_backend(cuda) == "torch"
    with pytest.raises(ValueError, match="not importable"):
        dispatch.select_backend(cuda, "fla")


def test_front_doors_on_cpu_use_the_torch_chunk_forms():
    inputs = {name: x.float() for name, x in gla_inputs(70, 60, 64).items()}
    output, state = dispatch.gla(**inputs, output_final_state=True, chunk_size=32)
    ref_output, ref_state = chunk_gla(**inputs, output_final_state=True, chunk_size=32)
    torch.testing.assert_close(output, ref_output, atol=0, rtol=0)
    torch.testing.assert_close(state, ref_state, atol=0, rtol=0)
    inputs = {name: x.float() for name, x in gdr_inputs(70, 60, 64).items()}
    output, state = dispatch.gated_delta_rule(**inputs, output_final_state=True)
    ref_output, ref_state = chunk_gated_delta_rule(**inputs, output_final_state=True)
    torch.testing.assert_close(output, ref_output, atol=0, rtol=0)
    torch.testing.assert_close(state, ref_state, atol=0, rtol=0)


def fake_fla_modules(monkeypatch):
    """Stand-ins for fla's kernels that, like fla 0.6.0's, take one head count for q, k, v and the gates
    (our torch chunked forms underneath), installed as `fla.ops.gla` / `fla.ops.gated_delta_rule`."""
    def one_head_count(op):
        def kernel(q, k, v, *, g, beta=None, scale=None, initial_state=None, output_final_state=False,
                   use_qk_l2norm_in_kernel=False):
            assert q.shape[2] == k.shape[2] == v.shape[2] == g.shape[2], "fla takes one head count"
            assert initial_state is None or initial_state.shape[1] == q.shape[2]
            gates = (g,) if beta is None else (g, beta)
            return op(q, k, v, *gates, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state)
        return kernel

    for name, attribute, op in (("fla.ops.gla", "chunk_gla", chunk_gla),
                                ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", chunk_gated_delta_rule)):
        module = types.ModuleType(name)
        setattr(module, attribute, one_head_count(op))
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    monkeypatch.setitem(sys.modules, "fla.ops", types.ModuleType("fla.ops"))
    monkeypatch.setattr(dispatch, "select_backend", lambda device, requested="auto": "fla")


@pytest.mark.parametrize("op", ["gla", "gated_delta_rule"])
def test_fla_path_repeats_key_value_heads_and_reads_back_each_groups_state(op, monkeypatch):
    # float32: the fla path hands fla a float32 initial state, as fla wants
    inputs = (gla_inputs if op == "gla" else gdr_inputs)(70, 60, 64, dtype=torch.float32, heads=GROUPED)
    expected = outputs_and_grads(chunk_gla if op == "gla" else chunk_gated_delta_rule, inputs)
    fake_fla_modules(monkeypatch)
    front_door = dispatch.gla if op == "gla" else dispatch.gated_delta_rule
    actual = outputs_and_grads(front_door, inputs, backend="fla")
    assert actual[1].shape == (BATCH, GROUPED[1], 60, 64)
    assert_all_close(actual, expected, F32, f"fla path {op}")


def test_cpu_paths_never_import_triton_or_fla():
    script = """
import sys, torch
from dtr_core.ops import dispatch
from dtr_core.ops import gated_delta_rule as gdr_module
from dtr_core.ops import gla as gla_module
q = torch.randn(1, 9, 2, 8); g = torch.zeros(1, 9, 2)
dispatch.gla(q, q, q, -torch.ones_like(q))
dispatch.gated_delta_rule(q, q, q, g, g + 0.5)
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('fla', 'triton'))
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", script], check=True)
