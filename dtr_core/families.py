"""Per-family table of where a Hugging Face decoder keeps its attention, and how to read it.

Adding a family is one `Family` entry: the `config.model_type`, where the decoder layers and their attention
modules live, how the teacher stores q/k/v/o (`qkv_layout`), its q/k norms, RoPE, and the few model-level
scalars that the layer-by-layer search must apply around the decoder layers (embedding multiplier, logit
scaling and soft-capping). The small adapters below (`teacher_projections`, `input_embeddings`,
`output_logits`, `rotary_embeddings`) read those fields; facts about a family live here, never as
`model_type == ...` checks elsewhere.

A family not in the table is tried as the Llama layout when its attention modules have `q_proj`, `k_proj`,
`v_proj`, `o_proj` and take `position_embeddings` from the decoder layer, and its model has
`model.rotary_emb`, `model.embed_tokens` and `model.norm` (`probe_family`); `dtr_core.hybrid.surgery.verify_family`
then checks that surgery with no swap leaves the logits bit-identical before anything is built on it.
Anything else is refused with one line naming the supported families.

What the students do with each family's attention (they have no softmax; see `dtr_core/mixers/base.py`):
- the softmax scale (`head_dim ** -0.5`, Gemma's `query_pre_attn_scalar ** -0.5`, Granite's
  `attention_multiplier`) and Gemma 2's attention-logit soft-capping act on softmax logits only; a student
  has no logits to scale or cap, and its per-head output RMSNorm makes its output independent of q's scale,
  so it copies q/k/v/o and drops both;
- sliding-window layers (Gemma 2/3, `config.layer_types`) become linear layers with unbounded memory of the
  past: a student's recurrent state summarises every earlier token, not the last `sliding_window`;
- q/k norms are copied and applied as the teacher does (per head for Qwen3 and Gemma 3, over the whole
  projection for OLMo 2; Gemma's norms scale by `1 + weight`, stored as such in the student);
- partial rotary (GPT-NeoX, Phi-3 with `partial_rotary_factor`) rotates the first `cos.shape[-1]` channels
  of each head, as the teacher; GPT-2 has no RoPE (learned absolute positions enter with the embeddings),
  so its students use none.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

SEPARATE, FUSED, FUSED_PER_HEAD, CONV1D = "separate", "fused", "fused_per_head", "conv1d"
HEAD, PROJECTION = "head", "projection"


@dataclass(frozen=True)
class Family:
    model_type: str
    layers: str = "model.layers"  # the decoder layers (a ModuleList), from the *ForCausalLM
    attention: str = "self_attn"  # a decoder layer's attention module
    # how the teacher holds q/k/v: "separate" q_proj/k_proj/v_proj; "fused" one Linear `qkv`, rows q|k|v (Phi-3);
    # "fused_per_head" one Linear `qkv`, rows per head q_h|k_h|v_h (GPT-NeoX); "conv1d" GPT-2's Conv1D, columns q|k|v
    qkv_layout: str = SEPARATE
    qkv: str = ""  # the fused projection's name (layouts other than "separate")
    output: str = "o_proj"  # the output projection (a Conv1D with the "conv1d" layout)
    qk_norm: str | None = None  # "head": q_norm/k_norm over head_dim (Qwen3, Gemma 3); "projection": over the width (OLMo 2)
    norm_offset: float = 0.0  # the teacher's RMSNorms scale by (norm_offset + weight) (Gemma: 1)
    rope: bool = True  # RoPE (cos, sin) reaches the attention from the decoder layer
    rope_per_layer_type: bool = False  # the rotary embedding takes the layer type (Gemma 3: local and global bases)
    # (q/k/v bias, o bias) fixed by the architecture (Qwen2: q/k/v only; GPT-2: both); None: both follow
    # `config.attention_bias`
    projection_biases: tuple[bool, bool] | None = None
    embeddings: str = "model.embed_tokens"  # token embeddings (Gemma's scale by sqrt(hidden) themselves)
    position_embeddings: str | None = None  # learned absolute positions added to the token embeddings (GPT-2)
    embedding_multiplier: str | None = None  # config field the embeddings are multiplied by (Granite)
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    logits_divisor: str | None = None  # config field the logits are divided by (Granite's `logits_scaling`)
    logit_softcap: str | None = None  # config field of tanh soft-capping on the logits (Gemma 2/3)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama"),
    "mistral": Family("mistral"),
    "qwen2": Family("qwen2", projection_biases=(True, False)),
    "qwen3": Family("qwen3", qk_norm=HEAD),
    "granite": Family("granite", embedding_multiplier="embedding_multiplier", logits_divisor="logits_scaling"),
    "olmo2": Family("olmo2", qk_norm=PROJECTION),
    "phi3": Family("phi3", qkv_layout=FUSED, qkv="qkv_proj"),
    "gemma2": Family("gemma2", norm_offset=1.0, logit_softcap="final_logit_softcapping"),
    "gemma3_text": Family("gemma3_text", qk_norm=HEAD, norm_offset=1.0, rope_per_layer_type=True,
                          logit_softcap="final_logit_softcapping"),
    "gpt_neox": Family("gpt_neox", layers="gpt_neox.layers", attention="attention", qkv_layout=FUSED_PER_HEAD,
                       qkv="query_key_value", output="dense", embeddings="gpt_neox.embed_in",
                       final_norm="gpt_neox.final_layer_norm"),
    "gpt2": Family("gpt2", layers="transformer.h", attention="attn", qkv_layout=CONV1D, qkv="c_attn", output="c_proj",
                   rope=False, projection_biases=(True, True), embeddings="transformer.wte",
                   position_embeddings="transformer.wpe", final_norm="transformer.ln_f"),
}

HYBRID_PREFIX = "dtr_"  # a dtr hybrid of family f has model_type "dtr_f"
STANDARD_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def base_model_type(config: PretrainedConfig) -> str:
    model_type = config.model_type
    return model_type[len(HYBRID_PREFIX):] if model_type.startswith(HYBRID_PREFIX) else model_type


def unsupported_message(model_type: str) -> str:
    return (f"unsupported architecture '{model_type}'; dtr supports decoder families: {', '.join(sorted(FAMILIES))} "
            f"and others with the Llama attention layout (q_proj/k_proj/v_proj/o_proj, RoPE from the decoder layer); "
            f"add an entry to dtr_core/families.py for another")


def get_family(config: PretrainedConfig) -> Family:
    """The family entry for a model config: the table's, else the Llama layout when `probe_family` finds it;
    ValueError naming the supported families otherwise."""
    model_type = base_model_type(config)
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    family = probe_family(model_type)
    if family is None:
        raise ValueError(unsupported_message(model_type))
    return family


@functools.lru_cache(maxsize=None)
def probe_family(model_type: str) -> Family | None:
    """A `Family` with the Llama layout for a transformers model type not in the table, when a 1-layer model of
    its default config (built on the meta device: no memory, no weights) has it; else None."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.for_model(model_type)
        config.num_hidden_layers = 1
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # not a transformers causal LM (or not buildable from its defaults): not ours to try
        return None
    family = Family(model_type)
    try:
        attention = attention_of(family, decoder_layers_of(family, model)[0])
        for path in (family.embeddings, family.final_norm, family.lm_head, "model.rotary_emb"):
            model.get_submodule(path)
    except (AttributeError, IndexError, TypeError):
        return None
    if not all(isinstance(getattr(attention, name, None), torch.nn.Linear) for name in STANDARD_PROJECTIONS):
        return None
    if "position_embeddings" not in inspect.signature(attention.forward).parameters:
        return None
    norm_weight = getattr(getattr(attention, "q_norm", None), "weight", None)
    if norm_weight is None:
        return family
    if norm_weight.shape[-1] == getattr(attention, "head_dim", None):  # per-head q/k norms, as Qwen3
        return Family(model_type, qk_norm=HEAD)
    return None  # q/k norms of another shape: a table entry must say how they apply


