"""Gated linear attention (GLA): recurrent oracle, chunked parallel form and one-token step.

Follows Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training" (ICML 2024)
and flash-linear-attention's `fla/ops/gla/{naive,chunk}.py`. Layout `[B, T, H, D]`.

Recurrence, per batch and head (state `S` is `[Dk, Dv]`, `gk_t <= 0` is a log decay per key dim):

    S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t

Chunked form (`chunk_gla`): the sequence is cut into chunks of `C` tokens. With `b` the cumulative log
decay inside a chunk (inclusive, so `b_i - b_j` is the decay from token `j` to token `i`):

    o_i = scale * [ (q_i * exp(b_i)) S_start  +  sum_{j <= i in chunk} (q_i * exp(b_i - b_j)) . k_j  v_j ]
    S_end = diag(exp(b_last)) S_start + sum_j (k_j * exp(b_last - b_j))^T v_j

Numerical stability: no positive number is ever exponentiated (so strong decay, e.g. `gk ~ -20`, cannot
overflow). The intra-chunk score `(q_i * exp(b_i - b_j)) . k_j` is not a plain matmul because the decay
is per key dim; we build it by recursive halving with a reference point, the same idea as fla's
secondary chunking: for a block of rows `i` in the second half and columns `j` in the first half of a
span, with `r` the last row of the first half,

    exp(b_i - b_j) = exp(b_i - b_r) * exp(b_r - b_j),   both exponents <= 0,

so the block is `(q * exp(b - b_r)) @ (k * exp(b_r - b))^T`. Halving down to single tokens (whose
score is `q_i . k_i`) covers every pair `j <= i` exactly once, with `log2(C)` batched matmuls. Memory
is linear in `T`: the scores are `[.., T/C, C, C]` and the per-chunk states `[.., T/C, Dk, Dv]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs; float64 stays float64."""
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, Dk]; got shape {tuple(q.shape)}")
    if k.shape != q.shape or gk.shape != q.shape:
        raise ValueError(
            f"q, k and gk must have the same shape [B, T, H, Dk]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(gk.shape)}"
        )
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, T, H, Dv] matching q's [B, T, H]; got {tuple(v.shape)}")


def _check_state(state: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> None:
    expected = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    if tuple(state.shape) != expected:
        raise ValueError(f"state must be [B, H, Dk, Dv] = {expected}; got {tuple(state.shape)}")


def _step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, state: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token in compute dtype. q, k, gk: (B, H, Dk); v: (B, H, Dv); state: (B, H, Dk, Dv)."""
    state = gk.exp().unsqueeze(-1) * state + k.unsqueeze(-1) * v.unsqueeze(-2)
    out = scale * torch.einsum("bhk,bhkv->bhv", q, state)
    return out, state


def naive_recurrent_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The GLA recurrence as a per-token loop (the oracle; slow).

    q, k, gk: [B, T, H, Dk]; v: [B, T, H, Dv]; initial_state: [B, H, Dk, Dv].
    Returns (o [B, T, H, Dv] in q's dtype, final_state [B, H, Dk, Dv] in compute dtype | None).
    """
    _check_inputs(q, k, v, gk)
    batch, length, heads, key_dim = q.shape
    dtype = q.dtype
    compute = _compute_dtype(q.dtype, v.dtype)
    scale = key_dim**-0.5 if scale is None else scale
    if initial_state is None:
        state = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=compute)
    else:
        _check_state(initial_state, q, v)
        state = initial_state.to(compute)
    q, k, v, gk = (x.to(compute) for x in (q, k, v, gk))
    output = torch.zeros_like(v)  # (B, T, H, Dv)
    for t in range(length):
        output[:, t], state = _step(q[:, t], k[:, t], v[:, t], gk[:, t], state, scale)
    return output.to(dtype), state if output_final_state else None


