"""Inference speed of a model (teacher or hybrid) at a given context: prefill latency, decode rate, cache size.

What is measured (batch 1 by default, `torch.inference_mode`, the model's own device and dtype):
- prefill: one forward over `context_len` random tokens with `use_cache=True` and `logits_to_keep=1`
  (a real prompt's cost: the cache is built, only the last position's logits are computed);
- decode: `decode_tokens` single-token forwards, each feeding back the argmax of the previous step and
  extending the cache left by the prefill; reported as tokens per second and milliseconds per token;
- cache size: `dtr_core.hybrid.model.cache_bytes(model, context_len)`, K and V of every full layer plus the
  fixed state of every linear layer (computed, not measured: it is exact);
- with `long_context_len` (e.g. 32K): the decode rate from a synthetic cache of that many tokens
  (`synthetic_cache`: the structure of a real prefill, random K/V and states, which cost what real ones
  cost), and that cache's bytes. Seconds instead of a 32K-token prefill, and where a hybrid's gain shows:
  the KV cache a full layer reads per token grows with the context, a linear layer's state does not
  (a sliding-window layer's stops growing at its window);
- `replacement_savings(model, context_len)`: per softmax layer, the cache bytes replacing it alone would save
  at `context_len` (less on a sliding-window layer, whose KV is bounded), for reports and logs.

A short warm-up forward runs first (allocator and kernel selection), and the median of `repeats`
measurements is reported. Timings depend on what else runs on the machine: compare models measured
in the same process with `measure_speeds`, which interleaves their repeats, never numbers from
different runs.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel

from dtr_core.families import layer_type
from dtr_core.hybrid.model import cache_bytes, kv_positions
from dtr_core.hybrid.surgery import attention_module, num_layers
from dtr_core.mixers import LinearMixer, build_student

logger = logging.getLogger(__name__)

__all__ = ["SpeedResult", "cache_nbytes", "decode", "measure_long_decode", "measure_speed", "measure_speeds",
           "replacement_savings", "rewind", "speedup", "synthetic_cache"]

WARMUP_TOKENS = 16  # enough to trigger every code path (prefill + one decode step) at negligible cost
STRUCTURE_PROMPT = 8  # tokens of the real prefill that gives a synthetic cache its exact structure
STATE_SCALE = 0.02  # random linear states are small, like trained ones; values do not change the cost


@dataclass(frozen=True)
class SpeedResult:
    """Speed of one model at one context length (JSON-able via `to_dict`)."""

    context_len: int
    decode_tokens: int
    batch_size: int
    prefill_seconds: float  # median wall time of one prefill of `context_len` tokens
    prefill_tokens_per_second: float
    decode_tokens_per_second: float  # per sequence: generated tokens / decode wall time
    decode_ms_per_token: float
    cache_bytes: int  # decoding cache at `context_len` (KV of full layers + fixed linear states)
    threads: int  # torch intra-op threads used
    long_context_len: int | None = None  # the synthetic cache's length, when measured
    long_decode_tokens_per_second: float | None = None  # decode rate from that cache
    long_cache_bytes: int | None = None  # and its bytes

    def to_dict(self) -> dict:
        return asdict(self)


def _random_tokens(vocab_size: int, length: int, batch_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, length), generator=generator)  # (B, T)


@torch.inference_mode()
def _prefill_and_decode(model: PreTrainedModel, tokens: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) for one prompt."""
    start = time.perf_counter()
    output = model(input_ids=tokens, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    cache = output.cache
    next_token = output.logits[:, -1:].argmax(dim=-1)  # (B, 1)
    start = time.perf_counter()
    for _ in range(decode_tokens):
        output = model(input_ids=next_token, cache=cache, use_cache=True)
        cache = output.cache
        next_token = output.logits[:, -1:].argmax(dim=-1)
    decode = time.perf_counter() - start
    return prefill, decode


def measure_speed(
    model: PreTrainedModel,
    context_len: int = 2048,
    decode_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 1,
    seed: int = 0,
) -> SpeedResult:
    """Prefill latency and decode rate of `model` at `context_len` (see the module docstring)."""
    return measure_speeds({"model": model}, context_len, decode_tokens, batch_size, repeats, seed)["model"]


def measure_speeds(
    models: Mapping[str, PreTrainedModel],
    context_len: int = 2048,
    decode_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 1,
    seed: int = 0,
    long_context_len: int | None = None,
) -> dict[str, SpeedResult]:
    """`measure_speed` of several models, {label: model} -> {label: result}, their repeats interleaved:
    round r measures every model once, in order, so a drift in the machine's speed (other jobs, other
    tenants) reaches all of them alike and their ratios hold up. Every model sees the same tokens.
    With `long_context_len`, also the decode rate from a synthetic cache of that length (module docstring)."""
    if context_len < 1 or decode_tokens < 1 or batch_size < 1 or repeats < 1:
        raise ValueError(f"context_len, decode_tokens, batch_size and repeats must be >= 1, got "
                         f"{context_len}, {decode_tokens}, {batch_size}, {repeats}")
    for label, model in models.items():
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and context_len + decode_tokens > limit:
            raise ValueError(f"context_len + decode_tokens = {context_len + decode_tokens} exceeds {label}'s "
                             f"max_position_embeddings ({limit}); use a shorter context")
    was_training = {label: model.training for label, model in models.items()}
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in models}
    try:
        tokens = {}
        for label, model in models.items():
            model.eval()
            device = next(model.parameters()).device
            warmup = _random_tokens(model.config.vocab_size, min(WARMUP_TOKENS, context_len), batch_size, seed + 1)
            _prefill_and_decode(model, warmup.to(device), 1)
            tokens[label] = _random_tokens(model.config.vocab_size, context_len, batch_size, seed).to(device)
        for _ in range(repeats):
            for label, model in models.items():
                runs[label].append(_prefill_and_decode(model, tokens[label], decode_tokens))
    finally:
        for label, model in models.items():
            model.train(was_training[label])
    results = {label: _result(models[label], label_runs, context_len, decode_tokens, batch_size)
               for label, label_runs in runs.items()}
    if long_context_len is not None:
        long = measure_long_decode(models, long_context_len, decode_tokens, repeats, seed)
        results = {label: dataclasses.replace(result, long_context_len=long_context_len,
                                              long_decode_tokens_per_second=long[label][0],
                                              long_cache_bytes=long[label][1])
                   for label, result in results.items()}
    return results


