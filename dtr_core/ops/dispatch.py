"""Backend choice for the chunked ops: flash-linear-attention's Triton kernels on CUDA, plain PyTorch else.

`select_backend(device, requested)` returns `"fla"` only for a CUDA device with flash-linear-attention
importable; fla is imported lazily and only when the device is CUDA, so CPU runs never import triton or
fla. The front doors `gla(...)` and `gated_delta_rule(...)` take the same arguments as `chunk_gla` /
`chunk_gated_delta_rule` plus `backend`, and return `(o [B, T, H, Dv], final_state [B, H, Dk, Dv] | None)`.

fla 0.6.0 signatures used (`[B, T, H, D]` layout, log-space gates, state `[B, H, Dk, Dv]`):
- `fla.ops.gla.chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, ...)`;
  `g` is the per-key-dim log decay (our `gk`); `initial_state` must be float32.
- `fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
  output_final_state=False, use_qk_l2norm_in_kernel=False, ...)`; `g` the scalar log decay per head, `beta`
  already in (0, 1) (we leave `use_beta_sigmoid_in_kernel` off); q/k are normalised by our mixers, so
  `use_qk_l2norm_in_kernel=False`.
fla picks its own chunk size (64); `chunk_size` applies to the torch backend only.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch

from dtr_core.ops.common import DEFAULT_CHUNK_SIZE
from dtr_core.ops.gated_delta_rule import chunk_gated_delta_rule
from dtr_core.ops.gla import chunk_gla

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "fla", "torch")


@functools.cache
def _fla_importable() -> bool:
    """Whether flash-linear-attention's ops import. Call only for CUDA devices (it imports triton)."""
    try:
        importlib.import_module("fla.ops.gla")
        importlib.import_module("fla.ops.gated_delta_rule")
    except Exception as error:  # ImportError, or triton failing to find a driver
        logger.info("flash-linear-attention not usable (%s); using the torch backend", error)
        return False
    return True


def select_backend(device: torch.device | str, requested: str = "auto") -> str:
    """Resolve `requested` ("auto" | "fla" | "torch") to "fla" or "torch" for tensors on `device`.

    "auto" gives "fla" only on CUDA with flash-linear-attention importable, else "torch". "fla" on a
    non-CUDA device, or without fla installed, raises `ValueError`.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of: {', '.join(BACKENDS)}")
    if requested == "torch":
        return "torch"
    device = torch.device(device)
    if device.type != "cuda":
        if requested == "fla":
            raise ValueError(
                f"backend 'fla' (flash-linear-attention Triton kernels) needs a CUDA device; got "
                f"'{device.type}'. Use backend 'auto' or 'torch'."
            )
        return "torch"
    if _fla_importable():
        return "fla"
    if requested == "fla":
        raise ValueError(
            "backend 'fla' requested but flash-linear-attention is not importable; install it on the GPU "
            "machine (`pip install flash-linear-attention==0.6.0`) or use backend 'auto' or 'torch'."
        )
    return "torch"


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked GLA on the selected backend. Shapes as `dtr_core.ops.gla.chunk_gla`."""
    if select_backend(q.device, backend) == "torch":
        return chunk_gla(q, k, v, gk, scale, initial_state, output_final_state, chunk_size=chunk_size)
    from fla.ops.gla import chunk_gla as fla_chunk_gla

    output, final_state = fla_chunk_gla(
        q,
        k,
        v,
        g=gk,
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
    )
    return output.to(q.dtype), final_state


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated delta rule on the selected backend. Shapes as `chunk_gated_delta_rule`."""
    if select_backend(q.device, backend) == "torch":
        return chunk_gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, chunk_size)
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk_gated_delta_rule

    output, final_state = fla_chunk_gated_delta_rule(
        q,
        k,
        v,
        g=g,
        beta=beta,
        scale=scale,
        initial_state=None if initial_state is None else initial_state.float(),
        output_final_state=output_final_state,
        use_qk_l2norm_in_kernel=False,
    )
    return output.to(q.dtype), final_state
