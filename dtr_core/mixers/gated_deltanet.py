"""Gated DeltaNet student (Yang, Kautz, Hatamizadeh, arXiv 2412.06464, ICLR 2025).

S_t = a_t S_{t-1} (I - b_t k_t k_t^T) + b_t v_t k_t^T,  o_t = S_t q_t,  q/k L2-normalised per head.
Decay a_t = exp(-exp(A_log) * softplus(W_a x_t + dt_bias)) and write strength b_t = sigmoid(W_b x_t), one
each per key/value head (the Mamba-2-style parametrisation of the paper and fla's `GatedDeltaNet`); W_a and
W_b are rows "a" and "b" of the fused input projection. Initialisation: W_a = 0, A_log = 0 and
dt_bias = softplus^-1(1e-3), so a_t starts at exp(-1e-3) ~ 0.999 (near "no decay"); W_b = 0, so b_t
starts at 0.5. The original's short convolutions on q/k/v and SiLU on q/k are options
(`MixerConfig.short_conv`, `qk_activation`), off by default: the student starts from the teacher's
projections, which were trained without them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtr_core.mixers.base import LinearMixer, MixerConfig, inverse_softplus
from dtr_core.ops import dispatch
from dtr_core.ops.gated_delta_rule import naive_recurrent_gated_delta_rule, recurrent_gated_delta_rule_step

INITIAL_DT = 1e-3  # softplus(dt_bias) at init: per-step decay exp(-1e-3) ~ 0.999


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


class GatedDeltaNetMixer(LinearMixer):
    name = "gated_deltanet"

    def __init__(self, config, layer_idx: int, mixer_config: MixerConfig | None = None):
        super().__init__(config, layer_idx, mixer_config)
        self.A_log = nn.Parameter(torch.zeros(self.num_kv_heads))
        self.dt_bias = nn.Parameter(torch.full((self.num_kv_heads,), inverse_softplus(INITIAL_DT)))
        with torch.no_grad():
            for name in ("a", "b"):
                self.in_proj.weight[self.input_rows(name)].zero_()

    def mixer_input_widths(self) -> dict[str, int]:
        return {"a": self.num_kv_heads, "b": self.num_kv_heads}  # decay and write-strength logits

    def qk_features(self, qk: torch.Tensor) -> torch.Tensor:
        return l2_normalize(qk)

    def gates(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log decay g (B, T, H_kv), write strength beta (B, T, H_kv))."""
        a, b = inputs["a"], inputs["b"]
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        beta = torch.sigmoid(b.float())
        return g.to(a.dtype), beta.to(b.dtype)

    def values(self, v: torch.Tensor, inputs: dict[str, torch.Tensor], layer_cache) -> torch.Tensor:
        return v

    def mix(self, q, k, v, inputs, state, layer_cache=None, real=None):
        v = self.values(v, inputs, layer_cache)
        g, beta = self.gates(inputs)
        if real is not None:  # no decay on pads (k = 0 there, so the delta rule writes nothing)
            g = g * real.unsqueeze(-1).to(g.dtype)
        if self.impl == "naive":
            return naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True)
        if q.shape[1] == 1 and state is not None:
            return recurrent_gated_delta_rule_step(q, k, v, g, beta, state)
        return dispatch.gated_delta_rule(
            q, k, v, g, beta,
            initial_state=state,
            output_final_state=True,
            chunk_size=self.mixer_config.chunk_size,
            backend=self.mixer_config.backend,
        )
