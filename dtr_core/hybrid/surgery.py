"""Model surgery: find attention modules and swap them for linear-attention students, in place.

Where a family keeps its decoder layers and their attention is read from its `dtr_core.families` entry.
`swap_layers(model, {3: student})` returns the modules it replaced, so `restore_layers(model, originals)`
undoes it exactly. Swapping nothing touches nothing, so the logits stay bit-identical to the teacher;
`verify_family` checks that on a model (and its hybrid) before anything is built on a family that was not in
the table.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from transformers import PreTrainedModel

from dtr_core.families import FAMILIES, attention_of, base_model_type, decoder_layers_of, get_family


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return decoder_layers_of(get_family(model.config), model)


def num_layers(model: PreTrainedModel) -> int:
    return len(decoder_layers(model))


def check_layer_index(model: PreTrainedModel, layer_idx: int) -> None:
    count = num_layers(model)
    if not 0 <= layer_idx < count:
        raise ValueError(f"layer index {layer_idx} is out of range; this model has layers 0..{count - 1}")


def attention_module(model: PreTrainedModel, layer_idx: int) -> nn.Module:
    check_layer_index(model, layer_idx)
    return attention_of(get_family(model.config), decoder_layers(model)[layer_idx])


def attention_name(model: PreTrainedModel) -> str:
    """The attribute of a decoder layer that holds its attention ("self_attn", "attn", "attention")."""
    return get_family(model.config).attention


def attention_prefix(model: PreTrainedModel, layer_idx: int) -> str:
    """State-dict prefix of layer `layer_idx`'s attention, e.g. "model.layers.3.self_attn."."""
    family = get_family(model.config)
    return f"{family.layers}.{layer_idx}.{family.attention}."


def swap_layers(model: PreTrainedModel, students: dict[int, nn.Module]) -> dict[int, nn.Module]:
    """Put `students[i]` in place of layer i's attention; returns the replaced modules."""
    for layer_idx in students:
        check_layer_index(model, layer_idx)
    layers, name = decoder_layers(model), attention_name(model)
    originals: dict[int, nn.Module] = {}
    for layer_idx, student in students.items():
        originals[layer_idx] = getattr(layers[layer_idx], name)
        if getattr(student, "layer_idx", layer_idx) != layer_idx:
            raise ValueError(f"student built for layer {student.layer_idx} cannot replace layer {layer_idx}")
        setattr(layers[layer_idx], name, student)
    return originals


def restore_layers(model: PreTrainedModel, originals: dict[int, nn.Module]) -> None:
    """Inverse of `swap_layers`."""
    layers, name = decoder_layers(model), attention_name(model)
    for layer_idx, module in originals.items():
        setattr(layers[layer_idx], name, module)


_VERIFIED: weakref.WeakSet = weakref.WeakSet()  # models whose no-swap hybrid was checked exact


@torch.no_grad()
def verify_family(model: PreTrainedModel, tokens: int = 8) -> None:
    """For a family not in the table (tried with the Llama layout): the hybrid with no student must give the
    teacher's logits bit for bit on a short input, else ValueError naming the architecture. A family in the
    table is tested, not re-checked here. The check holds a copy of the weights while it runs, once per model
    object."""
    from dtr_core.hybrid.model import make_hybrid

    model_type = base_model_type(model.config)
    if model_type in FAMILIES or model in _VERIFIED:
        return
    get_family(model.config)  # the clear error when the layout is not the Llama one
    device = next(model.parameters()).device
    ids = (torch.arange(tokens, device=device).unsqueeze(0) * 7 + 1) % model.config.vocab_size
    training = model.training
    model.eval()  # the hybrid is built in eval mode: compare without dropout
    try:
        expected = model(ids, use_cache=False).logits
    finally:
        model.train(training)
    hybrid = make_hybrid(model, {})
    if not torch.equal(hybrid(ids, use_cache=False).logits, expected):
        raise ValueError(f"architecture '{model_type}' has the Llama attention layout but its dtr hybrid does not "
                         f"reproduce it exactly; add an entry to dtr_core/families.py with its differences")
    _VERIFIED.add(model)
