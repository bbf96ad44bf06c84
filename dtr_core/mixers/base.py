"""What every linear-attention student shares: one fused input projection, RoPE, the output path, cache I/O.

A student is a drop-in replacement for a decoder layer's attention module: it takes what the HF
decoder layer passes (`hidden_states`, `position_embeddings`, `attention_mask`, `cache`, ...) and
returns `(output, None)` like the teacher. Subclasses implement `mix(...)`: the token mixing on
`[B, T, H, D]` tensors, given the recurrent state carried in the cache.

Decisions the DtR paper leaves open, taken here (and why):
- q/k/v/o are copied from the teacher (as RADLADS, LoLCATs, Mamba-in-the-Llama do): the student
  starts from the teacher's feature spaces, and distillation only has to learn the mixing.
- GQA: k, v and the recurrent state keep the teacher's key/value head count (`num_key_value_heads`);
  query head h reads key/value head h // groups (the order of HF's `repeat_kv`). The gates that feed the
  state update (decays, write strength) are per key/value head too. At initialisation this is the same
  function as giving every query head its own copy of its key/value head (tested), at a fraction of the
  cost. SmolLM2-135M (9 query heads, 3 key/value heads, head dim 64), per linear layer, batch 1:
  recurrent state 9 x 64 x 64 x 4 = 147,456 bytes expanded, 3 x 64 x 64 x 4 = 49,152 bytes grouped (the
  state update's compute shrinks by the same factor 3); parameters below, against the teacher attention's
  0.88M (the rest over it: the output gate, 0.11M, and the mixers' gates).
- The output gate is per key/value head (one gate of `num_key_value_heads * head_dim` channels, each
  shared by the query heads of its group): it has the width of the value projection, as the gate of fla's
  `GatedDeltaNet` (`g_proj: hidden -> value_dim`), keeps the identity at initialisation, and costs a third
  of a per-query-head gate on SmolLM2 (110K parameters instead of 332K, read at every decoded token).
- One fused input projection `in_proj`: rows [q | k | v | output gate | the mixer's own inputs (decay
  and write-strength logits, the low-rank gate's and kernel generator's down projections)], one GEMM per
  token where there were four to seven; its bias is zero where the teacher has none. The q and k heads stay
  side by side, so SiLU, RoPE and the L2 norm run once on both. Per decoded token and linear layer (aten ops
  under `TorchDispatchMode`, SmolLM2-135M's shape, one token after an 8-token prefill, the earlier
  options (sigmoid gate, no activation or convolution; the published defaults add 7 ops);
  `python tests/mixer_op_count.py`; `tests/test_mixers.py` holds the counts as a ceiling):
      mixer            aten ops       linear layers (GEMMs incl. the state's bmm)   parameters
      GLA              91 -> 67       7 -> 3  (8 -> 4)                              1.68M -> 1.01M
      gated DeltaNet   120 -> 84      7 -> 2  (9 -> 4)                              1.67M -> 1.00M
      JetBlock         152 -> 100     9 -> 3  (12 -> 5)                             1.71M -> 1.04M
  (before: expanded key/value heads, separate projections; after: grouped and fused.)
- RoPE is kept by default (`MixerConfig.use_rope`): q/k are rotated exactly as the teacher does, so
  copied projections see the features they were trained with. Set `use_rope=False` for NoPE.
- The teacher's q/k RMSNorms are copied and applied before RoPE, as in the teacher: per head (Qwen3,
  Gemma 3) or over the whole projection (OLMo 2). Where q/k/v/o live in each family (fused, Conv1D) and
  what a student does with softmax-only details (scales, soft-capping, sliding windows, no RoPE) is in
  `dtr_core/families.py`.
- Linear attention's output has no softmax normalisation, so each head's output goes through an
  RMSNorm before `o_proj`, as in GLA / Gated DeltaNet / JetBlock. Its weight starts at 1; distillation
  then rescales it once (`scale_output`) so the output matches the teacher's scale. The output gate
  (`MixerConfig.gate`) starts as exactly the identity: "sigmoid" is `2 * sigmoid(g)` with g = 0 at init;
  "swish_norm" is the published swish-gated RMSNorm `rmsnorm(o) * silu(g)` with g = 1.2785 at init
  (`silu(1.2785) = 1`).
- The published forms are the defaults (`MixerConfig`): the swish-gated RMSNorm output (`gate="swish_norm"`),
  `qk_activation="silu"` (SiLU on q/k, as published Gated DeltaNet) and `short_conv=True` (a causal
  depthwise convolution of width 4 on q, k and v, as fla's `ShortConvolution`, initialised to the identity;
  its last 3 inputs live in the decode cache); for JetBlock, `value_kernel="channel"` (a dynamic kernel per
  value channel instead of per head) is an option. Chosen by the held-out normalised loss of students of
  layers 3, 15 and 27 of SmolLM2-135M distilled together on BBC text (`dtr bench students`, 2-core CPU,
  docs/BENCHMARKS_STUDENTS.md), earlier defaults (sigmoid gate, no activation, no convolution) -> published:
      mixer            10K tokens per layer                   40K tokens per layer (the pipeline's default)
      gated DeltaNet   0.81 0.76 1.44 -> 0.84 0.61 0.44       0.61 0.42 0.67 -> 0.63 0.40 0.24
      GLA              0.78 1.55 1.79 -> 0.85 0.66 0.51       0.62 0.67 0.95 -> 0.69 0.46 0.35
      JetBlock         0.80 0.71 1.41 -> 0.83 0.60 0.42       0.59 0.39 0.65 -> 0.61 0.39 0.23
  The published forms cost 7 more aten ops per decoded token and layer (below: 84 -> 91 for gated DeltaNet,
  67 -> 74 for GLA, 100 -> 107 for JetBlock), and the same GEMMs.
- Decay gates start near "no decay" (per-step decay ~0.999); see each mixer.
- Padding: right padding is safe (causal: pads come after real tokens). Left padding is read from the
  `attention_mask` the decoder layer passes (`real_tokens`: HF's 2D padding mask, or the diagonal of its 4D
  boolean / additive mask) and a pad then contributes nothing: its q/k/v inputs are zeroed before the short
  convolution, its k and v are zero and its decay is the identity (log decay 0), so the state after a
  left-padded row, and the outputs at its real tokens, are those of the row run alone (tested). Outputs at
  pad positions are meaningless, as the teacher's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from dtr_core.families import HEAD, PROJECTION, get_family, teacher_projections, teacher_qk_norms
from dtr_core.mixers.state_cache import SHORT_CONV_STATE, conv_window, recurrent_layer
from dtr_core.ops.common import DEFAULT_CHUNK_SIZE

IMPLEMENTATIONS = ("chunk", "naive")
# 2: key/value heads at the teacher's count, one fused input projection. 1 (before): key/value heads
# expanded to the query heads, separate projections; such students and hybrids are refused (`from_dict`).
STUDENT_FORMAT = 2
GATES = ("sigmoid", "swish_norm")
QK_ACTIVATIONS = ("none", "silu")
VALUE_KERNELS = ("head", "channel")
SHORT_CONV_SIZE = 4  # width of the optional short convolution on q/k/v (fla's `ShortConvolution` default)
SWISH_IDENTITY = 1.278464542761074  # silu(x) = 1: the "swish_norm" gate's bias at init, so it starts as identity


def earlier_format_message(what: str, fix: str = "distil it again with the same `dtr convert` command") -> str:
    """The one line that refuses a student or hybrid saved by an earlier dtr, naming the fix."""
    return (f"{what} was saved by an earlier dtr (students with expanded key/value heads, student format 1; this "
            f"dtr reads format {STUDENT_FORMAT}); {fix}")


@dataclass(frozen=True)
class MixerConfig:
    use_rope: bool = True  # keep the teacher's rotary embedding on q/k (see module docstring)
    conv_size: int = 4  # JetBlock dynamic convolution width (Jet-Nemotron uses 4)
    value_kernel: str = "head"  # JetBlock: one dynamic kernel per key/value "head", or per value "channel"
    # The published forms are the defaults (module docstring: the held-out losses that chose them)
    gate: str = "swish_norm"  # output gate: "swish_norm" (rmsnorm(o) silu(g)) or "sigmoid" (2 sigmoid(g)); both start as identity
    qk_activation: str = "silu"  # "silu": SiLU on q and k, as published Gated DeltaNet; "none"
    short_conv: bool = True  # causal depthwise convolution (width 4) on q, k, v, as published GLA/GDN/JetBlock
    chunk_size: int = DEFAULT_CHUNK_SIZE  # chunk length of the chunked parallel form (PyTorch backend)
    backend: str = "auto"  # "auto": fla kernels on CUDA when installed, else PyTorch; or "torch" / "fla"
    student_format: int = STUDENT_FORMAT  # the weight layout a saved student was written in

    def __post_init__(self) -> None:
        if self.student_format != STUDENT_FORMAT:
            raise ValueError(earlier_format_message("this student") if self.student_format < STUDENT_FORMAT else
                             f"student format {self.student_format} is newer than this dtr's ({STUDENT_FORMAT}); "
                             f"update dtr")
        if self.conv_size < 1:
            raise ValueError(f"conv_size must be >= 1, got {self.conv_size}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.backend not in ("auto", "torch", "fla"):
            raise ValueError(f"backend must be one of auto, torch, fla; got '{self.backend}'")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {', '.join(GATES)}; got '{self.gate}'")
        if self.value_kernel not in VALUE_KERNELS:
            raise ValueError(f"value_kernel must be one of {', '.join(VALUE_KERNELS)}; got '{self.value_kernel}'")
        if self.qk_activation not in QK_ACTIVATIONS:
            raise ValueError(f"qk_activation must be one of {', '.join(QK_ACTIVATIONS)}; got '{self.qk_activation}'")

    def to_dict(self) -> dict:
        return asdict(self)

    def defining_dict(self) -> dict:
        """The fields that define the student's function (the student format included, so a student of another
        weight layout never matches): `chunk_size` and `backend` only choose how it is computed (the same
        result up to rounding), so a trained student stays valid when they change."""
        return {name: value for name, value in asdict(self).items() if name not in ("chunk_size", "backend")}

    @classmethod
    def from_dict(cls, values: dict | None) -> "MixerConfig":
        """A saved config (`to_dict`); None gives the defaults. A saved dict without `student_format` was
        written by an earlier dtr, whose students have another weight layout: ValueError naming the fix."""
        if values is None:
            return cls()
        if "student_format" not in values:
            raise ValueError(earlier_format_message("this student"))
        return cls(**values)


def attention_shape(config: PretrainedConfig) -> tuple[int, int, int]:
    """(hidden_size, num_heads, head_dim) of a decoder config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.hidden_size, heads, head_dim


