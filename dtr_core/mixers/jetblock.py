"""JetBlock student (Jet-Nemotron, Gu et al., arXiv 2508.15884): gated delta rule + dynamic value convolution.

Same recurrence and gates as `gated_deltanet`, plus a causal convolution over the values whose
kernel is generated per token from the input (the "dynamic convolution" that made JetBlock the
best of the three modules in the DtR paper):
    w_t = W2 silu(W1 x_t) + b            (B, T, H, K), one kernel per head, shared across head dims
    v'_t = sum_i w_t[i] * v_{t-K+1+i}    causal, K = MixerConfig.conv_size
The kernel generator reduces the hidden size 8x, as in the paper. Initialisation: W2 = 0 and b = a
one-hot on the current token, so the convolution starts as the identity and the student starts as
its gated-DeltaNet twin. While decoding, the last K-1 values live in the cache's conv state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtr_core.mixers.state_cache import recurrent_layer
from dtr_core.mixers.base import MixerConfig
from dtr_core.mixers.gated_deltanet import GatedDeltaNetMixer

KERNEL_REDUCTION = 8  # kernel generator bottleneck: hidden_size / 8 (Jet-Nemotron)


class JetBlockMixer(GatedDeltaNetMixer):
    name = "jetblock"

    def __init__(self, config, layer_idx: int, mixer_config: MixerConfig | None = None):
        super().__init__(config, layer_idx, mixer_config)
        width = self.mixer_config.conv_size
        self.kernel_down = nn.Linear(self.hidden_size, self.hidden_size // KERNEL_REDUCTION, bias=False)
        self.kernel_up = nn.Linear(self.hidden_size // KERNEL_REDUCTION, self.num_heads * width, bias=True)
        nn.init.zeros_(self.kernel_up.weight)
        with torch.no_grad():
            identity = torch.zeros(self.num_heads, width)
            identity[:, -1] = 1.0  # tap on the current token
            self.kernel_up.bias.copy_(identity.flatten())

    def values(self, hidden_states: torch.Tensor, v: torch.Tensor, cache) -> torch.Tensor:
        """Dynamic causal convolution of v: (B, T, H, D) -> (B, T, H, D)."""
        batch, length, heads, dim = v.shape
        width = self.mixer_config.conv_size
        kernel = self.kernel_up(F.silu(self.kernel_down(hidden_states))).view(batch, length, heads, width)
        past = v.new_zeros(batch, width - 1, heads, dim)
        if cache is not None and width > 1:
            layer = recurrent_layer(cache, self.layer_idx)
            had_past = layer.has_previous_state[0]
            channels_first = v.reshape(batch, length, heads * dim).transpose(1, 2)  # (B, H*D, T)
            window = layer.update_conv_state(channels_first, conv_kernel_size=width - 1)
            if had_past:
                past = window[..., : width - 1].transpose(1, 2).reshape(batch, width - 1, heads, dim)
        padded = torch.cat([past, v], dim=1)  # (B, K-1+T, H, D)
        windows = padded.unfold(1, width, 1)  # (B, T, H, D, K)
        return torch.einsum("bthdk,bthk->bthd", windows, kernel)

    def state_bytes(self, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        conv = batch_size * self.num_heads * self.head_dim * (self.mixer_config.conv_size - 1) * element
        return super().state_bytes(batch_size, dtype) + conv
