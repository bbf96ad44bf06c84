"""The cost model behind the "ideal" speed-ups of `benchmarks.inference`: FLOPs and bytes moved per token.

One sequence (batch 1); parameter counts are read from the real modules (teacher attention, a fresh student,
the rest of the model). Decode at batch 1 is memory-bound, so its ideal speed-up is the bytes ratio; prefill is
compute-bound, so its ideal is the FLOPs ratio. The formulas and why: docs/BENCHMARKS_INFERENCE.md, "Cost model".
A sliding-window layer (Gemma 2/3 `layer_types`) that keeps softmax attention holds and reads at most
`sliding_window - 1` cached positions, so replacing it saves less than replacing a global layer;
`replacement_savings` gives, per layer, what replacing it alone would save.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from benchmarks.harness import interleave, timed
from dtr_core.families import layer_type
from dtr_core.hybrid.surgery import attention_module, num_layers
from dtr_core.ops.common import DEFAULT_CHUNK_SIZE

FULL = "full"
STEP_FLOPS_PER_HD2 = 7  # gated delta rule step: decay (1) + S^T k (2) + rank-1 update (2) + S^T q (2), per H D^2


@dataclass(frozen=True)
class ModelProfile:
    """What the cost model needs to know about a model and its students."""

    num_layers: int
    heads: int
    kv_heads: int
    head_dim: int
    element_bytes: int  # weights and KV cache
    rest_params: int  # per-token weights outside attention: MLPs, norms, LM head, + one embedding row
    lm_head_params: int
    embedding_row: int  # hidden size: the embedding lookup reads one row and does no FLOPs
    full_attention_params: int  # one teacher attention module
    linear_params: int  # one student module
    linear_state_bytes: int  # one student's decoding state (recurrent + conv), batch 1
    mixer: str
    chunk_size: int
    conv_size: int  # JetBlock's value-convolution width, 0 for mixers without one
    sliding_window: int | None = None  # the KV window of the sliding-window layers
    sliding_layers: tuple[int, ...] = ()  # layers whose softmax attention keeps at most `sliding_window - 1` positions

    def to_dict(self) -> dict:
        return asdict(self)

    def kv_positions(self, layer: int, context: int) -> int:
        """Positions layer `layer` holds in its KV cache (and reads per decoded token) at `context` tokens."""
        if layer in self.sliding_layers and self.sliding_window:
            return min(context, self.sliding_window - 1)
        return context


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def profile_model(teacher: PreTrainedModel, student: nn.Module) -> ModelProfile:
    """Profile from the teacher and one student (as built by `dtr_core.mixers.build_student`)."""
    config = teacher.config
    layers = [attention_module(teacher, index) for index in range(num_layers(teacher))]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    element = next(teacher.parameters()).element_size()
    attention = sum(_params(layer) for layer in layers)
    embedding = teacher.get_input_embeddings().weight
    lm_head = teacher.get_output_embeddings()
    lm_head_params = _params(lm_head)
    tied = lm_head.weight.data_ptr() == embedding.data_ptr()
    unique = _params(teacher)  # parameters() yields tied tensors once
    rest = unique - attention - embedding.numel() + (lm_head_params if tied else 0) + config.hidden_size
    mixer_config = getattr(student, "mixer_config", None)
    return ModelProfile(
        num_layers=len(layers), heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim, element_bytes=element, rest_params=rest, lm_head_params=lm_head_params,
        embedding_row=config.hidden_size, full_attention_params=_params(layers[0]),
        linear_params=_params(student), linear_state_bytes=student.state_bytes(1, next(teacher.parameters()).dtype),
        mixer=student.name, chunk_size=mixer_config.chunk_size if mixer_config is not None else DEFAULT_CHUNK_SIZE,
        conv_size=mixer_config.conv_size if (mixer_config is not None and hasattr(student, "kernel_up")) else 0,
        sliding_window=getattr(config, "sliding_window", None),
        sliding_layers=tuple(index for index in range(len(layers))
                             if layer_type(config, index) == "sliding_attention"))


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes


def _check(kinds: list[str], profile: ModelProfile) -> None:
    if len(kinds) != profile.num_layers:
        raise ValueError(f"{len(kinds)} layer kinds for a {profile.num_layers}-layer model")


def kv_bytes_per_layer(profile: ModelProfile, context: int) -> int:
    """K and V of one full-attention layer holding `context` tokens (batch 1)."""
    return 2 * context * profile.kv_heads * profile.head_dim * profile.element_bytes


def cache_bytes(profile: ModelProfile, kinds: list[str], context: int) -> int:
    """Decoding cache: K/V of every full layer (a sliding-window one: its window) + the constant state of every
    linear layer."""
    _check(kinds, profile)
    return sum(kv_bytes_per_layer(profile, profile.kv_positions(layer, context)) if kind == FULL
               else profile.linear_state_bytes for layer, kind in enumerate(kinds))


def decode_cost(profile: ModelProfile, kinds: list[str], context: int, kv_append: str = "static") -> Cost:
    """FLOPs and bytes of one decoded token at `context` tokens in the cache.

    kv_append: "static" (ideal: append in place) or "concat" (`torch.cat`: read + rewrite all of K/V).
    """
    _check(kinds, profile)
    if kv_append not in ("static", "concat"):
        raise ValueError(f"kv_append must be 'static' or 'concat', got {kv_append!r}")
    p, e = profile, profile.element_bytes
    total = Cost(2.0 * (p.rest_params - p.embedding_row), float(p.rest_params * e))
    new_kv = kv_bytes_per_layer(p, 1)
    for layer, kind in enumerate(kinds):
        if kind == FULL:
            held = p.kv_positions(layer, context)
            kv = kv_bytes_per_layer(p, held)
            moved = p.full_attention_params * e + kv + new_kv
            if kv_append == "concat":
                moved += kv + (kv + new_kv)  # torch.cat reads the old K/V and writes old + new
            total += Cost(2.0 * p.full_attention_params + 4.0 * held * p.heads * p.head_dim, float(moved))
        else:
            step = STEP_FLOPS_PER_HD2 * p.heads * p.head_dim**2 + 2 * p.heads * p.head_dim * p.conv_size
            total += Cost(2.0 * p.linear_params + step, float(p.linear_params * e + 2 * p.linear_state_bytes))
    return total


def prefill_cost(profile: ModelProfile, kinds: list[str], context: int) -> Cost:
    """FLOPs (and weight bytes) of a prefill of `context` tokens, logits for the last token only."""
    _check(kinds, profile)
    p, t, e = profile, context, profile.element_bytes
    c, d, h = p.chunk_size, p.head_dim, p.heads
    body = p.rest_params - p.embedding_row - p.lm_head_params
    total = Cost(2.0 * body * t + 2.0 * p.lm_head_params, float(p.rest_params * e))
    for layer, kind in enumerate(kinds):
        if kind == FULL:
            # query i attends to min(i, window) keys: sum over i = t (t + 1) / 2 without a window
            window = p.sliding_window if layer in p.sliding_layers and p.sliding_window else t
            attended = t * (t + 1) / 2 if t <= window else window * (window + 1) / 2 + (t - window) * window
            flops = 2.0 * p.full_attention_params * t + 4.0 * h * d * attended
            total += Cost(flops, float(p.full_attention_params * e + kv_bytes_per_layer(p, p.kv_positions(layer, t))))
        else:
            chunked = h * t * (10 * c * d + c * c + 6 * d * d) + 2 * h * d * p.conv_size * t
            total += Cost(2.0 * p.linear_params * t + chunked, float(p.linear_params * e + p.linear_state_bytes))
    return total


def replacement_savings(profile: ModelProfile, kinds: list[str], context: int) -> list[dict]:
    """For each layer still full in `kinds`: what replacing it alone would save per decoded token at `context`
    (bytes moved, FLOPs) and in the cache; a sliding-window layer saves less (its KV is bounded). For logs."""
    _check(kinds, profile)
    base_decode, base_cache = decode_cost(profile, kinds, context), cache_bytes(profile, kinds, context)
    savings = []
    for layer, kind in enumerate(kinds):
        if kind != FULL:
            continue
        replaced = [*kinds[:layer], profile.mixer, *kinds[layer + 1:]]
        decode = decode_cost(profile, replaced, context)
        savings.append({
            "layer": layer,
            "sliding_window": layer in profile.sliding_layers,
            "decode_bytes_saved": base_decode.bytes - decode.bytes,
            "decode_flops_saved": base_decode.flops - decode.flops,
            "cache_bytes_saved": base_cache - cache_bytes(profile, replaced, context),
        })
    return savings


def ideal_decode_speedup(profile: ModelProfile, kinds: list[str], context: int, kv_append: str = "static") -> float:
    """bytes(teacher) / bytes(hybrid) per decoded token (decode is memory-bound: see the module docstring)."""
    teacher = [FULL] * profile.num_layers
    hybrid = decode_cost(profile, kinds, context, kv_append)
    return decode_cost(profile, teacher, context, kv_append).bytes / hybrid.bytes


def ideal_prefill_speedup(profile: ModelProfile, kinds: list[str], context: int) -> float:
    """FLOPs(teacher) / FLOPs(hybrid) for a prefill (compute-bound)."""
    teacher = [FULL] * profile.num_layers
    return prefill_cost(profile, teacher, context).flops / prefill_cost(profile, kinds, context).flops


# --- the machine's balance point -------------------------------------------------------------------


def _best_of(fn, repeats: int, device: str = "cpu") -> float:
    """Median wall time of `repeats` calls after one warm-up call."""
    return interleave({"fn": lambda: timed(fn, device)}, repeats, warmup=1)["fn"].median


@torch.inference_mode()
def measure_machine_balance(size_mb: int = 256, gemm_n: int = 1024, repeats: int = 5, device: str = "cpu") -> dict:
    """Memory bandwidth and matmul throughput of this process (its torch threads) or GPU, median of `repeats`.

    - `read_gbps`: `x.sum()` over a `size_mb` float32 buffer (streams memory, ~1 FLOP per 4 bytes);
    - `matvec_gbps`: weight bytes per second of a float32 matrix-vector product (what decode does per layer);
    - `gemm_gflops`: `n x n` float32 matmul (2 n^3 FLOPs);
    - `balance_flop_per_byte`: gemm_gflops / read_gbps; kernels with fewer FLOPs per byte are memory-bound.
    """
    n = size_mb * 2**20 // 4
    x = torch.rand(n, device=device)
    read_s = _best_of(lambda: x.sum(), repeats, device)
    side = int((size_mb * 2**20 // 4) ** 0.5)
    w, v = torch.rand(side, side, device=device), torch.rand(side, device=device)
    mv_s = _best_of(lambda: torch.mv(w, v), repeats, device)
    a, b = torch.rand(gemm_n, gemm_n, device=device), torch.rand(gemm_n, gemm_n, device=device)
    mm_s = _best_of(lambda: torch.mm(a, b), repeats, device)
    read_gbps = n * 4 / read_s / 1e9
    gemm_gflops = 2 * gemm_n**3 / mm_s / 1e9
    return {
        "threads": torch.get_num_threads(),
        "read_gbps": read_gbps,
        "matvec_gbps": side * side * 4 / mv_s / 1e9,
        "gemm_gflops": gemm_gflops,
        "balance_flop_per_byte": gemm_gflops / read_gbps,
        "buffer_mb": size_mb,
        "gemm_n": gemm_n,
    }
