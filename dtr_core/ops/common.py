"""What the recurrences share: the compute dtype, the state check and start, the segment loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

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


def check_state(state: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> None:
    """A state must be [B, H, Dk, Dv] for q [B, T, H, Dk] and v [B, T, H, Dv]."""
    expected = (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    if tuple(state.shape) != expected:
        raise ValueError(f"state must be [B, H, Dk, Dv] = {expected}; got {tuple(state.shape)}")


def start_state(q: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    """The state before the first token, in compute dtype: zeros [B, H, Dk, Dv], or `initial_state` checked."""
    compute = compute_dtype(q.dtype, v.dtype)
    if initial_state is None:
        return q.new_zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=compute)
    check_state(initial_state, q, v)
    return initial_state.to(compute)


def over_segments(
    segment_fn: Callable[[list[torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    state: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `segment_fn(pieces, state) -> (output, state)` over consecutive pieces of the `[B, T, ...]` inputs
    (`inputs[2]` is v), each `SEGMENT_LENGTH` tokens rounded down to whole chunks (at least one, so no
    padding mid-sequence), the state carried over; returns (o [B, T, H, Dv], state). One piece's output is
    returned as it is; several are copied into one buffer."""
    segment_length = max(1, SEGMENT_LENGTH // chunk_size) * chunk_size
    batch, length, heads, value_dim = inputs[2].shape
    if length == 0:
        return inputs[2].new_zeros(batch, 0, heads, value_dim), state
    if length <= segment_length:
        return segment_fn(list(inputs), state)
    output = inputs[2].new_empty(batch, length, heads, value_dim)
    for start in range(0, length, segment_length):
        piece = slice(start, start + segment_length)
        output[:, piece], state = segment_fn([x[:, piece] for x in inputs], state)
    return output, state
