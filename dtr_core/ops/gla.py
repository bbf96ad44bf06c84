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
is per key dim; we build it by recursive halving with reference points, the idea behind fla's secondary
chunking: for rows `i` in the second half and columns `j` in the first half of an aligned block, with `r`
the last row of the first half,

    exp(b_i - b_j) = exp(b_i - b_r) * exp(b_r - b_j),   both exponents <= 0,

so that block is `(q * exp(b - b_r)) @ (k * exp(b_r - b))^T`. Halving from the chunk down to single tokens
(score `q_i . k_i`) covers every pair `j <= i` exactly once with `log2(C)` batched matmuls. The decayed
q and k of one level are the previous level's times one block decay (a product of exps of sums of `gk`,
all `<= 1`), and the top level yields `q * exp(b)` and `k * exp(b_last - b)` for the inter-chunk terms.
Memory is linear in `T`: scores `[.., T/C, C, C]`, per-chunk states `[.., T/C, Dk, Dv]`; sequences over
`ops.common.SEGMENT_LENGTH` tokens run segment by segment with the state carried over.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtr_core.ops.common import DEFAULT_CHUNK_SIZE, check_state, compute_dtype, over_segments, start_state


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
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = start_state(q, v, initial_state)
    q, k, v, gk = (x.to(state.dtype) for x in (q, k, v, gk))
    output = torch.zeros_like(v)  # (B, T, H, Dv)
    for t in range(q.shape[1]):
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
        compute = compute_dtype(q.dtype, v.dtype)
        state = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=compute)
    else:
        check_state(state, q, v)
        compute = compute_dtype(q.dtype, v.dtype, state.dtype)
    dtype = q.dtype
    q, k, v, gk = (x[:, 0].to(compute) for x in (q, k, v, gk))  # (B, H, D)
    out, state = _step(q, k, v, gk, state.to(compute), scale)
    return out.unsqueeze(1).to(dtype), state


