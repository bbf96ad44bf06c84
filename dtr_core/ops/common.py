"""What the recurrences share: the compute dtype and the state-shape check."""

from __future__ import annotations

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
