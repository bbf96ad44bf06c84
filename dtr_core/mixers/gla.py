"""Gated Linear Attention student (Yang, Wang, Shen, Panda, Kim, ICML 2024, arXiv 2312.06635).

S_t = diag(a_t) S_{t-1} + k_t^T v_t,  o_t = q_t S_t,  with a data-dependent decay per key dimension of each
key/value head, log a_t = logsigmoid(W2 W1 x_t + b) / 16 (low-rank gate projection and logit normaliser as
in flash-linear-attention's `GatedLinearAttention` layer; W1 is rows "gk_down" of the fused input
projection). Initialisation: W2 = 0 and b = 4.1, so every key dimension starts with decay
exp(logsigmoid(4.1) / 16) ~ 0.999, i.e. near "no decay".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtr_core.mixers.base import LinearMixer, MixerConfig
from dtr_core.ops import dispatch
from dtr_core.ops.gla import naive_recurrent_gla, recurrent_gla_step

GATE_RANK = 16  # low-rank gate projection, as fla's GLA layer
GATE_LOGIT_NORMALIZER = 16  # divides logsigmoid so decays stay close to 1 (fla default)
GATE_BIAS_INIT = 4.1  # exp(logsigmoid(4.1) / 16) ~ 0.999: start near "no decay"


class GLAMixer(LinearMixer):
    name = "gla"

    def __init__(self, config, layer_idx: int, mixer_config: MixerConfig | None = None):
        super().__init__(config, layer_idx, mixer_config)
        self.gk_up = nn.Linear(GATE_RANK, self.num_kv_heads * self.head_dim, bias=True)
        nn.init.zeros_(self.gk_up.weight)
        nn.init.constant_(self.gk_up.bias, GATE_BIAS_INIT)

    def mixer_input_widths(self) -> dict[str, int]:
        return {"gk_down": GATE_RANK}  # the gate's low-rank down projection W1

    def log_decay(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T, H_kv, D) log decay, <= 0."""
        batch, length, _ = inputs["gk_down"].shape
        logits = self.gk_up(inputs["gk_down"])
        return (F.logsigmoid(logits) / GATE_LOGIT_NORMALIZER).view(batch, length, self.num_kv_heads, self.head_dim)

    def mix(self, q, k, v, inputs, state, layer_cache=None, real=None):
        gk = self.log_decay(inputs)
        if real is not None:  # no decay on pads
            gk = gk * real.view(*real.shape, 1, 1).to(gk.dtype)
        if self.impl == "naive":
            return naive_recurrent_gla(q, k, v, gk, initial_state=state, output_final_state=True)
        if q.shape[1] == 1 and state is not None:
            return recurrent_gla_step(q, k, v, gk, state)
        return dispatch.gla(
            q, k, v, gk,
            initial_state=state,
            output_final_state=True,
            chunk_size=self.mixer_config.chunk_size,
            backend=self.mixer_config.backend,
        )
