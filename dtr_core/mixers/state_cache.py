"""The hybrid cache: a KV cache for full-attention layers, a fixed-size state for linear layers.

Built on transformers' own `DynamicCache` and `LinearAttentionLayer` (the cache Qwen3-Next and other
hybrids use): a linear layer keeps its recurrent state (state 0), JetBlock its last `conv_size - 1`
values (conv state `VALUE_CONV_STATE`) and a student with the short convolution its last q/k/v inputs (conv
state `SHORT_CONV_STATE`), instead of a growing key/value list. `RecurrentStateLayer` also counts the tokens
it has seen, so a model whose every layer is linear still knows its position for RoPE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import (DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionCacheLayerMixin,
                                      LinearAttentionLayer)

from dtr_core.families import layer_type

FULL = "full"  # the layer-map entry of a layer that keeps its softmax attention
VALUE_CONV_STATE = 0  # conv state index of JetBlock's dynamic value convolution
SHORT_CONV_STATE = 1  # conv state index of the short convolution on q/k/v
STATES_PER_LAYER = 2  # state slots of a linear layer: the recurrent state uses slot 0, the conv states both


class RecurrentStateLayer(LinearAttentionLayer):
    """`LinearAttentionLayer` that also counts the tokens it has absorbed."""

    def __init__(self, number_of_states: int = STATES_PER_LAYER, **kwargs):
        super().__init__(number_of_states=number_of_states, **kwargs)
        self.seen_tokens = 0

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0


class HybridCache(DynamicCache):
    """DynamicCache whose layer i is a KV layer if `layer_map[i] == "full"` (a sliding-window one, holding the
    last `sliding_window - 1` positions, on the config's sliding-window layers), else a recurrent-state layer."""

    def __init__(self, config: PretrainedConfig | None = None, layer_map: list[str] | None = None):
        if layer_map is None:
            layer_map = list(getattr(config, "dtr_layer_mixers", None) or [])
        super().__init__()
        self.layers = [RecurrentStateLayer() if kind != FULL else self._kv_layer(config, index)
                       for index, kind in enumerate(layer_map)]
        self.layer_class_to_replicate = DynamicLayer

    @staticmethod
    def _kv_layer(config: PretrainedConfig | None, layer_idx: int) -> DynamicLayer:
        if config is not None and layer_type(config, layer_idx) == "sliding_attention":
            return DynamicSlidingWindowLayer(sliding_window=config.sliding_window)
        return DynamicLayer()

    def _all_linear(self) -> bool:
        return bool(self.layers) and all(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._all_linear():
            return getattr(self.layers[0], "seen_tokens", 0)
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        if self._all_linear():  # no layer reads the mask; keep transformers' mask builder consistent
            return self.get_seq_length() + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)


def recurrent_layer(cache: DynamicCache, layer_idx: int) -> LinearAttentionLayer:
    """The linear-attention cache layer at `layer_idx`, converting a plain KV slot if needed.

    Lets a student swapped into an ordinary model (whose forward made a plain `DynamicCache`) keep its
    state in the same cache object.
    """
    while len(cache.layers) <= layer_idx:
        cache.layers.append(DynamicLayer())
    layer = cache.layers[layer_idx]
    if not isinstance(layer, LinearAttentionCacheLayerMixin):
        layer = RecurrentStateLayer()
        cache.layers[layer_idx] = layer
    return layer


def conv_window(layer_cache: LinearAttentionLayer | None, channels_first: torch.Tensor, state_idx: int,
                width: int) -> torch.Tensor:
    """What a causal convolution of `width` taps reads for `channels_first` (B, C, T): (B, C, width - 1 + T),
    the previous `width - 1` inputs (zeros at the start of a sequence or without a cache) then these ones.
    With a cache, its conv state `state_idx` keeps the last `width - 1` inputs for the next call."""
    past = width - 1
    if layer_cache is None or past == 0:
        return F.pad(channels_first, (past, 0))
    had_past = layer_cache.has_previous_state[state_idx]
    window = layer_cache.update_conv_state(channels_first, state_idx=state_idx, conv_kernel_size=past)
    return window if had_past else F.pad(channels_first, (past, 0))
