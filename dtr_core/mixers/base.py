"""What every linear-attention student shares: teacher-shaped projections, RoPE, the output path, cache I/O.

A student is a drop-in replacement for a decoder layer's attention module: it takes what the HF
decoder layer passes (`hidden_states`, `position_embeddings`, `attention_mask`, `cache`, ...) and
returns `(output, None)` like the teacher. Subclasses implement `mix(...)`: the token mixing on
`[B, T, H, D]` tensors, given the recurrent state carried in the cache.

Decisions the DtR paper leaves open, taken here (and why):
- q/k/v/o are copied from the teacher (as RADLADS, LoLCATs, Mamba-in-the-Llama do): the student
  starts from the teacher's feature spaces, and distillation only has to learn the mixing.
- GQA: every query head gets its own key/value head, copied from the teacher's shared one
  (`repeat_interleave` over groups, the order HF's `repeat_kv` uses). The linear state is per head,
  so sharing would force heads to share one memory.
- RoPE is kept by default (`MixerConfig.use_rope`): q/k are rotated exactly as the teacher does, so
  copied projections see the features they were trained with. Set `use_rope=False` for NoPE.
- Qwen3's per-head q/k RMSNorms are copied and applied before RoPE, as in the teacher.
- Linear attention's output has no softmax normalisation, so each head's output goes through an
  RMSNorm before `o_proj`, as in GLA / Gated DeltaNet / JetBlock. Its weight starts at 1; distillation
  then rescales it once (`scale_output`) so the output matches the teacher's scale; a sigmoid output gate
  `2 * sigmoid(g_proj(x))` with zero-initialised `g_proj` starts as exactly the identity.
- Decay gates start near "no decay" (per-step decay ~0.999); see each mixer.
- Padding: students ignore `attention_mask`. Right padding is safe (causal: pads come after real
  tokens); left-padded batches are not supported for linear layers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from dtr_core.mixers.state_cache import recurrent_layer
from dtr_core.families import get_family
from dtr_core.ops.common import DEFAULT_CHUNK_SIZE

IMPLEMENTATIONS = ("chunk", "naive")


@dataclass(frozen=True)
class MixerConfig:
    use_rope: bool = True  # keep the teacher's rotary embedding on q/k (see module docstring)
    conv_size: int = 4  # JetBlock dynamic convolution width (Jet-Nemotron uses 4)
    chunk_size: int = DEFAULT_CHUNK_SIZE  # chunk length of the chunked parallel form (PyTorch backend)
    backend: str = "auto"  # "auto": fla kernels on CUDA when installed, else PyTorch; or "torch" / "fla"

    def __post_init__(self) -> None:
        if self.conv_size < 1:
            raise ValueError(f"conv_size must be >= 1, got {self.conv_size}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.backend not in ("auto", "torch", "fla"):
            raise ValueError(f"backend must be one of auto, torch, fla; got '{self.backend}'")

    def to_dict(self) -> dict:
        return asdict(self)

    def defining_dict(self) -> dict:
        """The fields that define the student's function: `chunk_size` and `backend` only choose how it is
        computed (the same result up to rounding), so a trained student stays valid when they change."""
        return {name: value for name, value in asdict(self).items() if name not in ("chunk_size", "backend")}

    @classmethod
    def from_dict(cls, values: dict | None) -> "MixerConfig":
        return cls(**(values or {}))


def attention_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(hidden_size, num_heads, head_dim) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.hidden_size, heads, head_dim


def projection_biases(config: PretrainedConfig) -> tuple[bool, bool]:
    """(q/k/v bias, o bias) as the family's attention has them."""
    fixed = get_family(config).projection_biases
    if fixed is not None:
        return fixed
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on `x: (B, T, H, D)` with HF's `cos, sin: (B, T, D)`, exactly as HF's `apply_rotary_pos_emb`."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return (x * cos) + (rotate_half(x) * sin)


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim (head_dim), shared weight across heads."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LinearMixer(nn.Module):
    """Base class of the students; see the module docstring for the shared design."""

    name: str = ""

    def __init__(self, config: PretrainedConfig, layer_idx: int, mixer_config: MixerConfig | None = None):
        super().__init__()
        self.mixer_config = mixer_config or MixerConfig()
        self.layer_idx = layer_idx
        self.hidden_size, self.num_heads, self.head_dim = attention_shape(config)
        self.impl = "chunk"  # "naive": the per-token reference loop (tests); never a training flag
        qkv_bias, o_bias = projection_biases(config)
        width = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(self.hidden_size, width, bias=qkv_bias)
        self.k_proj = nn.Linear(self.hidden_size, width, bias=qkv_bias)
        self.v_proj = nn.Linear(self.hidden_size, width, bias=qkv_bias)
        self.o_proj = nn.Linear(width, self.hidden_size, bias=o_bias)
        self.qk_norm = get_family(config).qk_norm
        if self.qk_norm:
            self.q_norm = HeadRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = HeadRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.o_norm = HeadRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.g_proj = nn.Linear(self.hidden_size, width, bias=True)
        nn.init.zeros_(self.g_proj.weight)
        nn.init.zeros_(self.g_proj.bias)

    # --- initialisation from the teacher ---------------------------------------------------------

    @torch.no_grad()
    def copy_from_teacher(self, teacher_attention: nn.Module) -> None:
        """Copy q/k/v/o (and q/k norms) from the teacher attention, expanding GQA key/value heads."""
        kv_heads = teacher_attention.k_proj.out_features // self.head_dim
        groups = self.num_heads // kv_heads
        self.q_proj.load_state_dict(teacher_attention.q_proj.state_dict())
        self.o_proj.load_state_dict(teacher_attention.o_proj.state_dict())
        for name in ("k_proj", "v_proj"):
            source, target = getattr(teacher_attention, name), getattr(self, name)
            weight = source.weight.view(kv_heads, self.head_dim, self.hidden_size)
            target.weight.copy_(weight.repeat_interleave(groups, dim=0).reshape_as(target.weight))
            if source.bias is not None:
                bias = source.bias.view(kv_heads, self.head_dim)
                target.bias.copy_(bias.repeat_interleave(groups, dim=0).reshape_as(target.bias))
            torch.testing.assert_close(target.weight[: self.head_dim], source.weight[: self.head_dim])
        if self.qk_norm:
            self.q_norm.weight.copy_(teacher_attention.q_norm.weight)
            self.k_norm.weight.copy_(teacher_attention.k_norm.weight)
        torch.testing.assert_close(self.q_proj.weight, teacher_attention.q_proj.weight)

    @torch.no_grad()
    def scale_output(self, factor: float) -> None:
        """Multiply the layer's output by `factor` (exactly: the output is linear in the output norm's weight)."""
        self.o_norm.weight.mul_(factor)

    # --- forward ---------------------------------------------------------------------------------

    def project_qkv(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)  # (B, T, H, D)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.mixer_config.use_rope:
            if position_embeddings is None:
                raise ValueError("use_rope=True needs position_embeddings (cos, sin) from the decoder")
            cos, sin = position_embeddings
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else kwargs.get("past_key_values")
        batch, length, _ = hidden_states.shape
        q, k, v = self.project_qkv(hidden_states, position_embeddings)
        layer_cache = recurrent_layer(cache, self.layer_idx) if cache is not None else None
        state = None
        if layer_cache is not None and layer_cache.is_recurrent_states_initialized[0]:
            state = layer_cache.recurrent_states[0]
        o, new_state = self.mix(hidden_states, q, k, v, state=state, cache=cache)  # o: (B, T, H, D)
        if cache is not None:
            layer_cache.update_recurrent_state(new_state)
            layer_cache.seen_tokens = getattr(layer_cache, "seen_tokens", 0) + length
        gate = 2.0 * torch.sigmoid(self.g_proj(hidden_states)).view_as(o)
        o = self.o_norm(o) * gate
        return self.o_proj(o.reshape(batch, length, -1)), None

    def mix(
        self,
        hidden_states: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: torch.Tensor | None,
        cache=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token mixing on (B, T, H, D) tensors; returns (output (B, T, H, D), final state (B, H, D, D))."""
        raise NotImplementedError

    def state_bytes(self, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the fixed-size state this layer keeps while decoding.

        The recurrent state is always kept in float32 (the ops accumulate in float32, whatever the
        model dtype); `dtype` is the model's dtype, used by states stored in it (JetBlock's conv state).
        """
        return batch_size * self.num_heads * self.head_dim * self.head_dim * 4


def inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))
