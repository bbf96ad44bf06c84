"""What the recurrences share: the compute dtype, the state check and start, the segment loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


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
    segment_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    state: torch.Tensor,
    segment_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `segment_fn(pieces, state) -> (output, state)` over consecutive `segment_length`-token pieces of
    the `[B, T, ...]` inputs (`inputs[2]` is v), the state carried over; returns (o [B, T, H, Dv], state)."""
    length = inputs[0].shape[1]
    outputs = []
    for start in range(0, length, segment_length):
        output, state = segment_fn([x[:, start : start + segment_length] for x in inputs], state)
        outputs.append(output)
    if not outputs:  # T == 0
        batch, _, heads, value_dim = inputs[2].shape
        return inputs[2].new_zeros(batch, 0, heads, value_dim), state
    return (torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]), state
