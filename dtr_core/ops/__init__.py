"""Linear-attention kernels as pure functions (plain PyTorch; flash-linear-attention on CUDA).

Tensor layout, everywhere in this package: `[B, T, H, D]` (batch, time, heads, head dim), as in
flash-linear-attention (`fla.ops`). Hugging Face attention is `[B, H, T, D]`; the mixers convert once.

Grouped heads (GQA): q has `H` heads; k, v, the gates and the state have `H_kv` heads, `H` a multiple of
`H_kv`, and query head `h` reads key/value head `h // (H / H_kv)` (HF's `repeat_kv` order). Every op returns
`(output [B, T, H, Dv], final_state [B, H_kv, Dk, Dv] | None)`. Gates are in log space (`<= 0`), `scale`
defaults to `Dk ** -0.5`, and an optional `initial_state [B, H_kv, Dk, Dv]` continues a sequence. Math runs
in float32 (float64 inputs in float64); outputs are cast back to the input dtype, states are returned in the
compute dtype.

Each recurrence comes in three forms that tests hold equal (outputs, gradients, final state):
- `naive_recurrent_*`: a per-token Python loop, the readable oracle;
- `chunk_*`: the chunked parallel form for training and prefill (memory linear in `T`);
- `recurrent_*_step`: one token (`T == 1`) for decoding from a cached state.

Modules:
- `gla.py`: gated linear attention (Yang et al. 2024), per-key-dim decay `gk [B, T, H, Dk]`.
- `gated_delta_rule.py`: Gated DeltaNet (Yang et al. 2025), scalar decay `g` and write strength `beta`.
- `common.py`: what both recurrences share: the default chunk and segment lengths, the head grouping check,
  the compute dtype, the state check and start, the outer part of each form (token loop, decoding step,
  chunked in segments) and the chunk layout.
- `dispatch.py`: `select_backend` and the `dispatch.gla` / `dispatch.gated_delta_rule` front doors (fla on
  CUDA, torch elsewhere). CPU code paths never import triton or fla. The front doors are not re-exported
  here: their names would shadow the `gla` / `gated_delta_rule` submodules.
"""

from dtr_core.ops.dispatch import select_backend
from dtr_core.ops.gated_delta_rule import (
    chunk_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
    recurrent_gated_delta_rule_step,
)
from dtr_core.ops.gla import chunk_gla, naive_recurrent_gla, recurrent_gla_step

__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gla",
    "naive_recurrent_gated_delta_rule",
    "naive_recurrent_gla",
    "recurrent_gated_delta_rule_step",
    "recurrent_gla_step",
    "select_backend",
]
