"""Gated linear attention (GLA): recurrent oracle, chunked parallel form and one-token step.

Follows Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient Training" (ICML 2024)
and flash-linear-attention's `fla/ops/gla/{naive,chunk}.py`. Layout `[B, T, H, D]`.

Recurrence, per batch and key/value head (state `S` is `[Dk, Dv]`, `gk_t <= 0` is a log decay per key dim):

    S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t          for each of the H / H_kv query heads that share this key/value head

q has `H` heads; k, v, gk and the state have `H_kv` (grouped heads, `dtr_core/ops/common.py`), so the state
update costs `H_kv`, not `H`, per token; only the reads `q S` and the intra-chunk scores are per query head.

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
Inside a chunk the query heads of a group sit next to each other (`[.., C, G, Dk]`), so every product with
k, v or the state is one batched product over the group's rows, k and the decays never copied per query head.
Memory is linear in `T`: scores `[.., T/C, C, G, C]`, per-chunk states `[.., T/C, Dk, Dv]`; sequences over
`ops.common.SEGMENT_LENGTH` tokens run segment by segment with the state carried over.
"""

from __future__ import annotations

import torch

from dtr_core.ops.common import (
    DEFAULT_CHUNK_SIZE, check_heads, from_chunks, run_chunked, run_one_step, run_token_loop, to_chunks
)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor) -> None:
    """ValueError unless the shapes fit: q [B, T, H, Dk]; k, gk [B, T, H_kv, Dk]; v [B, T, H_kv, Dv]."""
    check_heads(q, k)
    if gk.shape != k.shape:
        raise ValueError(f"k and gk must have the same shape [B, T, H_kv, Dk]; got {tuple(k.shape)}, {tuple(gk.shape)}")
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, T, H_kv, Dv] matching k's [B, T, H_kv]; got {tuple(v.shape)}")


def _step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: torch.Tensor, state: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token in compute dtype. q: (B, H_kv, G, Dk); k, gk: (B, H_kv, Dk); v: (B, H_kv, Dv);
    state: (B, H_kv, Dk, Dv). Returns (o (B, H_kv, G, Dv), state)."""
    state = torch.addcmul(k.unsqueeze(-1) * v.unsqueeze(-2), gk.exp().unsqueeze(-1), state)
    return torch.matmul(q * scale, state), state


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

    q: [B, T, H, Dk]; k, gk: [B, T, H_kv, Dk]; v: [B, T, H_kv, Dv]; initial_state: [B, H_kv, Dk, Dv].
    Returns (o [B, T, H, Dv] in q's dtype, final_state [B, H_kv, Dk, Dv] in compute dtype | None).
    """
    _check_inputs(q, k, v, gk)
    return run_token_loop(_step, q, k, v, [gk], scale, initial_state, output_final_state)