def _chunk_scores_and_decays(
    q: torch.Tensor, k: torch.Tensor, gk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intra-chunk decayed scores plus the decayed q/k the inter-chunk terms need; every exponent <= 0.

    q, k, gk: contiguous (..., C, Dk), C a power of two. With b the inclusive cumulative sum of gk:
    returns scores (..., C, C) with [i, j] = sum_d q_id k_jd exp(b_id - b_jd) for j <= i (0 above),
    q * exp(b), k * exp(b_last - b) (both (..., C, Dk)), and exp(b_last) (..., 1, Dk).

    Level s (s = 1, 2, 4, ..): the span of each aligned 2s-block splits into sibling s-blocks; the block of
    rows in the second sibling and columns in the first is (q_i exp(b_i - b_r)) @ (k_j exp(b_r - b_j))^T
    with r the last row of the first sibling. `q_ref` holds q_i exp(b_i - b_r) and `k_ref` holds
    k_j exp(b_r' - b_j) for the current level's reference points; moving up a level multiplies the second
    sibling of `q_ref` by the first sibling's total decay, and the first sibling of `k_ref` by the second's.
    """
    *lead, chunk, dim = q.shape
    block_decay = gk.exp()  # (..., C/s, Dk): total decay of each aligned s-block, here s = 1
    q_ref = q * block_decay  # s = 1: q_i exp(b_i - b_{i-1})
    k_ref = k  # s = 1: k_j exp(b_j - b_j)
    scores = q.new_zeros(*lead, chunk, chunk)
    torch.diagonal(scores, dim1=-2, dim2=-1).copy_((q * k).sum(-1))  # j == i: exp(0) = 1
    size = 1
    while size < chunk:
        pairs = chunk // (2 * size)
        q_h = q_ref.view(*lead, pairs, 2, size, dim)  # (..., P, 2 siblings, s, Dk)
        k_h = k_ref.view(*lead, pairs, 2, size, dim)
        lower = torch.bmm(q_h[..., 1, :, :].flatten(0, -3), k_h[..., 0, :, :].flatten(0, -3).mT)  # (.. P, s, s)
        target = scores.view(*lead, pairs, 2, size, pairs, 2, size)[..., :, 1, :, :, 0, :]  # (..., P, s, P, s)
        torch.diagonal(target, dim1=-4, dim2=-2).copy_(lower.view(*lead, pairs, size, size).movedim(-3, -1))
        decay = block_decay.view(*lead, pairs, 2, 1, dim)
        q_ref = torch.cat([q_h[..., :1, :, :], q_h[..., 1:, :, :] * decay[..., :1, :, :]], dim=-3)
        k_ref = torch.cat([k_h[..., :1, :, :] * decay[..., 1:, :, :], k_h[..., 1:, :, :]], dim=-3)
        q_ref, k_ref = q_ref.view(*lead, chunk, dim), k_ref.view(*lead, chunk, dim)
        block_decay = decay[..., 0, 0, :] * decay[..., 1, 0, :]  # (..., P, Dk): decay of each 2s-block
        size *= 2
    return scores, q_ref, k_ref, block_decay  # at s = C: q exp(b), k exp(b_last - b), exp(b_last)


def _chunk_gla_segment(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    scale: float,
    state: torch.Tensor,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment in compute dtype: inputs (B, T, H, D), state (B, H, Dk, Dv) -> (o (B, T, H, Dv), state)."""
    batch, length, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    chunk = min(chunk, 1 << (length - 1).bit_length())  # short inputs: no padding to a full chunk
    pad = (-length) % chunk

    def to_chunks(x: torch.Tensor) -> torch.Tensor:  # (B, T, H, D) -> contiguous (B, H, N, C, D)
        x = x.transpose(1, 2)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))  # zero k, v and gk: padded tokens leave the state unchanged
        return x.contiguous().view(batch, heads, -1, chunk, x.shape[-1])

    q, k, v, gk = (to_chunks(x) for x in (q, k, v, gk))
    scores, q_decayed, k_decayed, chunk_decay = _chunk_scores_and_decays(q, k, gk)
    intra = scores @ v  # (B, H, N, C, Dv)
    chunk_updates = torch.bmm(k_decayed.flatten(0, 2).mT, v.flatten(0, 2)).view(*q.shape[:3], key_dim, value_dim)
    chunk_decay = chunk_decay.transpose(-1, -2)  # (B, H, N, Dk, 1)
    states_in = []  # the state entering each chunk
    for n in range(q.shape[2]):
        states_in.append(state)
        state = torch.addcmul(chunk_updates[:, :, n], chunk_decay[:, :, n], state)
    states_in = torch.stack(states_in, dim=2)  # (B, H, N, Dk, Dv)
    # o = scale * (intra + q exp(b) @ S_in), as one batched multiply-add over (B H N)
    output = torch.baddbmm(
        intra.flatten(0, 2), q_decayed.flatten(0, 2), states_in.flatten(0, 2), beta=scale, alpha=scale
    )
    output = output.view(batch, heads, -1, value_dim)[:, :, :length].transpose(1, 2)  # (B, T, H, Dv), a view
    return output, state


def chunk_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA in chunked parallel form (training and prefill); equals `naive_recurrent_gla`.

    q, k, gk: [B, T, H, Dk]; v: [B, T, H, Dv]; initial_state: [B, H, Dk, Dv]; chunk_size a power of two.
    Returns (o [B, T, H, Dv] in q's dtype, final_state [B, H, Dk, Dv] in compute dtype | None).
    Sequences longer than `ops.common.SEGMENT_LENGTH` run segment by segment, the state carried over.
    """
    _check_inputs(q, k, v, gk)
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two; got {chunk_size}")
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = start_state(q, v, initial_state)
    inputs = [x.to(state.dtype) for x in (q, k, v, gk)]
    output, state = over_segments(
        lambda pieces, state: _chunk_gla_segment(*pieces, scale, state, chunk_size), inputs, state, chunk_size
    )
    return output.to(dtype), state if output_final_state else None
