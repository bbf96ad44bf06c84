"""Backend choice for the chunked ops: flash-linear-attention's Triton kernels on CUDA, plain PyTorch else.

`select_backend(device, requested)` returns `"fla"` only for a CUDA device with flash-linear-attention
importable; fla is imported lazily and only when the device is CUDA, so CPU runs never import triton or
fla. The front doors `gla(...)` and `gated_delta_rule(...)` take the same arguments as `chunk_gla` /
`chunk_gated_delta_rule` plus `backend`, and return `(o [B, T, H, Dv], final_state [B, H_kv, Dk, Dv] | None)`.

fla 0.6.0 signatures used (`[B, T, H, D]` layout, log-space gates, state `[B, H, Dk, Dv]`):
- `fla.ops.gla.chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, ...)`;
  `g` is the per-key-dim log decay (our `gk`); `initial_state` must be float32.
- `fla.ops.gated_delta_rule.chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None,
  output_final_state=False, use_qk_l2norm_in_kernel=False, ...)`; `g` the scalar log decay per head, `beta`
  already in (0, 1) (we leave `use_beta_sigmoid_in_kernel` off); q/k are normalised by our mixers, so
  `use_qk_l2norm_in_kernel=False`.
fla picks its own chunk size (64); `chunk_size` applies to the torch backend only.

Grouped heads (q with `H` heads, k/v/gates/state with `H_kv`): fla 0.6.0's `chunk_gla` takes one head count
for q, k, v and g, and its `chunk_gated_delta_rule` shares q/k heads among more *value* heads, not query heads
among fewer key/value heads. So on the fla path k, v, the gates and the initial state are repeated to the `H`
query heads (`repeat_interleave`, HF's `repeat_kv` order: one copy of each, the cheapest correct form since
fla's kernels read only contiguous tensors), and the final state is read back from the first head of each group
(the group's copies are identical). The kernel then does the state work of `H` heads, as before grouping; the
torch forms and the decoding step keep it at `H_kv`.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable

import torch

from dtr_core.ops.common import DEFAULT_CHUNK_SIZE
from dtr_core.ops.gated_delta_rule import chunk_gated_delta_rule
from dtr_core.ops.gla import chunk_gla

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "fla", "torch")


def _repeat_kv(x: torch.Tensor | None, groups: int, dim: int) -> torch.Tensor | None:
    """`x` with each key/value head repeated `groups` times along `dim`, in HF's `repeat_kv` order."""
    return x if x is None or groups == 1 else x.repeat_interleave(groups, dim=dim)


def _first_of_groups(state: torch.Tensor | None, groups: int) -> torch.Tensor | None:
    """[B, H, Dk, Dv] -> [B, H_kv, Dk, Dv]: the state of the first query head of each group."""
    return state if state is None or groups == 1 else state[:, ::groups].contiguous()


def _call_fla_kernel(
    kernel: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: dict[str, torch.Tensor],
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    **options: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`kernel` (an fla chunked op) with k, v, the gates (passed by name) and the float32 initial state repeated
    to q's `H` heads; returns (o [B, T, H, Dv] in q's dtype, final_state [B, H_kv, Dk, Dv] | None)."""
    groups = q.shape[2] // k.shape[2]
    output, final_state = kernel(
        q,
        _repeat_kv(k, groups, 2),
        _repeat_kv(v, groups, 2),
        **{name: _repeat_kv(gate, groups, 2) for name, gate in gates.items()},
        scale=scale,
        initial_state=None if initial_state is None else _repeat_kv(initial_state.float(), groups, 1),
        output_final_state=output_final_state,
        **options,
    )
    return output.to(q.dtype), _first_of_groups(final_state, groups)


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

    return _call_fla_kernel(fla_chunk_gla, q, k, v, {"g": gk}, scale, initial_state, output_final_state)


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

    return _call_fla_kernel(
        fla_chunk_gated_delta_rule,
        q, k, v, {"g": g, "beta": beta}, scale, initial_state, output_final_state,
        use_qk_l2norm_in_kernel=False,
    )
