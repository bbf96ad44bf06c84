"""Gated Linear Attention student (Yang, Wang, Shen, Panda, Kim, ICML 2024, arXiv 2312.06635).

S_t = diag(a_t) S_{t-1} + k_t^T v_t,  o_t = q_t S_t,  with a data-dependent decay per key dimension,
log a_t = logsigmoid(W2 W1 x_t + b) / 16 (low-rank gate projection and logit normaliser as in
flash-linear-attention's `GatedLinearAttention` layer). Initialisation: W2 = 0 and b = 4.1, so every
key dimension starts with decay exp(logsigmoid(4.1) / 16) ~ 0.999, i.e. near "no decay".
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
        self.gk_down = nn.Linear(self.hidden_size, GATE_RANK, bias=False)
        self.gk_up = nn.Linear(GATE_RANK, self.num_heads * self.head_dim, bias=True)
        nn.init.zeros_(self.gk_up.weight)
        nn.init.constant_(self.gk_up.bias, GATE_BIAS_INIT)

    def log_decay(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        logits = self.gk_up(self.gk_down(hidden_states))
        return (F.logsigmoid(logits) / GATE_LOGIT_NORMALIZER).view(batch, length, self.num_heads, self.head_dim)

    def mix(self, hidden_states, q, k, v, state, cache=None):
        gk = self.log_decay(hidden_states)  # (B, T, H, D), <= 0
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
