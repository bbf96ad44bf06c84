"""Gated delta rule (Gated DeltaNet): recurrent oracle, chunked parallel form and one-token step.

Follows Yang, Kautz and Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(ICLR 2025) and flash-linear-attention's `fla/ops/gated_delta_rule/naive.py`; the chunked form is the UT
transform of fla's chunked kernel. Layout `[B, T, H, D]`.

Recurrence, per batch and head, in the paper's `[Dv, Dk]` orientation (`g_t <= 0` log decay, `beta_t`
write strength in (0, 1)):

    S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
    o_t = scale * S_t q_t

The state is stored transposed, `[B, H, Dk, Dv]` (as fla and transformers do), so one step reads

    S <- exp(g) S ;  S <- S + k (beta (v - S^T k))^T ;  o = scale * S^T q.

`q` and `k` are expected L2-normalised by the caller (the mixer); no op normalises them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtr_core.ops.common import DEFAULT_CHUNK_SIZE, check_state, compute_dtype, over_segments, start_state


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
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = start_state(q, v, initial_state)
    q, k, v, g, beta = (x.to(state.dtype) for x in (q, k, v, g, beta))
    output = torch.zeros_like(v)  # (B, T, H, Dv)
    for t in range(q.shape[1]):
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


def _chunk_gated_delta_rule_segment(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    state: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment in compute dtype: inputs (B, T, H, ...), state (B, H, Dk, Dv) -> (o (B, T, H, Dv), state).

    Per chunk of C tokens, with b the inclusive cumulative sum of g inside the chunk, D[i, j] = exp(b_i - b_j)
    for j <= i (0 above), and A the strictly lower part of (beta k) k^T * D, the UT transform gives
    u = (I + A)^-1 (beta v) and w = (I + A)^-1 (beta exp(b) k). The chunk then reads and writes the state S
    entering it as
        v_new = u - w S ;  o = (q exp(b)) S + ((q k^T) * D) v_new ;  S' = exp(b_last) S + (k exp(b_last - b))^T v_new.
    Only the two state products run chunk by chunk; everything else is batched over the segment's chunks.
    """
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    chunk = min(chunk, length)
    pad = (-length) % chunk
    chunks = (length + pad) // chunk

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, ...) -> contiguous (B*H*N, C, ...)
        x = x.transpose(1, 2)  # (B, H, T, ...)
        if pad:  # zero k, v, beta and g: padded tokens leave the state unchanged
            x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
        return x.reshape(batch * heads * chunks, chunk, *x.shape[3:])

    def per_chunk(x: torch.Tensor) -> torch.Tensor:  # (B*H*N, ...) -> (B*H, N, ...), a view
        return x.unflatten(0, (batch * heads, chunks))

    # 3-D (B*H*N, rows, cols) throughout: bmm reads transposed operands in place, 4-D matmul would copy them
    q, k, v, g, beta = (to_chunks(x) for x in (q, k, v, g, beta))
    cumulative = g.cumsum(-1)  # (BHN, C)
    decay_from_start = cumulative.exp().unsqueeze(-1)  # exp(b), (BHN, C, 1)
    decay = (cumulative.unsqueeze(-1) - cumulative.unsqueeze(-2)).tril().exp().tril()  # D, with 0 above
    k_beta = k * beta.unsqueeze(-1)
    system = torch.bmm(k_beta, k.mT) * decay  # solve_triangular reads only its strictly lower part
    identity = torch.eye(chunk, dtype=q.dtype, device=q.device).expand_as(system)
    inverse = torch.linalg.solve_triangular(system, identity, upper=False, unitriangular=True)  # (I + A)^-1
    u = per_chunk(torch.bmm(inverse, v * beta.unsqueeze(-1)))
    w = per_chunk(torch.bmm(inverse, k_beta * decay_from_start))
    q = q * scale
    intra = torch.bmm(q, k.mT) * decay  # (BHN, C, C)
    k_decayed_t = per_chunk((k * (cumulative[:, -1:] - cumulative).exp().unsqueeze(-1)).mT)  # (BH, N, Dk, C)
    chunk_decay = per_chunk(cumulative[:, -1].exp()[:, None, None])  # (BH, N, 1, 1)
    state = state.reshape(batch * heads, key_dim, value_dim)
    states_in, new_values = [], []  # the state entering each chunk, and each chunk's v_new
    for n in range(chunks):
        states_in.append(state)
        new_value = torch.baddbmm(u[:, n], w[:, n], state, alpha=-1)
        state = torch.baddbmm(state * chunk_decay[:, n], k_decayed_t[:, n], new_value)
        new_values.append(new_value)
    new_values, states_in = (torch.stack(x, dim=1).flatten(0, 1) for x in (new_values, states_in))
    output = torch.baddbmm(torch.bmm(intra, new_values), q * decay_from_start, states_in)  # (BHN, C, Dv)
    output = output.view(batch, heads, chunks * chunk, value_dim)[:, :, :length].transpose(1, 2)  # a view
    return output, state.view(batch, heads, key_dim, value_dim)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule in chunked parallel form (UT transform per chunk); equals the naive loop.

    The algorithm of fla's chunked kernel and of transformers' `torch_chunk_gated_delta_rule` (Qwen3-Next),
    with only the state products in the chunk loop, one triangular inverse per chunk and the rest batched
    (what that buys on CPU: docs/BENCHMARKS_MIXERS.md). It computes in float32, or
    float64 for float64 inputs. Sequences longer than `ops.common.SEGMENT_LENGTH` run segment by segment,
    the state carried over (same result, better cache use).

    q, k: [B, T, H, Dk] (L2-normalised); v: [B, T, H, Dv]; g, beta: [B, T, H]; initial_state: [B, H, Dk, Dv].
    Returns (o [B, T, H, Dv] in q's dtype, final_state [B, H, Dk, Dv] in compute dtype | None).
    """
    _check_inputs(q, k, v, g, beta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = start_state(q, v, initial_state)
    inputs = [x.to(state.dtype) for x in (q, k, v, g, beta)]
    output, state = over_segments(
        lambda pieces, state: _chunk_gated_delta_rule_segment(*pieces, scale, state, chunk_size),
        inputs, state, chunk_size)
    return output.to(dtype), state if output_final_state else None