def recurrent_gla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    state: torch.Tensor | None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step (`T == 1`) from a cached state.

    q, k, gk: [B, 1, H, Dk]; v: [B, 1, H, Dv]; state: [B, H, Dk, Dv] or None (zeros).
    Returns (o [B, 1, H, Dv] in q's dtype, new_state [B, H, Dk, Dv] in compute dtype).
    """
    _check_inputs(q, k, v, gk)
    if q.shape[1] != 1:
        raise ValueError(f"recurrent_gla_step takes one token (T == 1); got T = {q.shape[1]}")
    batch, _, heads, key_dim = q.shape
    scale = key_dim**-0.5 if scale is None else scale
    if state is None:
        compute = _compute_dtype(q.dtype, v.dtype)
        state = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=compute)
    else:
        _check_state(state, q, v)
        compute = _compute_dtype(q.dtype, v.dtype, state.dtype)
    dtype = q.dtype
    q, k, v, gk = (x[:, 0].to(compute) for x in (q, k, v, gk))  # (B, H, D)
    out, state = _step(q, k, v, gk, state.to(compute), scale)
    return out.unsqueeze(1).to(dtype), state


def _intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Decayed causal scores inside each chunk, every exponent <= 0.

    q, k, b: (..., C, Dk) with C a power of two and b the inclusive cumulative log decay of the chunk.
    Returns (..., C, C): [i, j] = sum_d q_id k_jd exp(b_id - b_jd) for j <= i, 0 above the diagonal.
    """
    *lead, chunk, dim = q.shape
    scores = (q * k).sum(-1)[..., None, None]  # (..., C, 1, 1): blocks of one token, exp(b_i - b_i) = 1
    size = 1
    while size < chunk:
        pairs = chunk // (2 * size)
        q_h, k_h, b_h = (x.reshape(*lead, pairs, 2, size, dim) for x in (q, k, b))  # (..., P, 2, s, Dk)
        b_ref = b_h[..., 0, -1:, :]  # (..., P, 1, Dk): last row of each first half
        q_second = q_h[..., 1, :, :] * (b_h[..., 1, :, :] - b_ref).exp()  # rows after r: b_i <= b_r
        k_first = k_h[..., 0, :, :] * (b_ref - b_h[..., 0, :, :]).exp()  # rows up to r: b_r <= b_j
        lower = q_second @ k_first.transpose(-1, -2)  # (..., P, s, s)
        blocks = scores.reshape(*lead, pairs, 2, size, size)
        top = torch.cat([blocks[..., 0, :, :], torch.zeros_like(lower)], dim=-1)  # (..., P, s, 2s)
        bottom = torch.cat([lower, blocks[..., 1, :, :]], dim=-1)
        scores = torch.cat([top, bottom], dim=-2)  # (..., P, 2s, 2s)
        size *= 2
    return scores.squeeze(-3)


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA in chunked parallel form (training and prefill); equals `naive_recurrent_gla`.

    q, k, gk: [B, T, H, Dk]; v: [B, T, H, Dv]; initial_state: [B, H, Dk, Dv]; chunk_size a power of two.
    Returns (o [B, T, H, Dv] in q's dtype, final_state [B, H, Dk, Dv] in compute dtype | None).
    """
    _check_inputs(q, k, v, gk)
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two; got {chunk_size}")
    if initial_state is not None:
        _check_state(initial_state, q, v)
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    dtype = q.dtype
    compute = _compute_dtype(q.dtype, v.dtype)
    scale = key_dim**-0.5 if scale is None else scale
    pad = (-length) % chunk_size

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, D) -> (B, H, N, C, D)
        x = x.to(compute).transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))  # zero k, v and gk: padded tokens leave the state unchanged
        return x.reshape(batch, heads, -1, chunk_size, x.shape[-1])

    q, k, v, gk = (to_chunks(x) for x in (q, k, v, gk))
    q = q * scale
    num_chunks = q.shape[2]
    b = gk.cumsum(-2)  # (B, H, N, C, Dk), <= 0, non-increasing along C
    b_last = b[..., -1:, :]  # (B, H, N, 1, Dk)

    output = _intra_chunk_scores(q, k, b) @ v  # (B, H, N, C, Dv)
    chunk_updates = (k * (b_last - b).exp()).transpose(-1, -2) @ v  # (B, H, N, Dk, Dv)
    chunk_decay = b_last.exp().transpose(-1, -2)  # (B, H, N, Dk, 1)

    state = q.new_zeros(batch, heads, key_dim, value_dim) if initial_state is None else initial_state.to(compute)
    states_in = []  # the state entering each chunk
    for n in range(num_chunks):
        states_in.append(state)
        state = chunk_decay[:, :, n] * state + chunk_updates[:, :, n]
    output = output + (q * b.exp()) @ torch.stack(states_in, dim=2)  # inter-chunk: (B, H, N, C, Dv)

    output = output.reshape(batch, heads, -1, value_dim)[:, :, :length].transpose(1, 2)  # (B, T, H, Dv)
    return output.to(dtype), state if output_final_state else None
