"""JetBlock student (Jet-Nemotron, Gu et al., arXiv 2508.15884): gated delta rule + dynamic value convolution.

Same recurrence and gates as `gated_deltanet`, plus a causal convolution over the values whose
kernel is generated per token from the input (the "dynamic convolution" that made JetBlock the
best of the three modules in the DtR paper):
    w_t = W2 silu(W1 x_t) + b            (B, T, H_kv, K): one kernel per key/value head, shared across head dims;
                                         (B, T, H_kv, D, K) with `MixerConfig.value_kernel="channel"`
    v'_t = sum_i w_t[i] * v_{t-K+1+i}    causal, K = MixerConfig.conv_size
The kernel generator reduces the hidden size 8x, as in the paper; W1 is rows "kernel_down" of the fused
input projection. Initialisation: W2 = 0 and b = a one-hot on the current token, so the convolution starts
as the identity and the student starts as its gated-DeltaNet twin. While decoding, the last K-1 values live
in the cache's conv state `VALUE_CONV_STATE`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dtr_core.mixers.base import MixerConfig
from dtr_core.mixers.gated_deltanet import GatedDeltaNetMixer
from dtr_core.mixers.state_cache import VALUE_CONV_STATE, conv_window

KERNEL_REDUCTION = 8  # kernel generator bottleneck: hidden_size / 8 (Jet-Nemotron)


class JetBlockMixer(GatedDeltaNetMixer):
    name = "jetblock"

    def __init__(self, config, layer_idx: int, mixer_config: MixerConfig | None = None):
        super().__init__(config, layer_idx, mixer_config)
        width = self.mixer_config.conv_size
        self.kernels_per_head = self.head_dim if self.mixer_config.value_kernel == "channel" else 1
        kernels = self.num_kv_heads * self.kernels_per_head
        self.kernel_up = nn.Linear(self.hidden_size // KERNEL_REDUCTION, kernels * width, bias=True)
        nn.init.zeros_(self.kernel_up.weight)
        with torch.no_grad():
            identity = torch.zeros(kernels, width)
            identity[:, -1] = 1.0  # tap on the current token
            self.kernel_up.bias.copy_(identity.flatten())

    def mixer_input_widths(self) -> dict[str, int]:
        return {**super().mixer_input_widths(), "kernel_down": self.hidden_size // KERNEL_REDUCTION}

    def values(self, v: torch.Tensor, inputs: dict[str, torch.Tensor], layer_cache) -> torch.Tensor:
        """Dynamic causal convolution of v: (B, T, H_kv, D) -> (B, T, H_kv, D)."""
        batch, length, heads, dim = v.shape
        width = self.mixer_config.conv_size
        kernel = self.kernel_up(F.silu(inputs["kernel_down"])).view(batch, length, heads, self.kernels_per_head, width)
        channels_first = v.reshape(batch, length, heads * dim).transpose(1, 2)  # (B, H_kv*D, T)
        padded = conv_window(layer_cache, channels_first, VALUE_CONV_STATE, width)  # (B, H_kv*D, K-1+T)
        windows = padded.unfold(-1, width, 1).view(batch, heads, dim, length, width)  # (B, H_kv, D, T, K)
        return (windows.permute(0, 3, 1, 2, 4) * kernel).sum(-1)  # (B, T, H_kv, D)

    def state_bytes(self, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        conv = batch_size * self.num_kv_heads * self.head_dim * (self.mixer_config.conv_size - 1) * element
        return super().state_bytes(batch_size, dtype) + conv
