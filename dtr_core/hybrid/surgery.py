"""Model surgery: find attention modules and swap them for linear-attention students, in place.

`swap_layers(model, {3: student})` returns the modules it replaced, so `restore_layers(model, originals)`
undoes it exactly. Swapping nothing touches nothing, so the logits stay bit-identical to the teacher.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from dtr_core.families import get_family


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    get_family(model.config)
    return model.model.layers


def num_layers(model: PreTrainedModel) -> int:
    return len(decoder_layers(model))


def check_layer_index(model: PreTrainedModel, layer_idx: int) -> None:
    count = num_layers(model)
    if not 0 <= layer_idx < count:
        raise ValueError(f"layer index {layer_idx} is out of range; this model has layers 0..{count - 1}")


def attention_module(model: PreTrainedModel, layer_idx: int) -> nn.Module:
    check_layer_index(model, layer_idx)
    return decoder_layers(model)[layer_idx].self_attn


def swap_layers(model: PreTrainedModel, students: dict[int, nn.Module]) -> dict[int, nn.Module]:
    """Put `students[i]` in place of layer i's attention; returns the replaced modules."""
    for layer_idx in students:
        check_layer_index(model, layer_idx)
    layers = decoder_layers(model)
    originals: dict[int, nn.Module] = {}
    for layer_idx, student in students.items():
        originals[layer_idx] = layers[layer_idx].self_attn
        if getattr(student, "layer_idx", layer_idx) != layer_idx:
            raise ValueError(f"student built for layer {student.layer_idx} cannot replace layer {layer_idx}")
        layers[layer_idx].self_attn = student
    return originals


def restore_layers(model: PreTrainedModel, originals: dict[int, nn.Module]) -> None:
    """Inverse of `swap_layers`."""
    layers = decoder_layers(model)
    for layer_idx, module in originals.items():
        layers[layer_idx].self_attn = module
