"""Hybrid models as first-class Hugging Face models.

A hybrid of family `f` (any family of `dtr_core.families`) is a `Dtr<F>ForCausalLM` with model_type
`dtr_<f>`: the family's own causal-LM class (transformers' Auto mapping for `f`) whose config adds
    dtr_layer_mixers: ["full", "gated_deltanet", "full", ...]   # one entry per layer
    dtr_mixer_config: {"use_rope": true, ..., "student_format": 2}  # MixerConfig of the students
`import dtr_core.hybrid` registers these for every family of the table with `AutoConfig` /
`AutoModelForCausalLM` (a family found by `probe_family` is registered when its first hybrid is made), so
`AutoModelForCausalLM.from_pretrained(dir)` loads a saved hybrid without `trust_remote_code`, and
`save_pretrained` writes safetensors. `forward(use_cache=True)` and `generate()` use `HybridCache`:
a KV cache for full layers (bounded by the window on sliding-window layers) and a fixed-size recurrent state
for linear ones. A hybrid whose students were
saved by an earlier dtr (no `student_format` in `dtr_mixer_config`: expanded key/value heads, another weight
layout) is refused on loading with one line naming the fix.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from dtr_core.mixers.state_cache import FULL, HybridCache
from dtr_core.families import FAMILIES, HYBRID_PREFIX, attention_of, base_model_type, get_family, layer_type
from dtr_core.mixers import LinearMixer, MixerConfig, build_student, get_mixer_class
from dtr_core.mixers.base import attention_shape, earlier_format_message, key_value_heads
from dtr_core.hybrid.surgery import attention_prefix, decoder_layers, swap_layers


class HybridMixin:
    """Behaviour shared by every `Dtr<F>ForCausalLM`: students built from the config, hybrid cache."""

    def _install_students(self) -> None:
        layer_map = self.config.dtr_layer_mixers
        if layer_map is None:
            layer_map = [FULL] * self.config.num_hidden_layers
            self.config.dtr_layer_mixers = layer_map
        if len(layer_map) != self.config.num_hidden_layers:
            raise ValueError(
                f"dtr_layer_mixers has {len(layer_map)} entries but the model has {self.config.num_hidden_layers} layers"
            )
        saved = self.config.dtr_mixer_config
        if saved is not None and "student_format" not in saved and any(kind != FULL for kind in layer_map):
            raise ValueError(earlier_format_message(
                f"this {self.config.model_type} hybrid",
                "build it again with the same `dtr convert` or `dtr hybridize` command"))
        mixer_config = MixerConfig.from_dict(saved)
        students = {
            layer_idx: build_student(kind, self.config, layer_idx, mixer_config)
            for layer_idx, kind in enumerate(layer_map)
            if kind != FULL
        }
        swap_layers(self, students)

    def forward(self, *args, cache=None, use_cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = HybridCache(self.config)
        return super().forward(*args, cache=cache, use_cache=use_cache, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs["cache"] = HybridCache(self.config)


def _hybrid_classes(base_config: type, base_model: type) -> tuple[type, type]:
    family = base_config.model_type
    config_cls = strict(
        type(
            f"Dtr{base_config.__name__}",
            (base_config,),
            {
                "__annotations__": {"dtr_layer_mixers": list[str] | None, "dtr_mixer_config": dict | None},
                "dtr_layer_mixers": None,
                "dtr_mixer_config": None,
                "model_type": HYBRID_PREFIX + family,
                "__module__": __name__,
            },
        )
    )

    def __init__(self, config):
        base_model.__init__(self, config)
        self._install_students()
        self.post_init()

    model_cls = type(
        f"Dtr{base_model.__name__}",
        (HybridMixin, base_model),
        {"config_class": config_cls, "__init__": __init__, "__module__": __name__},
    )
    return config_cls, model_cls


HYBRID_CLASSES: dict[str, tuple[type, type]] = {}


def hybrid_classes(model_type: str) -> tuple[type, type]:
    """(config class, model class) of the hybrids of family `model_type`, made and registered with the Auto
    classes on first use."""
    if model_type not in HYBRID_CLASSES:
        base_config = getattr(transformers, CONFIG_MAPPING_NAMES[model_type])
        base_model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        config_cls, model_cls = _hybrid_classes(base_config, base_model)
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
        HYBRID_CLASSES[model_type] = config_cls, model_cls
    return HYBRID_CLASSES[model_type]


for _model_type in FAMILIES:
    hybrid_classes(_model_type)


def layer_map(model: PreTrainedModel) -> list[str]:
    """Per layer: "full" or the mixer name of its student."""
    family = get_family(model.config)
    attentions = [attention_of(family, layer) for layer in decoder_layers(model)]
    return [attention.name if isinstance(attention, LinearMixer) else FULL for attention in attentions]


def make_hybrid(
    model: PreTrainedModel,
    students: dict[int, nn.Module],
    mixer_config: MixerConfig | None = None,
) -> PreTrainedModel:
    """A new hybrid model: `model`'s weights with `students[i]` as layer i's attention.

    The teacher is left untouched (weights are copied). With no students, the hybrid computes
    exactly what the teacher computes.
    """
    family = get_family(model.config)
    config_cls, model_cls = hybrid_classes(family.model_type)
    mixers = list(layer_map(model))
    for layer_idx, student in students.items():
        if not 0 <= layer_idx < len(mixers):
            raise ValueError(f"layer index {layer_idx} is out of range; this model has layers 0..{len(mixers) - 1}")
        get_mixer_class(student.name)
        mixers[layer_idx] = student.name
    if mixer_config is None:
        configs = {student.mixer_config for student in students.values()}
        mixer_config = configs.pop() if len(configs) == 1 else MixerConfig()
    values = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtr_layer_mixers", "dtr_mixer_config"):
        values.pop(key, None)
    config = config_cls(**values, dtr_layer_mixers=mixers, dtr_mixer_config=mixer_config.to_dict())
    reference = next(model.parameters())
    with torch.device("meta"):
        hybrid = model_cls(config)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    for layer_idx, student in students.items():
        prefix = attention_prefix(model, layer_idx)
        state = {name: tensor for name, tensor in state.items() if not name.startswith(prefix)}
        state.update({prefix + name: tensor.detach().clone() for name, tensor in student.state_dict().items()})
    missing, unexpected = hybrid.load_state_dict(state, strict=False, assign=True)
    missing = [name for name in missing if name != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise RuntimeError(f"hybrid weights do not match: missing {missing}, unexpected {unexpected}")
    teacher_buffers = dict(model.named_buffers())
    for name, buffer in list(hybrid.named_buffers()):
        if buffer.is_meta:  # non-persistent buffers (RoPE inv_freq) are not in the state dict
            module_name, _, buffer_name = name.rpartition(".")
            hybrid.get_submodule(module_name).register_buffer(
                buffer_name, teacher_buffers[name].clone(), persistent=False
            )
    hybrid.tie_weights()
    hybrid.generation_config = model.generation_config
    return hybrid.to(device=reference.device, dtype=reference.dtype).eval()


def is_hybrid(model: PreTrainedModel) -> bool:
    return model.config.model_type != base_model_type(model.config)


def cache_bytes(model: PreTrainedModel, context_len: int, batch_size: int = 1, dtype: torch.dtype | None = None) -> int:
    """Decoding cache size at `context_len`: K and V of every full layer (at most `sliding_window` positions on a
    sliding-window layer) + the fixed state of linear layers."""
    dtype = dtype or next(model.parameters()).dtype
    element = torch.empty((), dtype=dtype).element_size()
    config = model.config
    family = get_family(config)
    _, _, head_dim = attention_shape(config)
    kv_heads = key_value_heads(config)
    total = 0
    for layer_idx, layer in enumerate(decoder_layers(model)):
        attention = attention_of(family, layer)
        if isinstance(attention, LinearMixer):
            total += attention.state_bytes(batch_size, dtype)
        else:
            total += 2 * batch_size * kv_heads * head_dim * kv_positions(config, layer_idx, context_len) * element
    return total


def kv_positions(config, layer_idx: int, context_len: int) -> int:
    """Positions a softmax layer keeps in its KV cache at `context_len`: all of them, or the window."""
    if layer_type(config, layer_idx) == "sliding_attention":
        return min(context_len, config.sliding_window - 1)  # what `DynamicSlidingWindowLayer` keeps
    return context_len