def key_value_heads(config: PretrainedConfig) -> int:
    """The teacher's key/value head count (`num_attention_heads` without GQA)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if config.num_attention_heads % heads:
        raise ValueError(f"{config.num_attention_heads} attention heads are not a multiple of {heads} key/value heads")
    return heads


def projection_biases(config: PretrainedConfig) -> tuple[bool, bool]:
    """(q/k/v bias, o bias) as the family's attention has them."""
    fixed = get_family(config).projection_biases
    if fixed is not None:
        return fixed
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def norm_eps(config: PretrainedConfig) -> float:
    """The epsilon of the teacher's norms (RMSNorm or LayerNorm), used by the students' norms."""
    for name in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"):
        value = getattr(config, name, None)
        if value is not None:
            return value
    return 1e-6


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on `x: (B, T, H, D)` with HF's `cos, sin: (B, T, R)`, exactly as HF's `apply_rotary_pos_emb`: the
    first R channels of each head rotate, the rest (partial rotary, R < D) pass through."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return (x * cos) + (rotate_half(x) * sin)
    rotated, passed = x[..., :rotary], x[..., rotary:]
    return torch.cat([(rotated * cos) + (rotate_half(rotated) * sin), passed], dim=-1)


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


def real_tokens(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """(B, length) bool, True on the real (non-pad) tokens of the current `length` positions, or None when the
    mask shows no padding there. `attention_mask` is what an HF decoder layer passes its attention: None, a 2D
    padding mask (B, past + length) (1 = real), or a 4D mask (B, 1, length, kv) whose last `length` key columns
    are the current tokens, boolean (True = attend) or additive (0 = attend). A token is real iff it may attend
    to itself (the diagonal of the current block): a causal or sliding-window mask always allows that, a pad
    key is masked in every row. A single new token (a decoding step) is never a pad: None without reading the
    mask, so decoding runs no extra op."""
    if attention_mask is None or length == 1:
        return None
    if attention_mask.dim() == 2:
        real = attention_mask[:, -length:] != 0
    elif attention_mask.dim() == 4:
        block = attention_mask[:, 0, -length:, -length:]
        diagonal = block.diagonal(dim1=-2, dim2=-1)  # (B, length)
        real = diagonal if diagonal.dtype == torch.bool else diagonal == 0
    else:
        return None
    return None if bool(real.all()) else real


class LinearMixer(nn.Module):
    """Base class of the students; see the module docstring for the shared design."""

    name: str = ""

    def __init__(self, config: PretrainedConfig, layer_idx: int, mixer_config: MixerConfig | None = None):
        super().__init__()
        self.mixer_config = mixer_config or MixerConfig()
        self.layer_idx = layer_idx
        self.hidden_size, self.num_heads, self.head_dim = attention_shape(config)
        self.num_kv_heads = key_value_heads(config)
        self.groups = self.num_heads // self.num_kv_heads
        self.impl = "chunk"  # "naive": the per-token reference loop (tests); never a training flag
        _, o_bias = projection_biases(config)
        kv_width = self.num_kv_heads * self.head_dim
        # rows of the fused input projection, in order; q, k, v first so the short convolution reads one slice
        self.input_widths = {"q": self.num_heads * self.head_dim, "k": kv_width, "v": kv_width, "gate": kv_width,
                             **self.mixer_input_widths()}
        self.in_proj = nn.Linear(self.hidden_size, sum(self.input_widths.values()), bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=o_bias)
        family = get_family(config)
        self.family = family
        self.use_rope = self.mixer_config.use_rope and family.rope  # a family without RoPE: its students use none
        self.qk_norm = family.qk_norm  # None, "head" (over head_dim) or "projection" (over the whole q / k width)
        eps = norm_eps(config)
        if self.qk_norm == HEAD:
            self.q_norm = HeadRMSNorm(self.head_dim, eps=eps)
            self.k_norm = HeadRMSNorm(self.head_dim, eps=eps)
        elif self.qk_norm == PROJECTION:
            self.q_norm = HeadRMSNorm(self.input_widths["q"], eps=eps)
            self.k_norm = HeadRMSNorm(self.input_widths["k"], eps=eps)
        self.o_norm = HeadRMSNorm(self.head_dim, eps=eps)
        if self.mixer_config.short_conv:
            kernel = torch.zeros(self.qkv_width, SHORT_CONV_SIZE)
            kernel[:, -1] = 1.0  # tap on the current token: the convolution starts as the identity
            self.short_conv = nn.Parameter(kernel)  # (channels of q, k, v; width), depthwise
        with torch.no_grad():
            nn.init.zeros_(self.in_proj.bias)
            self.in_proj.weight[self.input_rows("gate")].zero_()
            if self.mixer_config.gate == "swish_norm":
                self.in_proj.bias[self.input_rows("gate")].fill_(SWISH_IDENTITY)

    def mixer_input_widths(self) -> dict[str, int]:
        """The mixer's own rows of `in_proj` (name -> width), read by `mix` from `inputs[name]`."""
        return {}

    @property
    def qkv_width(self) -> int:
        return self.input_widths["q"] + self.input_widths["k"] + self.input_widths["v"]

    def input_rows(self, name: str) -> slice:
        """The rows of `in_proj.weight` (and entries of its bias) that compute input `name`."""
        start = 0
        for key, width in self.input_widths.items():
            if key == name:
                return slice(start, start + width)
            start += width
        raise KeyError(name)

    # --- initialisation from the teacher ---------------------------------------------------------

    @torch.no_grad()
    def copy_from_teacher(self, teacher_attention: nn.Module) -> None:
        """Copy q/k/v into their rows of `in_proj`, o into `o_proj` (and the q/k norms) from the teacher attention,
        wherever its family keeps them (`dtr_core.families.teacher_projections`)."""
        projections = teacher_projections(self.family, teacher_attention, self.num_heads, self.num_kv_heads,
                                          self.head_dim)
        for name in ("q", "k", "v"):
            (weight, source_bias), rows = projections[name], self.input_rows(name)
            target = self.in_proj.weight[rows]
            if weight.shape != target.shape:
                raise ValueError(f"teacher {name} projection is {tuple(weight.shape)}; this student expects "
                                 f"{tuple(target.shape)} ({self.num_heads} heads, {self.num_kv_heads} key/value heads)")
            target.copy_(weight)
            bias = self.in_proj.bias[rows]
            bias.copy_(source_bias) if source_bias is not None else bias.zero_()
            torch.testing.assert_close(self.in_proj.weight[rows], weight, rtol=0, atol=0)
        weight, bias = projections["o"]
        if (bias is None) != (self.o_proj.bias is None):
            raise ValueError(f"teacher output projection {'has no' if bias is None else 'has a'} bias; this student's "
                             f"family entry says otherwise (projection_biases in dtr_core/families.py)")
        self.o_proj.weight.copy_(weight)
        if bias is not None:
            self.o_proj.bias.copy_(bias)
        norms = teacher_qk_norms(self.family, teacher_attention)
        if norms is not None:
            self.q_norm.weight.copy_(norms[0])
            self.k_norm.weight.copy_(norms[1])

    @torch.no_grad()
    def scale_output(self, factor: float) -> None:
        """Multiply the layer's output by `factor` (exactly: the output is linear in the output norm's weight)."""
        self.o_norm.weight.mul_(factor)

    # --- forward ---------------------------------------------------------------------------------

    def short_convolution(self, qkv: torch.Tensor, layer_cache) -> torch.Tensor:
        """Causal depthwise convolution of the q/k/v channels: (B, T, C) -> (B, T, C); the last
        `SHORT_CONV_SIZE - 1` inputs are kept in the cache's conv state `SHORT_CONV_STATE`."""
        padded = conv_window(layer_cache, qkv.transpose(1, 2), SHORT_CONV_STATE, SHORT_CONV_SIZE)  # (B, C, 3 + T)
        out = F.conv1d(padded, self.short_conv.unsqueeze(1), groups=qkv.shape[-1])  # (B, C, T)
        return out.transpose(1, 2).contiguous()

    def project(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor] | None, layer_cache,
        real: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One GEMM, then q (B, T, H, D), k and v (B, T, H_kv, D), the output gate's logits (B, T, H_kv * D)
        and the mixer's own inputs {name: (B, T, width)}. `real` (B, T) bool (`real_tokens`): q/k/v inputs, k and
        v are zero on the pads (so neither the short convolution nor the state sees them).

        On q/k, in order: the short convolution (option), the teacher's q/k norms (Qwen3, Gemma 3, OLMo 2), SiLU
        (option), RoPE (as the teacher: after its norms), the mixer's feature map (`qk_features`)."""
        batch, length, _ = hidden_states.shape
        projected = self.in_proj(hidden_states)  # (B, T, sum of input widths)
        qkv_width, qk_width = self.qkv_width, self.input_widths["q"] + self.input_widths["k"]
        qkv = projected[..., :qkv_width]
        if real is not None:
            qkv = qkv * real.unsqueeze(-1).to(qkv.dtype)
        if self.mixer_config.short_conv:
            qkv = self.short_convolution(qkv, layer_cache)
        names = list(self.input_widths)[3:]
        inputs = dict(zip(names, projected[..., qkv_width:].split([self.input_widths[n] for n in names], dim=-1)))
        # q and k side by side as one (B, T, H + H_kv, D) view: activation, RoPE and features run once
        qk = qkv[..., :qk_width]
        if self.qk_norm == PROJECTION:
            q, k = qk.split([self.input_widths["q"], self.input_widths["k"]], dim=-1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=-1)
        qk = qk.view(batch, length, -1, self.head_dim)
        if self.qk_norm == HEAD:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        if self.mixer_config.qk_activation == "silu":
            qk = F.silu(qk)
        if self.use_rope:
            if position_embeddings is None:
                raise ValueError("use_rope=True needs position_embeddings (cos, sin) from the decoder")
            cos, sin = position_embeddings
            qk = apply_rope(qk, cos, sin)
        q, k = self.qk_features(qk).split([self.num_heads, self.num_kv_heads], dim=2)
        v = qkv[..., qk_width:].view(batch, length, self.num_kv_heads, self.head_dim)
        if real is not None:
            keep = real.view(batch, length, 1, 1).to(k.dtype)
            k, v = k * keep, v * keep  # whatever the q/k path does to a zero input, a pad writes nothing
        return q, k, v, inputs["gate"], inputs

    def qk_features(self, qk: torch.Tensor) -> torch.Tensor:
        """The mixer's feature map on q and k together, (B, T, H + H_kv, D); the identity here."""
        return qk

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if cache is None:  # the decoder layer's name for it: GPT-NeoX passes `layer_past`
            cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
        batch, length, _ = hidden_states.shape
        layer_cache = recurrent_layer(cache, self.layer_idx) if cache is not None else None
        real = real_tokens(attention_mask, length)
        q, k, v, gate, inputs = self.project(hidden_states, position_embeddings, layer_cache, real)
        state = None
        if layer_cache is not None and layer_cache.is_recurrent_states_initialized[0]:
            state = layer_cache.recurrent_states[0]
        o, new_state = self.mix(q, k, v, inputs, state, layer_cache, real)  # o: (B, T, H, D)
        if layer_cache is not None:
            layer_cache.update_recurrent_state(new_state)
            layer_cache.seen_tokens = getattr(layer_cache, "seen_tokens", 0) + length
        # one gate per key/value channel, shared by the group's query heads: (B, T, H_kv, 1, D)
        gate = gate.view(batch, length, self.num_kv_heads, 1, self.head_dim)
        gate = F.silu(gate) if self.mixer_config.gate == "swish_norm" else 2.0 * torch.sigmoid(gate)
        o = self.o_norm(o.view(batch, length, self.num_kv_heads, self.groups, self.head_dim)) * gate
        return self.o_proj(o.reshape(batch, length, -1)), None

    def mix(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        state: torch.Tensor | None,
        layer_cache=None,
        real: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token mixing: q (B, T, H, D), k and v (B, T, H_kv, D), the mixer's own `inputs` {name: (B, T, width)}
        -> (output (B, T, H, D), final state (B, H_kv, D, D)). On pads (`real` False) k and v are already zero;
        the mixer makes its decay the identity there."""
        raise NotImplementedError

    def state_bytes(self, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the fixed-size state this layer keeps while decoding.

        The recurrent state (B, H_kv, D, D) is always kept in float32 (the ops accumulate in float32, whatever
        the model dtype); `dtype` is the model's dtype, that of the convolution states (the short convolution's
        last `SHORT_CONV_SIZE - 1` q/k/v inputs, JetBlock's last values).
        """
        total = batch_size * self.num_kv_heads * self.head_dim * self.head_dim * 4
        if self.mixer_config.short_conv:
            element = torch.empty((), dtype=dtype).element_size()
            total += batch_size * self.qkv_width * (SHORT_CONV_SIZE - 1) * element
        return total


def inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))
