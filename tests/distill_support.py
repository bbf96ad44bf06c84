"""Shared by the distillation tests: a small text corpus and the teacher's attention input/output of a layer."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = ("river stone market winter engine garden signal copper violin harbour lantern meadow orbit candle "
         "tunnel falcon ribbon glacier saddle thunder pepper marble compass velvet anchor").split()


def write_corpus(path: Path, documents: int = 60, seed: int = 0) -> str:
    """A .txt corpus of pseudo-random sentences (8-30 words each)."""
    rng = random.Random(seed)
    text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 30))) + "."
                       for _ in range(documents))
    path.write_text(text)
    return str(path)


@torch.no_grad()
def attention_io(model, ids: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): the hidden states entering layer `layer`'s self_attn and its output, for `ids` (B, T)."""
    from dtr_core.hybrid.surgery import attention_module

    taken = {}
    module = attention_module(model, layer)
    handles = [module.register_forward_pre_hook(lambda m, a, k: taken.__setitem__("x", k.get("hidden_states",
                                                                                          a[0] if a else None)),
                                                with_kwargs=True),
               module.register_forward_hook(lambda m, a, o: taken.__setitem__("y", o[0]))]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return taken["x"].float(), taken["y"].float()