def recurrent_gla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    state: torch.Tensor | None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step (`T == 1`) from a cached state.

    q: [B, 1, H, Dk]; k, gk: [B, 1, H_kv, Dk]; v: [B, 1, H_kv, Dv]; state: [B, H_kv, Dk, Dv] or None (zeros).
    Returns (o [B, 1, H, Dv] in q's dtype, new_state [B, H_kv, Dk, Dv] in compute dtype).
    """
    _check_inputs(q, k, v, gk)
    return run_one_step(_step, q, k, v, [gk], state, scale)


def _chunk_scores_and_decays(
    q: torch.Tensor, k: torch.Tensor, gk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intra-chunk decayed scores plus the decayed q/k the inter-chunk terms need; every exponent <= 0.

    q: contiguous (L, C, G, Dk), the G query heads of one key head side by side; k, gk: contiguous (L, C, Dk);
    C a power of two. With b the inclusive cumulative sum of gk: returns scores (L, C, G, C) with
    [l, i, g, j] = sum_d q_igd k_jd exp(b_id - b_jd) for j <= i (0 above), q * exp(b) (L, C, G, Dk),
    k * exp(b_last - b) (L, C, Dk), and exp(b_last) (L, 1, Dk).

    Level s (s = 1, 2, 4, ..): the span of each aligned 2s-block splits into sibling s-blocks; the block of
    rows in the second sibling and columns in the first is (q_i exp(b_i - b_r)) @ (k_j exp(b_r - b_j))^T
    with r the last row of the first sibling. `q_ref` holds q_i exp(b_i - b_r) and `k_ref` holds
    k_j exp(b_r' - b_j) for the current level's reference points; moving up a level multiplies the second
    sibling of `q_ref` by the first sibling's total decay, and the first sibling of `k_ref` by the second's.
    """
    lead, chunk, groups, dim = q.shape
    block_decay = gk.exp()  # (L, C/s, Dk): total decay of each aligned s-block, here s = 1
    q_ref = q * block_decay.unsqueeze(-2)  # s = 1: q_i exp(b_i - b_{i-1})
    k_ref = k  # s = 1: k_j exp(b_j - b_j)
    scores = q.new_zeros(lead, chunk, groups, chunk)
    torch.diagonal(scores, dim1=1, dim2=3).copy_((q * k.unsqueeze(-2)).sum(-1).mT)  # j == i: exp(0) = 1
    size = 1
    while size < chunk:
        pairs = chunk // (2 * size)
        q_h = q_ref.view(lead, pairs, 2, size, groups, dim)  # (L, P, 2 siblings, s, G, Dk)
        k_h = k_ref.view(lead, pairs, 2, size, dim)
        # rows (token, group) of the second sibling against the first sibling's tokens: (L P, s G, s), views in
        lower = torch.bmm(q_h[:, :, 1].flatten(0, 1).flatten(1, 2), k_h[:, :, 0].flatten(0, 1).mT)
        target = scores.view(lead, pairs, 2, size, groups, pairs, 2, size)[:, :, 1, :, :, :, 0, :]  # (L,P,s,G,P,s)
        torch.diagonal(target, dim1=1, dim2=4).copy_(lower.view(lead, pairs, size, groups, size).movedim(1, -1))
        decay = block_decay.view(lead, pairs, 2, 1, dim)
        q_ref = torch.cat([q_h[:, :, :1], q_h[:, :, 1:] * decay[:, :, :1].unsqueeze(-2)], dim=2)
        k_ref = torch.cat([k_h[:, :, :1] * decay[:, :, 1:], k_h[:, :, 1:]], dim=2)
        q_ref, k_ref = q_ref.view(lead, chunk, groups, dim), k_ref.view(lead, chunk, dim)
        block_decay = decay[:, :, 0, 0] * decay[:, :, 1, 0]  # (L, P, Dk): decay of each 2s-block
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
    """One segment in compute dtype: q (B, T, H, Dk), k/v/gk (B, T, H_kv, D), state (B, H_kv, Dk, Dv)
    -> (o (B, T, H, Dv), state)."""
    batch, length, heads, key_dim = q.shape
    kv_heads, value_dim = k.shape[2], v.shape[-1]
    groups = heads // kv_heads
    chunk = min(chunk, 1 << (length - 1).bit_length())  # short inputs: no padding to a full chunk
    chunks = (length + chunk - 1) // chunk  # N, the last one padded
    q = to_chunks(q.view(batch, length, kv_heads, groups, key_dim), chunk).contiguous()  # (L, C, G, Dk), L = B*H_kv*N
    k, v, gk = (to_chunks(x, chunk).contiguous() for x in (k, v, gk))  # (L, C, D)
    scores, q_decayed, k_decayed, chunk_decay = _chunk_scores_and_decays(q, k, gk)
    intra = torch.bmm(scores.view(-1, chunk * groups, chunk), v)  # (L, C*G, Dv)
    chunk_updates = torch.bmm(k_decayed.mT, v).view(batch, kv_heads, chunks, key_dim, value_dim)
    chunk_decay = chunk_decay.mT.view(batch, kv_heads, chunks, key_dim, 1)
    states_in = []  # the state entering each chunk
    for n in range(chunks):
        states_in.append(state)
        state = torch.addcmul(chunk_updates[:, :, n], chunk_decay[:, :, n], state)
    states_in = torch.stack(states_in, dim=2)  # (B, H_kv, N, Dk, Dv)
    # o = scale * (intra + q exp(b) @ S_in), as one batched multiply-add over (B H_kv N)
    output = torch.baddbmm(
        intra, q_decayed.view(-1, chunk * groups, key_dim), states_in.flatten(0, 2), beta=scale, alpha=scale
    )
    return from_chunks(output, batch, length, heads, kv_heads), state


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

    q: [B, T, H, Dk]; k, gk: [B, T, H_kv, Dk]; v: [B, T, H_kv, Dv]; initial_state: [B, H_kv, Dk, Dv];
    chunk_size a power of two. Returns (o [B, T, H, Dv] in q's dtype, final_state [B, H_kv, Dk, Dv] in compute
    dtype | None). Sequences longer than `ops.common.SEGMENT_LENGTH` run segment by segment, the state carried
    over.
    """
    _check_inputs(q, k, v, gk)
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two; got {chunk_size}")
    return run_chunked(_chunk_gla_segment, q, k, v, [gk], scale, initial_state, output_final_state, chunk_size)
