"""Per-family table of where a Hugging Face decoder keeps its attention modules.

Adding a family is one table entry: the `config.model_type`, whether it has q/k norms (Qwen3
normalises q and k per head before RoPE) and which projection biases its architecture fixes (Qwen2).
Facts about a family live here, never as `model_type == ...` checks elsewhere. Every supported family
follows the Llama layout: `model.model.layers[i].self_attn` with `q_proj`, `k_proj`, `v_proj`, `o_proj`,
RoPE from `model.model.rotary_emb`, and the decoder-layer call signature of transformers 5.x.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Family:
    model_type: str
    qk_norm: bool = False  # q_norm/k_norm RMSNorm over head_dim, applied before RoPE (Qwen3)
    # (q/k/v bias, o bias) fixed by the architecture (Qwen2: q/k/v only, whatever the config says);
    # None: both follow `config.attention_bias`
    projection_biases: tuple[bool, bool] | None = None


FAMILIES: dict[str, Family] = {
    "llama": Family("llama"),
    "mistral": Family("mistral"),
    "qwen2": Family("qwen2", projection_biases=(True, False)),
    "qwen3": Family("qwen3", qk_norm=True),
}

HYBRID_PREFIX = "dtr_"  # a dtr hybrid of family f has model_type "dtr_f"


def base_model_type(config: PretrainedConfig) -> str:
    model_type = config.model_type
    return model_type[len(HYBRID_PREFIX):] if model_type.startswith(HYBRID_PREFIX) else model_type


def get_family(config: PretrainedConfig) -> Family:
    """The family entry for a model config; unsupported architectures raise naming the supported ones."""
    model_type = base_model_type(config)
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported architecture '{model_type}'; dtr supports decoder families: "
            f"{', '.join(sorted(FAMILIES))} (add an entry to dtr_core/families.py for another)"
        )
    return FAMILIES[model_type]
