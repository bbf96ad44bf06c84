"""Ops per decoded token of one student layer: aten ops counted under `TorchDispatchMode`.

SmolLM2-135M's attention shape (hidden 576, 9 query heads, 3 key/value heads, head dim 64), float32, one
token decoded after an 8-token prefill, default `MixerConfig`. Run `python tests/mixer_op_count.py` to print
the counts; `tests/test_mixers.py` holds them as a ceiling, and `dtr_core/mixers/base.py` states them.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from dtr_core.mixers import MIXERS, MixerConfig, build_student
from dtr_core.mixers.state_cache import HybridCache

GEMMS = ("addmm", "mm", "bmm")


class OpCounter(TorchDispatchMode):
    """Counts every aten op that runs while it is active, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def smollm2_attention_config() -> LlamaConfig:
    return LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                       intermediate_size=64, num_hidden_layers=1, vocab_size=10)


@torch.no_grad()
def decode_ops(name: str, mixer_config: MixerConfig | None = None) -> collections.Counter[str]:
    """The aten ops of one decoded token through a `name` student built from a random SmolLM2-shaped teacher."""
    config = smollm2_attention_config()
    torch.manual_seed(0)
    student = build_student(name, config, 0, mixer_config, teacher_attention=LlamaAttention(config, 0)).eval()
    rope = LlamaRotaryEmbedding(config)
    cache = HybridCache(layer_map=[name])
    prefix = torch.randn(1, 8, config.hidden_size)
    student(prefix, position_embeddings=rope(prefix, torch.arange(8)[None]), cache=cache)
    token = torch.randn(1, 1, config.hidden_size)
    position_embeddings = rope(token, torch.tensor([[8]]))  # the decoder computes these once for all layers
    counter = OpCounter()
    with counter:
        student(token, position_embeddings=position_embeddings, cache=cache)
    return counter.ops


if __name__ == "__main__":
    for mixer in sorted(MIXERS):
        ops = decode_ops(mixer)
        print(f"{mixer}: {sum(ops.values())} aten ops, {sum(ops[name] for name in GEMMS)} GEMMs; {dict(ops)}")