@torch.inference_mode()
def measure_long_decode(models: Mapping[str, PreTrainedModel], context_len: int, decode_tokens: int,
                        repeats: int = 1, seed: int = 0) -> dict[str, tuple[float, int]]:
    """{label: (decode tokens/s, cache bytes)} from a synthetic `context_len`-token cache (batch 1), the models'
    repeats interleaved and the median kept. Positions past a model's `max_position_embeddings` are fine here:
    the cost of a decoding step does not depend on the values."""
    if context_len < 1:
        raise ValueError(f"long_context_len must be >= 1, got {context_len}")
    generator = torch.Generator().manual_seed(seed)
    caches, sizes, tokens, seconds = {}, {}, {}, {label: [] for label in models}
    for label, model in models.items():
        model.eval()
        caches[label] = synthetic_cache(model, context_len, generator)
        sizes[label] = cache_nbytes(caches[label])  # before decoding grows the K/V storages
        tokens[label] = torch.zeros(1, 1, dtype=torch.long, device=model.device)
        decode(model, caches[label], tokens[label], 1)  # warm-up at this length
        rewind(caches[label], context_len)
    for _ in range(repeats):
        for label, model in models.items():
            start = time.perf_counter()
            decode(model, caches[label], tokens[label], decode_tokens)
            seconds[label].append(time.perf_counter() - start)
            rewind(caches[label], context_len)
    return {label: (decode_tokens / statistics.median(seconds[label]), sizes[label]) for label in models}


def _result(model: PreTrainedModel, runs: list[tuple[float, float]], context_len: int, decode_tokens: int,
            batch_size: int) -> SpeedResult:
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    result = SpeedResult(
        context_len=context_len,
        decode_tokens=decode_tokens,
        batch_size=batch_size,
        prefill_seconds=prefill,
        prefill_tokens_per_second=context_len * batch_size / prefill,
        decode_tokens_per_second=decode_tokens / decode,
        decode_ms_per_token=1000.0 * decode / decode_tokens,
        cache_bytes=cache_bytes(model, context_len, batch_size),
        threads=torch.get_num_threads(),
    )
    logger.info("speed at %d tokens: prefill %.2fs (%.0f tok/s), decode %.1f tok/s, cache %.1f MB",
                context_len, prefill, result.prefill_tokens_per_second, result.decode_tokens_per_second,
                result.cache_bytes / 2**20)
    return result


# --- decoding from a long synthetic cache -------------------------------------------------------------

def cache_nbytes(cache) -> int:
    """Bytes of the storages the cache's tensors hold (K/V, conv and recurrent states), each storage once."""
    tensors = [getattr(layer, name, None) for layer in cache.layers for name in ("keys", "values")]
    tensors += [t for layer in cache.layers for name in ("conv_states", "recurrent_states")
                for t in (getattr(layer, name, None) or {}).values()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in tensors if isinstance(t, torch.Tensor)}.values())


def _is_kv_layer(layer) -> bool:
    return isinstance(getattr(layer, "keys", None), torch.Tensor)


