"""Linear-attention students: a registry of drop-in replacements for a decoder layer's attention.

Tensor layout inside every mixer and op: (B, T, H, D).
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from dtr_core.mixers.base import LinearMixer, MixerConfig
from dtr_core.mixers.gated_deltanet import GatedDeltaNetMixer
from dtr_core.mixers.gla import GLAMixer
from dtr_core.mixers.jetblock import JetBlockMixer

MIXERS: dict[str, type[LinearMixer]] = {
    "gla": GLAMixer,
    "gated_deltanet": GatedDeltaNetMixer,
    "jetblock": JetBlockMixer,
}


def get_mixer_class(name: str) -> type[LinearMixer]:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer '{name}'; choose one of: {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


def build_student(
    name: str,
    model_config: PretrainedConfig,
    layer_idx: int,
    mixer_config: MixerConfig | None = None,
    teacher_attention: nn.Module | None = None,
) -> LinearMixer:
    """A student for layer `layer_idx`; with `teacher_attention`, q/k/v/o are copied from it."""
    student = get_mixer_class(name)(model_config, layer_idx, mixer_config)
    if teacher_attention is not None:
        reference = next(teacher_attention.parameters())
        student.to(device=reference.device, dtype=reference.dtype)
        student.copy_from_teacher(teacher_attention)
    return student


__all__ = ["MIXERS", "LinearMixer", "MixerConfig", "build_student", "get_mixer_class"]
