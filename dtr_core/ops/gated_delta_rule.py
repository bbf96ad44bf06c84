"""Gated delta rule (Gated DeltaNet): recurrent oracle, chunked parallel form and one-token step.

Follows Yang, Kautz and Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(ICLR 2025), flash-linear-attention's `fla/ops/gated_delta_rule/naive.py`, and wraps transformers'
plain-PyTorch `torch_chunk_gated_delta_rule` (Qwen3-Next) for the chunked form. Layout `[B, T, H, D]`.

Recurrence, per batch and head, in the paper's `[Dv, Dk]` orientation (`g_t <= 0` log decay, `beta_t`
write strength in (0, 1)):

    S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
    o_t = scale * S_t q_t

The state is stored transposed, `[B, H, Dk, Dv]` (as fla and transformers do), so one step reads

    S <- exp(g) S ;  S <- S + k (beta (v - S^T k))^T ;  o = scale * S^T q.

`q` and `k` are expected L2-normalised by the caller (the mixer); no op normalises them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from dtr_core.ops.common import check_state, compute_dtype

SEGMENT_LENGTH = 512  # tokens per call of the chunked kernel on long sequences (state carried over)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> None:
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [B, T, H, Dk] of one shape; got {tuple(q.shape)}, {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, Dv] matching q's [B, T, H]; got {tuple(v.shape)}")
    if g.shape != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(
            f"g and beta must be [B, T, H] = {tuple(q.shape[:3])}; got {tuple(g.shape)}, {tuple(beta.shape)}"
        )


def _step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token in compute dtype. q, k: (B, H, Dk); v: (B, H, Dv); g, beta: (B, H); state: (B, H, Dk, Dv)."""
    state = state * g.exp()[..., None, None]
    predicted = torch.einsum("bhk,bhkv->bhv", k, state)  # what the decayed memory recalls for k: S^T k
    delta = beta.unsqueeze(-1) * (v - predicted)  # (B, H, Dv)
    state = state + k.unsqueeze(-1) * delta.unsqueeze(-2)
    out = scale * torch.einsum("bhk,bhkv->bhv", q, state)
    return out, state


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule as a per-token loop (the oracle; slow).

    q, k: [B, T, H, Dk]; v: [B, T, H, Dv]; g, beta: [B, T, H]; initial_state: [B, H, Dk, Dv].
    Returns (o [B, T, H, Dv] in q's dtype, final_state [B, H, Dk, Dv] in compute dtype | None).
    """
    _check_inputs(q, k, v, g, beta)
    batch, length, heads, key_dim = q.shape
    dtype = q.dtype
    compute = compute_dtype(q.dtype, v.dtype)
    scale = key_dim**-0.5 if scale is None else scale
    if initial_state is None:
        state = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=compute)
    else:
        check_state(initial_state, q, v)
        state = initial_state.to(compute)
    q, k, v, g, beta = (x.to(compute) for x in (q, k, v, g, beta))
    output = torch.zeros_like(v)  # (B, T, H, Dv)
    for t in range(length):
        output[:, t], state = _step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], state, scale)
    return output.to(dtype), state if output_final_state else None


def recurrent_gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step (`T == 1`) from a cached state.

    q, k: [B, 1, H, Dk]; v: [B, 1, H, Dv]; g, beta: [B, 1, H]; state: [B, H, Dk, Dv] or None (zeros).
    Returns (o [B, 1, H, Dv] in q's dtype, new_state [B, H, Dk, Dv] in compute dtype).
    """
    _check_inputs(q, k, v, g, beta)
    if q.shape[1] != 1:
        raise ValueError(f"recurrent_gated_delta_rule_step takes one token (T == 1); got T = {q.shape[1]}")
    batch, _, heads, key_dim = q.shape
    scale = key_dim**-0.5 if scale is None else scale
    if state is None:
        compute = compute_dtype(q.dtype, v.dtype)
        state = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=compute)
    else:
        check_state(state, q, v)
        compute = compute_dtype(q.dtype, v.dtype, state.dtype)
    dtype = q.dtype
    q, k, v, g, beta = (x[:, 0].to(compute) for x in (q, k, v, g, beta))  # (B, H, ...)
    out, state = _step(q, k, v, g, beta, state.to(compute), scale)
    return out.unsqueeze(1).to(dtype), state


@functools.cache
def _transformers_chunk_gated_delta_rule() -> Callable:
    """transformers' `torch_chunk_gated_delta_rule`, undecorated.

    Imported lazily (first call), and unwrapped: transformers decorates it to dispatch to fla's Triton
    kernel whenever fla is importable, even for CPU tensors (which then fails); we pick backends ourselves
    in `dispatch.py`.
    """
    from transformers.models.qwen3_next import modeling_qwen3_next

    return inspect.unwrap(modeling_qwen3_next.torch_chunk_gated_delta_rule)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule in chunked parallel form (WY/UT transform per chunk); equals the naive loop.

    Wraps transformers' `torch_chunk_gated_delta_rule` (transformers 5.24: same `[B, T, H, D]` layout,
    `g`/`beta` `[B, T, H]`, state `[B, H, Dk, Dv]`, pads odd `T`, differentiable, takes `initial_state`).
    Adapted here: it always scales q by `Dk ** -0.5`, so a custom `scale` is folded into q; it always
    computes in float32 (also for float64 inputs); it returns the output in float32, cast back to q's dtype.
    Sequences longer than `SEGMENT_LENGTH` run segment by segment, the state carried over (same result,
    better cache use: on 2 idle CPU cores at T = 32K, 512-token segments take 0.44 s, one 4096-token
    segment at a time 0.51 s).

    q, k: [B, T, H, Dk] (L2-normalised); v: [B, T, H, Dv]; g, beta: [B, T, H]; initial_state: [B, H, Dk, Dv].
    Returns (o [B, T, H, Dv] in q's dtype, final_state [B, H, Dk, Dv] float32 | None).
    """
    _check_inputs(q, k, v, g, beta)
    if initial_state is not None:
        check_state(initial_state, q, v)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    dtype = q.dtype
    batch, length, heads, key_dim = q.shape
    q = q.float()
    if scale is not None:
        q = q * (scale * key_dim**0.5)  # transformers multiplies by Dk ** -0.5 itself
    chunked = _transformers_chunk_gated_delta_rule()
    state = initial_state
    outputs = [v.new_zeros(batch, 0, heads, v.shape[-1], dtype=torch.float32)]  # T == 0: empty output
    segment = max(1, SEGMENT_LENGTH // chunk_size) * chunk_size  # whole chunks: no padding mid-sequence
    for start in range(0, length, segment):
        piece = (x[:, start : start + segment] for x in (q, k, v, g, beta))
        output, state = chunked(
            *piece, chunk_size=chunk_size, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=False
        )
        outputs.append(output)
    output = torch.cat(outputs, dim=1) if len(outputs) > 2 else outputs[-1]
    if state is None:  # T == 0 without an initial state
        state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    state = state.float()
    return output.to(dtype), state if output_final_state else None
