"""What the recurrences share: the head grouping, the compute dtype, the state check and start, the outer
form of each of the three ways to run a recurrence (token loop, one decoding step, chunked in segments) and
the chunk layout.

Grouped heads (GQA): q has `H` heads, k, v, the gates and the state have `H_kv` heads, `H` a multiple of
`H_kv`; query head `h` reads key/value head `h // (H / H_kv)` (the order of HF's `repeat_kv`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

# Tokens per chunk of the chunked forms on the PyTorch backend, and tokens per segment: sequences longer than
# a segment run segment by segment with the state carried over (the same result; the working set stays in
# cache). Measured on 2 CPU cores at T = 32K, both ops, interleaved: chunk 32 beats 64 by 10-25% for the
# gated delta rule (its triangular solve and intra-chunk products grow with C) and ties or wins for GLA;
# 4 x 256-token training steps are faster too. Segments of 256 tied or beat 512, 1024 was slower.
DEFAULT_CHUNK_SIZE = 32
SEGMENT_LENGTH = 256


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs; float64 stays float64."""
    result = torch.float32
    for dtype in dtypes:
        result = torch.promote_types(result, dtype)
    return result


def check_heads(q: torch.Tensor, k: torch.Tensor) -> int:
    """The group size `H / H_kv` of q [B, T, H, Dk] and k [B, T, H_kv, Dk]; ValueError unless they fit."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q must be [B, T, H, Dk] and k [B, T, H_kv, Dk]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"q's {q.shape[2]} heads must be a multiple of k's {k.shape[2]} heads")
    return q.shape[2] // k.shape[2]


def check_state(state: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """A state must be [B, H_kv, Dk, Dv] for k [B, T, H_kv, Dk] and v [B, T, H_kv, Dv]."""
    expected = (k.shape[0], k.shape[2], k.shape[3], v.shape[3])
    if tuple(state.shape) != expected:
        raise ValueError(f"state must be [B, H_kv, Dk, Dv] = {expected}; got {tuple(state.shape)}")


def start_state(k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    """The state before the first token, in compute dtype: zeros [B, H_kv, Dk, Dv], or `initial_state` checked."""
    compute = compute_dtype(k.dtype, v.dtype)
    if initial_state is None:
        return k.new_zeros(k.shape[0], k.shape[2], k.shape[3], v.shape[3], dtype=compute)
    check_state(initial_state, k, v)
    return initial_state.to(compute)


def over_segments(
    segment_fn: Callable[[list[torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    state: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `segment_fn(pieces, state) -> (output, state)` over consecutive pieces of the `[B, T, ...]` inputs
    (`inputs[0]` is q, `inputs[2]` is v), each `SEGMENT_LENGTH` tokens rounded down to whole chunks (at least
    one, so no padding mid-sequence), the state carried over; returns (o [B, T, H, Dv], state). One piece's
    output is returned as it is; several are copied into one buffer."""
    segment_length = max(1, SEGMENT_LENGTH // chunk_size) * chunk_size
    batch, length, heads, _ = inputs[0].shape
    value_dim = inputs[2].shape[-1]
    if length == 0:
        return inputs[2].new_zeros(batch, 0, heads, value_dim), state
    if length <= segment_length:
        return segment_fn(list(inputs), state)
    output = inputs[2].new_empty(batch, length, heads, value_dim)
    for start in range(0, length, segment_length):
        piece = slice(start, start + segment_length)
        output[:, piece], state = segment_fn([x[:, piece] for x in inputs], state)
    return output, state


def run_token_loop(
    step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: Sequence[torch.Tensor],
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The naive forms: `step(q, k, v, *gates, state, scale) -> (o, state)` token by token, in compute dtype.

    q: [B, T, H, Dk] (checked); k: [B, T, H_kv, Dk]; v: [B, T, H_kv, Dv]; gates: [B, T, H_kv, ...] each.
    `step` gets q as (B, H_kv, G, Dk), the rest without the T axis. Returns (o [B, T, H, Dv] in q's dtype,
    final_state [B, H_kv, Dk, Dv] in compute dtype | None).
    """
    dtype = q.dtype
    batch, length, heads, key_dim = q.shape
    kv_heads = k.shape[2]
    scale = key_dim**-0.5 if scale is None else scale
    state = start_state(k, v, initial_state)
    q, k, v, *gates = (x.to(state.dtype) for x in (q, k, v, *gates))
    q = q.view(batch, length, kv_heads, heads // kv_heads, key_dim)  # (B, T, H_kv, G, Dk)
    output = v.new_zeros(batch, length, kv_heads, heads // kv_heads, v.shape[-1])  # (B, T, H_kv, G, Dv)
    for t in range(length):
        output[:, t], state = step(q[:, t], k[:, t], v[:, t], *(x[:, t] for x in gates), state, scale)
    return output.flatten(2, 3).to(dtype), state if output_final_state else None


def run_one_step(
    step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: Sequence[torch.Tensor],
    state: torch.Tensor | None,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoding step: `step(q, k, v, *gates, state, scale) -> (o, state)` on the only token, in the
    compute dtype of q, v and the state.

    q: [B, 1, H, Dk] (heads checked); k: [B, 1, H_kv, Dk]; v: [B, 1, H_kv, Dv]; gates: [B, 1, H_kv, ...] each;
    state: [B, H_kv, Dk, Dv] or None (zeros). Returns (o [B, 1, H, Dv] in q's dtype, new_state [B, H_kv, Dk, Dv]
    in compute dtype).
    """
    if q.shape[1] != 1:
        raise ValueError(f"a decoding step takes one token (T == 1); got T = {q.shape[1]}")
    batch, _, heads, key_dim = q.shape
    kv_heads = k.shape[2]
    scale = key_dim**-0.5 if scale is None else scale
    if state is None:
        state = start_state(k, v, None)
    else:
        check_state(state, k, v)
    compute = compute_dtype(q.dtype, v.dtype, state.dtype)
    dtype = q.dtype
    q, k, v, *gates = (x[:, 0].to(compute) for x in (q, k, v, *gates))  # (B, H or H_kv, ...)
    out, state = step(q.view(batch, kv_heads, -1, key_dim), k, v, *gates, state.to(compute), scale)
    return out.view(batch, 1, heads, -1).to(dtype), state


def run_chunked(
    segment: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: Sequence[torch.Tensor],
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunked forms: `segment(q, k, v, *gates, scale, state, chunk_size) -> (o, state)` over the segments
    of `over_segments`, in compute dtype.

    Shapes as `run_token_loop` (inputs checked). Returns (o [B, T, H, Dv] in q's dtype, final_state
    [B, H_kv, Dk, Dv] in compute dtype | None).
    """
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = start_state(k, v, initial_state)
    inputs = [x.to(state.dtype) for x in (q, k, v, *gates)]
    output, state = over_segments(
        lambda pieces, state: segment(*pieces, scale, state, chunk_size), inputs, state, chunk_size
    )
    return output.to(dtype), state if output_final_state else None


def to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """(B, T, H_kv, ...) -> (B*H_kv*N, C, ...): each key/value head's tokens in N chunks of `chunk`, the last
    padded with zeros (zero k, v and gates leave the state unchanged)."""
    pad = (-x.shape[1]) % chunk
    x = x.transpose(1, 2)  # (B, H_kv, T, ...)
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(-1, chunk, *x.shape[3:])


def from_chunks(output: torch.Tensor, batch: int, length: int, heads: int, kv_heads: int) -> torch.Tensor:
    """(B*H_kv*N, C*G, Dv), the G query heads of a key/value head side by side per token -> (B, T, H, Dv),
    the padding dropped (a view when G == 1)."""
    value_dim = output.shape[-1]
    output = output.view(batch, kv_heads, -1, heads // kv_heads, value_dim)[:, :, :length]  # (B, H_kv, T, G, Dv)
    return output.transpose(1, 2).reshape(batch, length, heads, value_dim)