def synthetic_cache(model, context: int, generator: torch.Generator):
    """A cache exactly as a `context`-token prefill leaves it (a real short prefill gives its classes, dtypes and
    shapes), with random K/V (one pair, cloned per layer) and random linear states: decode cost ignores values."""
    device = model.device
    prompt = torch.randint(0, model.config.vocab_size, (1, STRUCTURE_PROMPT), generator=generator).to(device)
    cache = model(prompt, use_cache=True, logits_to_keep=1).cache
    keys = values = None
    for layer in cache.layers:
        if _is_kv_layer(layer):
            # a sliding-window layer holds its last `sliding_window - 1` positions, whatever the context
            held = min(context, layer.sliding_window - 1) if hasattr(layer, "sliding_window") else context
            if keys is None:
                batch, kv_heads, _, head_dim = layer.keys.shape
                shape = (batch, kv_heads, context, head_dim)
                keys = torch.randn(shape, generator=generator, dtype=layer.keys.dtype).to(device)
                values = torch.randn(shape, generator=generator, dtype=layer.values.dtype).to(device)
                if held < context:  # its own storage, of its own size
                    layer.keys, layer.values = keys[..., :held, :].clone(), values[..., :held, :].clone()
                else:
                    layer.keys, layer.values = keys, values
            else:
                layer.keys, layer.values = keys[..., :held, :].clone(), values[..., :held, :].clone()
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = context
        else:
            for states in (layer.conv_states, layer.recurrent_states):
                for index, tensor in states.items():
                    if tensor is not None:
                        random = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
                        tensor.copy_(random * STATE_SCALE)  # copy_ moves it to the state's device
            if hasattr(layer, "seen_tokens"):
                layer.seen_tokens = context
    if cache.get_seq_length() != context:
        raise RuntimeError(f"synthetic cache reports {cache.get_seq_length()} tokens, expected {context}")
    return cache


def rewind(cache, context: int) -> None:
    """Drop the tokens decoded after `context` from the K/V layers (linear states keep their constant size)."""
    for layer in cache.layers:
        if _is_kv_layer(layer) and hasattr(layer, "cumulative_length"):  # sliding window: same size, other tokens
            layer.cumulative_length = context
        elif _is_kv_layer(layer):
            layer.keys = layer.keys[..., :context, :]
            layer.values = layer.values[..., :context, :]
        elif hasattr(layer, "seen_tokens"):
            layer.seen_tokens = context


def decode(model, cache, token: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` greedy decoding steps (batch 1) from `cache`; returns the last token."""
    for _ in range(steps):
        logits = model(token, cache=cache, use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
    return token


def speedup(baseline: SpeedResult | dict, other: SpeedResult | dict) -> dict[str, float]:
    """`other` relative to `baseline`: prefill and decode speedups (> 1 is faster), cache reduction (0..1), and
    the long-context decode speedup when both were measured there."""
    base = baseline.to_dict() if isinstance(baseline, SpeedResult) else baseline
    new = other.to_dict() if isinstance(other, SpeedResult) else other
    ratios = {
        "prefill_speedup": base["prefill_seconds"] / new["prefill_seconds"],
        "decode_speedup": new["decode_tokens_per_second"] / base["decode_tokens_per_second"],
        "cache_reduction": 1.0 - new["cache_bytes"] / base["cache_bytes"],
    }
    if base.get("long_decode_tokens_per_second") and new.get("long_decode_tokens_per_second"):
        ratios["long_decode_speedup"] = new["long_decode_tokens_per_second"] / base["long_decode_tokens_per_second"]
    return ratios


def replacement_savings(model: PreTrainedModel, context_len: int, mixer: str = "gated_deltanet",
                        batch_size: int = 1) -> list[dict]:
    """For each layer that still has softmax attention: the decoding-cache bytes that replacing it alone by a
    `mixer` student would save at `context_len` (its K/V minus the student's fixed state; a sliding-window
    layer's K/V is at most its window, so it saves less)."""
    dtype = next(model.parameters()).dtype
    element = torch.empty((), dtype=dtype).element_size()
    savings = []
    for index in range(num_layers(model)):
        attention = attention_module(model, index)
        if isinstance(attention, LinearMixer):
            continue
        with torch.device("meta"):  # only its shapes are read
            state = build_student(mixer, model.config, index).state_bytes(batch_size, dtype)
        kv = 2 * batch_size * _kv_width(model) * kv_positions(model.config, index, context_len) * element
        savings.append({"layer": index, "layer_type": layer_type(model.config, index), "kv_bytes": kv,
                        "cache_bytes_saved": kv - state})
    return savings


def _kv_width(model: PreTrainedModel) -> int:
    from dtr_core.mixers.base import attention_shape, key_value_heads

    return key_value_heads(model.config) * attention_shape(model.config)[2]
