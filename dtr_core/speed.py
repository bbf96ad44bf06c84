"""Inference speed of a model (teacher or hybrid) at a given context: prefill latency, decode rate, cache size.

What is measured (batch 1 by default, `torch.inference_mode`, the model's own device and dtype):
- prefill: one forward over `context_len` random tokens with `use_cache=True` and `logits_to_keep=1`
  (a real prompt's cost: the cache is built, only the last position's logits are computed);
- decode: `decode_tokens` single-token forwards, each feeding back the argmax of the previous step and
  extending the cache left by the prefill; reported as tokens per second and milliseconds per token;
- cache size: `dtr_core.hybrid.model.cache_bytes(model, context_len)`, K and V of every full layer plus the
  fixed state of every linear layer (computed, not measured: it is exact).

A short warm-up forward runs first (allocator and kernel selection), and the median of `repeats`
measurements is reported. Timings depend on what else runs on the machine: compare models measured
in the same process with `measure_speeds`, which interleaves their repeats, never numbers from
different runs.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel

from dtr_core.hybrid.model import cache_bytes

logger = logging.getLogger(__name__)

__all__ = ["SpeedResult", "measure_speed", "measure_speeds", "speedup"]

WARMUP_TOKENS = 16  # enough to trigger every code path (prefill + one decode step) at negligible cost


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
) -> dict[str, SpeedResult]:
    """`measure_speed` of several models, {label: model} -> {label: result}, their repeats interleaved:
    round r measures every model once, in order, so a drift in the machine's speed (other jobs, other
    tenants) reaches all of them alike and their ratios hold up. Every model sees the same tokens."""
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
    return {label: _result(models[label], label_runs, context_len, decode_tokens, batch_size)
            for label, label_runs in runs.items()}


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


def speedup(baseline: SpeedResult | dict, other: SpeedResult | dict) -> dict[str, float]:
    """`other` relative to `baseline`: prefill and decode speedups (> 1 is faster), cache reduction (0..1)."""
    base = baseline.to_dict() if isinstance(baseline, SpeedResult) else baseline
    new = other.to_dict() if isinstance(other, SpeedResult) else other
    return {
        "prefill_speedup": base["prefill_seconds"] / new["prefill_seconds"],
        "decode_speedup": new["decode_tokens_per_second"] / base["decode_tokens_per_second"],
        "cache_reduction": 1.0 - new["cache_bytes"] / base["cache_bytes"],
    }
