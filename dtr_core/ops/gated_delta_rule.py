"""Gated delta rule (Gated DeltaNet): recurrent oracle, chunked parallel form and one-token step.

Follows Yang, Kautz and Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta Rule"
(ICLR 2025) and flash-linear-attention's `fla/ops/gated_delta_rule/naive.py`; the chunked form is the UT
transform of fla's chunked kernel. Layout `[B, T, H, D]`.

Recurrence, per batch and key/value head, in the paper's `[Dv, Dk]` orientation (`g_t <= 0` log decay, `beta_t`
write strength in (0, 1)):

    S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
    o_t = scale * S_t q_t          for each of the H / H_kv query heads that share this key/value head

q has `H` heads; k, v, g, beta and the state have `H_kv` (grouped heads, `dtr_core/ops/common.py`): the state
update and the chunk's UT transform cost `H_kv`, only the reads of the state and the intra-chunk scores `H`.
The state is stored transposed, `[B, H, Dk, Dv]` (as fla and transformers do), so one step reads

    S <- exp(g) S ;  S <- S + k (beta (v - S^T k))^T ;  o = scale * S^T q.

`q` and `k` are expected L2-normalised by the caller (the mixer); no op normalises them.
"""

from __future__ import annotations

import torch

from dtr_core.ops.common import (
    DEFAULT_CHUNK_SIZE, check_heads, from_chunks, run_chunked, run_one_step, run_token_loop, to_chunks
)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor) -> None:
    """ValueError unless the shapes fit: q [B, T, H, Dk]; k [B, T, H_kv, Dk]; v [B, T, H_kv, Dv]; g, beta
    [B, T, H_kv]."""
    check_heads(q, k)
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B, T, H_kv, Dv] matching k's [B, T, H_kv]; got {tuple(v.shape)}")
    if g.shape != k.shape[:3] or beta.shape != k.shape[:3]:
        raise ValueError(
            f"g and beta must be [B, T, H_kv] = {tuple(k.shape[:3])}; got {tuple(g.shape)}, {tuple(beta.shape)}"
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
    """One token in compute dtype. q: (B, H_kv, G, Dk); k: (B, H_kv, Dk); v: (B, H_kv, Dv); g, beta: (B, H_kv);
    state: (B, H_kv, Dk, Dv). Returns (o (B, H_kv, G, Dv), state)."""
    state = state * g.exp()[..., None, None]
    predicted = torch.matmul(k.unsqueeze(-2), state)  # what the decayed memory recalls for k: S^T k, (B, H_kv, 1, Dv)
    delta = beta[..., None, None] * (v.unsqueeze(-2) - predicted)  # (B, H_kv, 1, Dv)
    state = torch.addcmul(state, k.unsqueeze(-1), delta)
    return torch.matmul(q * scale, state), state


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

    q: [B, T, H, Dk]; k: [B, T, H_kv, Dk]; v: [B, T, H_kv, Dv]; g, beta: [B, T, H_kv];
    initial_state: [B, H_kv, Dk, Dv].
    Returns (o [B, T, H, Dv] in q's dtype, final_state [B, H_kv, Dk, Dv] in compute dtype | None).
    """
    _check_inputs(q, k, v, g, beta)
    return run_token_loop(_step, q, k, v, [g, beta], scale, initial_state, output_final_state)


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

    q: [B, 1, H, Dk]; k: [B, 1, H_kv, Dk]; v: [B, 1, H_kv, Dv]; g, beta: [B, 1, H_kv];
    state: [B, H_kv, Dk, Dv] or None (zeros).
    Returns (o [B, 1, H, Dv] in q's dtype, new_state [B, H_kv, Dk, Dv] in compute dtype).
    """
    _check_inputs(q, k, v, g, beta)
    return run_one_step(_step, q, k, v, [g, beta], state, scale)


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
    """One segment in compute dtype: q (B, T, H, Dk), the rest (B, T, H_kv, ...), state (B, H_kv, Dk, Dv)
    -> (o (B, T, H, Dv), state).

    Per chunk of C tokens, with b the inclusive cumulative sum of g inside the chunk, D[i, j] = exp(b_i - b_j)
    for j <= i (0 above), and A the strictly lower part of (beta k) k^T * D, the UT transform gives
    u = (I + A)^-1 (beta v) and w = (I + A)^-1 (beta exp(b) k). The chunk then reads and writes the state S
    entering it as
        v_new = u - w S ;  o = (q exp(b)) S + ((q k^T) * D) v_new ;  S' = exp(b_last) S + (k exp(b_last - b))^T v_new.
    Only the two state products run chunk by chunk; everything else is batched over the segment's chunks.
    The G query heads of a key/value head sit side by side in each chunk (q as (L, C, G, Dk)), so their reads
    are single products with the shared k, v_new and state.
    """
    batch, length, heads, key_dim = q.shape
    kv_heads, value_dim = k.shape[2], v.shape[-1]
    groups = heads // kv_heads
    chunk = min(chunk, length)
    chunks = (length + chunk - 1) // chunk  # N, the last one padded

    def per_chunk(x: torch.Tensor) -> torch.Tensor:  # (B*H_kv*N, ...) -> (B*H_kv, N, ...), a view
        return x.unflatten(0, (batch * kv_heads, chunks))

    # 3-D (L, rows, cols), L = B*H_kv*N, throughout: bmm reads transposed operands in place, 4-D matmul copies
    q = to_chunks(q.view(batch, length, kv_heads, groups, key_dim), chunk).contiguous()  # (L, C, G, Dk)
    k, v, g, beta = (to_chunks(x, chunk) for x in (k, v, g, beta))
    cumulative = g.cumsum(-1)  # (L, C)
    decay_from_start = cumulative.exp().unsqueeze(-1)  # exp(b), (L, C, 1)
    decay = (cumulative.unsqueeze(-1) - cumulative.unsqueeze(-2)).tril().exp().tril()  # D, with 0 above
    k_beta = k * beta.unsqueeze(-1)
    system = torch.bmm(k_beta, k.mT) * decay  # solve_triangular reads only its strictly lower part
    identity = torch.eye(chunk, dtype=q.dtype, device=q.device).expand_as(system)
    inverse = torch.linalg.solve_triangular(system, identity, upper=False, unitriangular=True)  # (I + A)^-1
    u = per_chunk(torch.bmm(inverse, v * beta.unsqueeze(-1)))
    w = per_chunk(torch.bmm(inverse, k_beta * decay_from_start))
    q = q * scale
    intra = (torch.bmm(q.view(-1, chunk * groups, key_dim), k.mT).view(-1, chunk, groups, chunk)
             * decay.unsqueeze(2)).view(-1, chunk * groups, chunk)  # (L, C*G, C)
    k_decayed_t = per_chunk((k * (cumulative[:, -1:] - cumulative).exp().unsqueeze(-1)).mT)  # (B*H_kv, N, Dk, C)
    chunk_decay = per_chunk(cumulative[:, -1].exp()[:, None, None])  # (B*H_kv, N, 1, 1)
    state = state.reshape(batch * kv_heads, key_dim, value_dim)
    states_in, new_values = [], []  # the state entering each chunk, and each chunk's v_new
    for n in range(chunks):
        states_in.append(state)
        new_value = torch.baddbmm(u[:, n], w[:, n], state, alpha=-1)
        state = torch.baddbmm(state * chunk_decay[:, n], k_decayed_t[:, n], new_value)
        new_values.append(new_value)
    new_values, states_in = (torch.stack(x, dim=1).flatten(0, 1) for x in (new_values, states_in))
    q_decayed = (q * decay_from_start.unsqueeze(-1)).view(-1, chunk * groups, key_dim)
    output = torch.baddbmm(torch.bmm(intra, new_values), q_decayed, states_in)  # (L, C*G, Dv)
    return from_chunks(output, batch, length, heads, kv_heads), state.view(batch, kv_heads, key_dim, value_dim)


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

    q: [B, T, H, Dk], k: [B, T, H_kv, Dk] (both L2-normalised); v: [B, T, H_kv, Dv]; g, beta: [B, T, H_kv];
    initial_state: [B, H_kv, Dk, Dv].
    Returns (o [B, T, H, Dv] in q's dtype, final_state [B, H_kv, Dk, Dv] in compute dtype | None).
    """
    _check_inputs(q, k, v, g, beta)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")
    return run_chunked(
        _chunk_gated_delta_rule_segment, q, k, v, [g, beta], scale, initial_state, output_final_state, chunk_size
    )
