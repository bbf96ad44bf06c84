"""LoRA adapters for healing (through `peft`): low-rank updates of the frozen layers, merged after training.

With `HealConfig.lora_rank` r > 0, healing trains, besides the students, LoRA adapters (Hu et al., 2021; as
LoLCATs does after its attention transfer) on the frozen weights the students work with: the q/k/v/o
projections of every full-attention layer and the MLP projections of every layer (every `nn.Linear` under a
full layer's attention and under each layer's `mlp`; the students' own projections are trained in full).
`lora_alpha` is 2r (update scale 2, peft's usual choice), no dropout; A starts random (seeded by the heal's seed),
B at zero, so the adapted hybrid starts exactly where the unadapted one is.

The base weights never change while the adapters train. `merge_adapters` folds W + (alpha/r) B A into each
base weight and removes the adapters: the healed hybrid is a plain hybrid again (saved and loaded as any
other). `remove_adapters` removes them unmerged (a failed heal).
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn
from transformers import PreTrainedModel

from dtr_core.hybrid.model import layer_map
from dtr_core.hybrid.surgery import attention_name, decoder_layers
from dtr_core.mixers.state_cache import FULL

ADAPTER = "default"


def adapter_targets(hybrid: PreTrainedModel) -> list[str]:
    """Full names of the frozen linear maps that get adapters: full attention's projections, every MLP's."""
    kinds = layer_map(hybrid)
    full_names = {id(module): name for name, module in hybrid.named_modules()}
    targets = []
    attention = attention_name(hybrid) + "."
    for index, layer in enumerate(decoder_layers(hybrid)):
        for name, module in layer.named_modules():
            in_full_attention = kinds[index] == FULL and name.startswith(attention)
            if isinstance(module, nn.Linear) and (in_full_attention or name.startswith("mlp.")):
                targets.append(full_names[id(module)])
    return targets


def add_adapters(hybrid: PreTrainedModel, rank: int, seed: int) -> LoraModel:
    """Put rank-`rank` LoRA adapters on `adapter_targets(hybrid)`, in place; returns the handle that merges or
    removes them. Every parameter's `requires_grad` is left as it was (the heal loop decides what trains)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    requires_grad = {id(p): p.requires_grad for p in hybrid.parameters()}
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=adapter_targets(hybrid))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        handle = LoraModel(hybrid, config, ADAPTER)
    for parameter in hybrid.parameters():
        parameter.requires_grad_(requires_grad.get(id(parameter), True))
    return handle


def adapter_modules(hybrid: PreTrainedModel) -> nn.ModuleDict:
    """The adapters' A and B maps by target (dots as `__`): one module, so the heal loop treats them as one more
    trained part (optimiser, checkpoint)."""
    return nn.ModuleDict({name.replace(".", "__"): nn.ModuleDict({"A": module.lora_A, "B": module.lora_B})
                          for name, module in hybrid.named_modules() if isinstance(module, LoraLayer)})


def merge_adapters(handle: LoraModel) -> PreTrainedModel:
    """Fold the adapters into their base weights and remove them; returns the (same) hybrid, a plain one."""
    return handle.merge_and_unload()


def remove_adapters(handle: LoraModel) -> PreTrainedModel:
    """Remove the adapters without merging them: the base weights as they were."""
    return handle.unload()