# --- adapters: the one place that knows each family's module layout -----------------------------------------


def decoder_layers_of(family: Family, model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(family.layers)


def attention_of(family: Family, layer: nn.Module) -> nn.Module:
    return getattr(layer, family.attention)


def _linear(module: nn.Module, transposed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = module.weight.t() if transposed else module.weight  # Conv1D keeps (in, out)
    return weight, module.bias


def teacher_projections(family: Family, attention: nn.Module, num_heads: int, num_kv_heads: int, head_dim: int
                        ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """{"q", "k", "v", "o": (weight (out, in) as an `nn.Linear` holds it, bias or None)} of a teacher attention."""
    if family.qkv_layout == SEPARATE:
        projections = {name: _linear(getattr(attention, f"{name}_proj"), False) for name in ("q", "k", "v")}
    else:
        fused = getattr(attention, family.qkv)
        weight, bias = _linear(fused, family.qkv_layout == CONV1D)
        widths = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        if family.qkv_layout == FUSED_PER_HEAD:  # rows (H, 3, D): each head's q, k, v side by side
            if num_heads != num_kv_heads:
                raise ValueError(f"a per-head fused query_key_value needs as many key/value heads as heads")
            weight = weight.reshape(num_heads, 3, head_dim, -1).transpose(0, 1).reshape(3 * num_heads * head_dim, -1)
            if bias is not None:
                bias = bias.reshape(num_heads, 3, head_dim).transpose(0, 1).reshape(-1)
        weights = weight.split(widths, dim=0)
        biases = bias.split(widths) if bias is not None else (None, None, None)
        projections = {name: (w, b) for name, w, b in zip(("q", "k", "v"), weights, biases)}
    projections["o"] = _linear(getattr(attention, family.output), family.qkv_layout == CONV1D)
    return projections


def teacher_qk_norms(family: Family, attention: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The teacher's q and k norm scales as plain multipliers (Gemma's `1 + weight`), or None without norms."""
    if family.qk_norm is None:
        return None
    return tuple(getattr(attention, name).weight + family.norm_offset for name in ("q_norm", "k_norm"))


def input_embeddings(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The hidden states entering the first decoder layer for `input_ids` at positions 0..T-1, as the model's
    forward computes them without a cache."""
    family = get_family(model.config)
    hidden = model.get_submodule(family.embeddings)(input_ids)
    if family.position_embeddings is not None:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device).unsqueeze(0)
        hidden = hidden + model.get_submodule(family.position_embeddings)(positions).to(hidden.dtype)
    if family.embedding_multiplier is not None:
        hidden = hidden * getattr(model.config, family.embedding_multiplier)
    return hidden


def output_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm, LM head and the family's logit scaling / soft-capping, as its *ForCausalLM forward."""
    family = get_family(model.config)
    logits = model.get_submodule(family.lm_head)(model.get_submodule(family.final_norm)(hidden))
    if family.logits_divisor is not None:
        logits = logits / getattr(model.config, family.logits_divisor)
    cap = getattr(model.config, family.logit_softcap, None) if family.logit_softcap is not None else None
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def layer_type(config: PretrainedConfig, layer_idx: int) -> str:
    """"sliding_attention" for a layer whose KV cache is bounded by `config.sliding_window` (as transformers'
    `DynamicCache` reads the config: `layer_types`, else every layer when a window is set), else
    "full_attention"."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    kind = types[layer_idx] if types else ("sliding_attention" if window else "full_attention")
    return kind if kind == "sliding_attention" and window else "full_attention"


def rotary_embeddings(model: PreTrainedModel, positions: torch.Tensor, layer_idx: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cos, sin), each (B, T, rotary dim) fp32, that decoder layer `layer_idx` receives for `positions` (B, T);
    None for a family without RoPE."""
    family = get_family(model.config)
    if not family.rope:
        return None
    layers_path = family.layers.rpartition(".")[0]
    rotary = model.get_submodule(f"{layers_path}.rotary_emb" if layers_path else "rotary_emb")
    probe = torch.zeros(1, positions.shape[-1], 1, device=positions.device, dtype=torch.float32)
    if family.rope_per_layer_type:
        cos, sin = rotary(probe, positions, model.config.layer_types[layer_idx])
    else:
        cos, sin = rotary(probe, positions)
    return cos.float(), sin.float()
