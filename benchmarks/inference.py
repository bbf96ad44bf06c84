"""Inference speed and memory of DtR hybrids against their teacher; method and reading in
docs/BENCHMARKS_INFERENCE.md.

The teacher and hybrids with k = floor(f L) of its L layers linear (fresh students; the layers in the order of a
greedy result with `--layers-from`, else evenly interleaved) run in one process at batch 1. Per context T:
prefill time (up to `--prefill-max`), decode tokens/s from a synthetic T-token cache, the cache's bytes (checked
equal to `benchmarks.cost_model.cache_bytes` and `dtr_core.hybrid.model.cache_bytes`) and peak memory. The models are
timed interleaved (`harness.interleave`); speed-ups are ratios of medians to the teacher in the same run, beside
the cost model's ideal. `--device cuda`: bfloat16 on the GPU, contexts to 64K, all prefilled, fla kernels.

    python -m benchmarks.inference [--quick] [--json] [--out DIR] [--model NAME] [--mixer NAME]
        [--layers-from GREEDY_JSON] [--contexts 2048,8192,...] [--repeats N] [--device cpu|cuda] [--dtype ...]
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import cost_model as cm
from benchmarks import harness
from benchmarks.harness import int_list, option
from dtr_core.search.baselines import uniform_layers

logger = logging.getLogger("benchmarks.inference")

DEFAULT_CONTEXTS = (2048, 8192, 16384, 32768)
DEFAULT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_PREFILL_MAX = 8192  # teacher prefill at 16K is ~4x the 8K one on 2 cores (minutes per run): opt in
GPU_CONTEXTS = (2048, 8192, 16384, 32768, 65536)  # on a GPU every one of them is also prefilled
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WARMUP_PROMPT = 128  # tokens of the untimed warm-up prefill of every model
STRUCTURE_PROMPT = 8  # tokens of the real prefill that gives a synthetic cache its exact structure
STATE_SCALE = 0.02  # random linear states are small, like trained ones; values do not change the cost

# targets
TARGET_MIN_CONTEXT = 8192  # every measured speed-up at T >= this ...
TARGET_IDEAL_FRACTION = 0.9  # ... reaches this fraction of its ideal
HEADLINE_FRACTION, HEADLINE_CONTEXT, HEADLINE_SPEEDUP = 0.5, 32768, 1.6  # half linear, 32K, decode >= 1.6x


def _fractions(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


@dataclass(frozen=True)
class Settings:
    model: str = option("smollm2-135m", "teacher: a dtr_core.models.load_model source")
    mixer: str = option("gated_deltanet", "student type (a dtr_core.mixers.MIXERS name)")
    layers_from: str | None = option(None, "take the linear layers in the order of a greedy result JSON (else "
                                     "uniform interleaving)")
    contexts: tuple[int, ...] | None = option(None, "context lengths, K = 1024 (None: 2K-32K; on cuda 2K-64K)",
                                              int_list, minimum=1)
    fractions: tuple[float, ...] = option(DEFAULT_FRACTIONS, "fractions of the layers made linear, k = floor(f L)",
                                          _fractions, minimum=0.0)
    repeats: int = option(5, "timed decode repeats", minimum=1)
    prefill_repeats: int | None = option(None, "timed prefill repeats (None: min(repeats, 2))", int, minimum=1)
    decode_tokens: int = option(8, "decode steps per repeat", minimum=1)
    prefill_max: int | None = option(None, f"longest context also prefilled (None: {DEFAULT_PREFILL_MAX}; on cuda "
                                     "all)", int, minimum=1)
    warmup: int = option(1, "untimed runs per model and context before timing", minimum=0)
    seed: int = option(0, "seed of the random prompts and caches")
    balance_mb: int = option(256, "buffer of the memory-bandwidth measurement (MB)", minimum=1)
    device: str = option("cpu", "cuda: models on the GPU, contexts to 64K, all prefilled", choices=("cpu", "cuda"))
    dtype: str | None = option(None, "model dtype (None: float32 on CPU, bfloat16 on CUDA)", choices=sorted(DTYPES))


def check(s: Settings, preset: str | None) -> Settings:
    from dtr_core.mixers import MIXERS

    if s.mixer not in MIXERS:
        raise ValueError(f"unknown mixer '{s.mixer}'; choose one of: {', '.join(sorted(MIXERS))}")
    if any(f > 1.0 for f in s.fractions) or not s.fractions:
        raise ValueError(f"--fractions must be in [0, 1], got {s.fractions}")
    gpu = s.device == "cuda"
    if gpu and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU, and torch sees none; run on CPU with --device cpu")
    contexts = tuple(sorted(set(s.contexts or (GPU_CONTEXTS if gpu else DEFAULT_CONTEXTS))))
    return dataclasses.replace(
        s, contexts=contexts, prefill_repeats=s.prefill_repeats or min(s.repeats, 2),
        prefill_max=s.prefill_max or (max(contexts) if gpu else DEFAULT_PREFILL_MAX),
        dtype=s.dtype or ("bfloat16" if gpu else "float32"))


QUICK = dict(contexts=(256, 1024), fractions=(0.0, 0.5, 1.0), repeats=2, decode_tokens=4, prefill_max=1024,
             balance_mb=64)


# --- which layers and models ---------------------------------------------------------------------


def read_greedy_order(path: str | Path) -> list[int]:
    """Layer order of a greedy result: the layer chosen in each round (`dtr_core.search.decisions.GreedyResult` JSON),
    else its `swap_order` / `opt_layers`, or a plain JSON list of layer indices."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        if data.get("rounds"):
            order = [int(r["chosen"]) for r in data["rounds"]]
        elif "swap_order" in data or "opt_layers" in data:
            order = [int(x) for x in data.get("swap_order") or data.get("opt_layers") or []]
        else:
            raise ValueError(f"{path}: expected a greedy result with 'rounds', 'swap_order' or 'opt_layers'")
    elif isinstance(data, list):
        order = [int(x) for x in data]
    else:
        raise ValueError(f"{path}: expected a greedy result object or a list of layer indices")
    return list(dict.fromkeys(order))  # first occurrence of each layer


@dataclass(frozen=True)
class Contender:
    name: str
    k: int | None  # None: the teacher itself (the plain HF model)
    linear_layers: tuple[int, ...]
    placement: str  # "teacher" | "uniform" | "greedy" | "greedy+uniform"

    @property
    def is_teacher(self) -> bool:
        return self.k is None


def plan_contenders(
    num_layers: int, fractions: Sequence[float], greedy_order: Sequence[int] | None = None
) -> list[Contender]:
    """The teacher, then one hybrid per fraction f with k = floor(f L) linear layers."""
    contenders = [Contender("teacher", None, (), "teacher")]
    seen = set()
    for fraction in fractions:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fractions must be in [0, 1], got {fraction}")
        k = int(fraction * num_layers + 1e-9)
        if k in seen:
            continue
        seen.add(k)
        if greedy_order is None:
            layers, placement = uniform_layers(num_layers, k), "uniform"
        else:
            order = [layer for layer in greedy_order if 0 <= layer < num_layers]
            chosen = order[:k]
            placement = "greedy"
            if len(chosen) < k:
                rest = [layer for layer in range(num_layers) if layer not in chosen]
                chosen += list(uniform_layers(num_layers, k - len(chosen), available=rest))
                placement = "greedy+uniform"
            layers = tuple(sorted(chosen))
        contenders.append(Contender(f"k={k}", k, layers, placement))
    return contenders


# --- models and caches ---------------------------------------------------------------------------


def build_models(teacher, mixer: str, contenders: Sequence[Contender]):
    """({contender name: model}, cost profile). Hybrids get fresh students (the teacher's q/k/v/o copied)."""
    from dtr_core.hybrid.model import make_hybrid
    from dtr_core.mixers import build_student

    models = {}
    for contender in contenders:
        if contender.is_teacher:
            models[contender.name] = teacher
            continue
        students = {
            layer: build_student(mixer, teacher.config, layer, teacher_attention=teacher.model.layers[layer].self_attn)
            for layer in contender.linear_layers
        }
        models[contender.name] = make_hybrid(teacher, students).eval()
    probe = build_student(mixer, teacher.config, 0)
    return models, cm.profile_model(teacher, probe)


def layer_kinds(model) -> list[str]:
    from dtr_core.hybrid.model import layer_map

    return list(layer_map(model))


def cache_nbytes(cache) -> int:
    """Bytes of the storages the cache's tensors hold (K/V, conv and recurrent states), each storage once."""
    storages: dict[int, int] = {}

    def add(tensor) -> None:
        if isinstance(tensor, torch.Tensor):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for layer in cache.layers:
        add(getattr(layer, "keys", None))
        add(getattr(layer, "values", None))
        for states in (getattr(layer, "conv_states", None) or {}, getattr(layer, "recurrent_states", None) or {}):
            for tensor in states.values():
                add(tensor)
    return sum(storages.values())


def _is_kv_layer(layer) -> bool:
    return isinstance(getattr(layer, "keys", None), torch.Tensor)


def synthetic_cache(model, context: int, generator: torch.Generator):
    """A cache exactly as a `context`-token prefill leaves it, filled with random values.

    A real prefill of a few tokens makes the cache (right classes, dtypes, state shapes); then each full
    layer's K/V becomes random `(1, kv_heads, context, head_dim)` tensors (one random pair, cloned per
    layer: cloning is fast and decode cost does not depend on the values) and each linear layer's
    recurrent/conv state random.
    """
    device = model.device
    prompt = torch.randint(0, model.config.vocab_size, (1, STRUCTURE_PROMPT), generator=generator).to(device)
    cache = model(prompt, use_cache=True, logits_to_keep=1).cache
    keys = values = None
    for layer in cache.layers:
        if _is_kv_layer(layer):
            if keys is None:
                batch, kv_heads, _, head_dim = layer.keys.shape
                shape = (batch, kv_heads, context, head_dim)
                keys = torch.randn(shape, generator=generator, dtype=layer.keys.dtype).to(device)
                values = torch.randn(shape, generator=generator, dtype=layer.values.dtype).to(device)
                layer.keys, layer.values = keys, values
            else:
                layer.keys, layer.values = keys.clone(), values.clone()
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
        if _is_kv_layer(layer):
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



# --- measurement ---------------------------------------------------------------------------------


def _cache_check(profile: cm.ModelProfile, kinds: list[str], model, context: int, measured: int) -> dict:
    from dtr_core.hybrid.model import cache_bytes as dtr_cache_bytes

    formula = cm.cache_bytes(profile, kinds, context)
    dtr = dtr_cache_bytes(model, context)
    return {"measured": measured, "formula": formula, "dtr_cache_bytes": dtr, "exact": measured == formula == dtr}


def measure_models(settings: Settings, models: dict, profile: cm.ModelProfile) -> dict:
    """Run every measurement; returns the raw records (no ratios)."""
    generator = torch.Generator().manual_seed(settings.seed)
    kinds = {name: layer_kinds(model) for name, model in models.items()}
    records: dict[str, list[dict]] = {"prefill": [], "decode": []}
    vocab = next(iter(models.values())).config.vocab_size
    gc.collect()
    gc.freeze()  # the models and imports are long-lived: later collections (in PeakRSS) skip them
    try:
        with torch.inference_mode():
            _measure_all(settings, models, kinds, profile, generator, vocab, records)
    finally:
        gc.unfreeze()
    return records


def _measure_all(settings, models, kinds, profile, generator, vocab, records) -> None:
    """Warm every model up, then per context: prefill (if T <= prefill_max) and decode, appended to records."""
    logger.info("warm-up: %d-token prefill and 2 decode steps per model", WARMUP_PROMPT)
    warm_ids = torch.randint(0, vocab, (1, WARMUP_PROMPT), generator=generator).to(settings.device)
    for model in models.values():
        out = model(warm_ids, use_cache=True, logits_to_keep=1)
        decode(model, out.cache, warm_ids[:, -1:], 2)
        del out
    for context in settings.contexts:
        ids = torch.randint(0, vocab, (1, context), generator=generator).to(settings.device)
        if context <= settings.prefill_max:
            records["prefill"] += _measure_prefill(settings, models, kinds, profile, ids)
        records["decode"] += _measure_decode(settings, models, kinds, profile, context, generator)


def _measure_prefill(settings, models, kinds, profile, ids) -> list[dict]:
    context = ids.shape[1]
    logger.info("prefill T=%d: one run per model for cache bytes and peak memory (also the warm-up at this T)", context)
    memory = {}
    for name, model in models.items():
        start = time.perf_counter()
        with harness.peak_memory(settings.device) as peak:
            out = model(ids, use_cache=True, logits_to_keep=1)
            measured = cache_nbytes(out.cache)
        del out
        memory[name] = {
            "peak_bytes": peak.peak_bytes,
            "cache": _cache_check(profile, kinds[name], model, context, measured),
            "first_run_s": time.perf_counter() - start,
        }
        logger.info("  %s: %.2f s, cache %s", name, memory[name]["first_run_s"], harness.format_bytes(measured))

    def task(model):
        def run() -> harness.Sample:
            return harness.timed(lambda: model(ids, use_cache=True, logits_to_keep=1), settings.device)

        return run

    extra_warmup = max(0, settings.warmup - 1)  # the memory run above was the first warm-up
    timings = harness.interleave({name: task(m) for name, m in models.items()}, settings.prefill_repeats,
                                     warmup=extra_warmup, on_sample=harness.log_sample(logger, f"prefill T={context}"))
    return [
        {"contender": name, "context": context, "time_s": timings[name].to_dict(), **memory[name]} for name in models
    ]


def _measure_decode(settings, models, kinds, profile, context, generator) -> list[dict]:
    logger.info("decode T=%d: synthetic caches (peak memory: cache + %d warm-up steps)", context, 2 * settings.warmup)
    caches, memory, tokens = {}, {}, {}
    for name, model in models.items():
        with harness.peak_memory(settings.device) as peak:
            cache = synthetic_cache(model, context, generator)
            measured = cache_nbytes(cache)
            token = torch.randint(0, model.config.vocab_size, (1, 1), generator=generator).to(settings.device)
            if settings.warmup:
                decode(model, cache, token, 2 * settings.warmup)
        rewind(cache, context)
        caches[name], tokens[name] = cache, token
        memory[name] = {
            "peak_bytes": peak.peak_bytes,
            "cache": _cache_check(profile, kinds[name], model, context, measured),
        }

    def task(name, model):
        def run() -> harness.Sample:
            sample = harness.timed(lambda: decode(model, caches[name], tokens[name], settings.decode_tokens),
                                  settings.device)
            rewind(caches[name], context)
            return sample

        return run

    timings = harness.interleave({name: task(name, m) for name, m in models.items()}, settings.repeats,
                                     warmup=0, on_sample=harness.log_sample(logger, f"decode T={context}"))
    caches.clear()
    gc.collect()
    return [
        {"contender": name, "context": context, "steps": settings.decode_tokens,
         "time_per_token_s": timings[name].scaled(1 / settings.decode_tokens).to_dict(), **memory[name]}
        for name in models
    ]


# --- analysis ------------------------------------------------------------------------------------


def analyse(settings: Settings, contenders: list[Contender], kinds: dict[str, list[str]], profile: cm.ModelProfile,
            records: dict) -> dict:
    """Ratios to the teacher, ideal ratios, target verdicts, skipped prefills."""
    teacher = "teacher"
    by_key = {(phase, r["contender"], r["context"]): r for phase in records for r in records[phase]}
    decode_rows, prefill_rows = [], []
    for r in records["decode"]:
        t = harness.Timing(tuple(r["time_per_token_s"]["samples"]))
        base = harness.Timing(tuple(by_key[("decode", teacher, r["context"])]["time_per_token_s"]["samples"]))
        ideal = cm.ideal_decode_speedup(profile, kinds[r["contender"]], r["context"])
        concat = cm.ideal_decode_speedup(profile, kinds[r["contender"]], r["context"], kv_append="concat")
        speedup = harness.ratio_of(base, t)
        cost = cm.decode_cost(profile, kinds[r["contender"]], r["context"])
        decode_rows.append({**r, "tokens_per_s": 1 / t.median, "speedup": speedup, "ideal_speedup": ideal,
                            "concat_model_speedup": concat, "measured_over_ideal": speedup["median"] / ideal,
                            "bytes_per_token": cost.bytes, "flops_per_token": cost.flops})
    for r in records["prefill"]:
        t = harness.Timing(tuple(r["time_s"]["samples"]))
        base = harness.Timing(tuple(by_key[("prefill", teacher, r["context"])]["time_s"]["samples"]))
        ideal = cm.ideal_prefill_speedup(profile, kinds[r["contender"]], r["context"])
        speedup = harness.ratio_of(base, t)
        prefill_rows.append({**r, "tokens_per_s": r["context"] / t.median, "speedup": speedup, "ideal_speedup": ideal,
                             "measured_over_ideal": speedup["median"] / ideal,
                             "flops": cm.prefill_cost(profile, kinds[r["contender"]], r["context"]).flops})
    return {
        "decode": decode_rows,
        "prefill": prefill_rows,
        "prefill_skipped": _skipped_prefills(settings, profile, prefill_rows, len(contenders)),
        "targets": targets(profile.num_layers, decode_rows, prefill_rows),
    }


def _skipped_prefills(settings, profile, prefill_rows, n_models) -> list[dict]:
    skipped = [t for t in settings.contexts if t > settings.prefill_max]
    teacher_rows = sorted((r for r in prefill_rows if r["contender"] == "teacher"), key=lambda r: r["context"])
    full = [cm.FULL] * profile.num_layers
    out = []
    for context in skipped:
        estimate = None
        if teacher_rows:
            ref = teacher_rows[-1]
            scale = cm.prefill_cost(profile, full, context).flops / cm.prefill_cost(profile, full, ref["context"]).flops
            estimate = ref["time_s"]["median"] * scale
        reason = (f"prefill at T={context} not run (--prefill-max {settings.prefill_max}): attention cost grows as T^2")
        if estimate is not None:
            total = estimate * n_models * (settings.prefill_repeats + 1)
            reason += (f"; the teacher would take ~{estimate:.0f} s per prefill here (the T={ref['context']}"
                       f" time scaled by the FLOPs model), ~{total / 60:.0f} min for {n_models} models x "
                       f"{settings.prefill_repeats + 1} runs")
        out.append({"context": context, "reason": reason, "teacher_estimate_s": estimate})
    return out


def targets(num_layers: int, decode_rows: list[dict], prefill_rows: list[dict]) -> dict:
    """Verdicts on the issue's targets, from the analysed rows (a pure function: re-derivable from the JSON)."""
    cache_rows = [(phase, r) for phase, rows in (("prefill", prefill_rows), ("decode", decode_rows)) for r in rows]
    mismatches = [{"phase": phase, "contender": r["contender"], "context": r["context"], **r["cache"]}
                  for phase, r in cache_rows if not r["cache"]["exact"]]
    checked, misses = {"decode": 0, "prefill": 0}, []
    for phase, rows in (("decode", decode_rows), ("prefill", prefill_rows)):
        for r in rows:
            if r["contender"] == "teacher" or r["context"] < TARGET_MIN_CONTEXT:
                continue
            checked[phase] += 1
            if r["measured_over_ideal"] < TARGET_IDEAL_FRACTION:
                misses.append({"phase": phase, "contender": r["contender"], "context": r["context"],
                               "speedup": r["speedup"]["median"], "ideal": r["ideal_speedup"],
                               "measured_over_ideal": r["measured_over_ideal"]})
    k_half = int(HEADLINE_FRACTION * num_layers + 1e-9)
    headline_row = next(
        (r for r in decode_rows if r["contender"] == f"k={k_half}" and r["context"] == HEADLINE_CONTEXT), None
    )
    return {
        "cache_exact": {"met": not mismatches, "checked": len(cache_rows), "mismatches": mismatches},
        "speedup_vs_ideal": {
            "met": None if not sum(checked.values()) else not misses,
            "checked": checked,
            "min_context": TARGET_MIN_CONTEXT,
            "fraction": TARGET_IDEAL_FRACTION,
            "misses": misses,
        },
        "headline": {
            "met": None if headline_row is None else headline_row["speedup"]["median"] >= HEADLINE_SPEEDUP,
            "contender": f"k={k_half}", "context": HEADLINE_CONTEXT, "target": HEADLINE_SPEEDUP,
            "speedup": None if headline_row is None else headline_row["speedup"],
            "ideal": None if headline_row is None else headline_row["ideal_speedup"],
            "concat_model": None if headline_row is None else headline_row["concat_model_speedup"],
        },
    }


def measure(s: Settings) -> dict:
    from dtr_core.models import load_model
    from dtr_core.hybrid.surgery import num_layers

    logger.info("measuring the %s's memory bandwidth and matmul throughput", s.device)
    balance = cm.measure_machine_balance(size_mb=s.balance_mb, device=s.device)
    greedy_order = read_greedy_order(s.layers_from) if s.layers_from else None
    teacher, _ = load_model(s.model)
    teacher.to(device=s.device, dtype=DTYPES[s.dtype]).eval()
    L = num_layers(teacher)
    contenders = plan_contenders(L, s.fractions, greedy_order)
    logger.info("building %d models: %s", len(contenders), ", ".join(c.name for c in contenders))
    models, profile = build_models(teacher, s.mixer, contenders)
    kinds = {name: layer_kinds(model) for name, model in models.items()}
    records = measure_models(s, models, profile)
    return {"machine_balance": balance, "num_layers": L, "profile": profile.to_dict(),
            "contenders": [asdict(c) for c in contenders], **analyse(s, contenders, kinds, profile, records)}


# --- report --------------------------------------------------------------------------------------


def _label(context: int) -> str:
    return f"{context // 1024}K" if context % 1024 == 0 and context >= 1024 else str(context)


def _speedup(speedup: dict) -> str:
    return f"{speedup['median']:.2f}x [{speedup['low']:.2f}-{speedup['high']:.2f}]"


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("**MET**" if met else "**MISSED**")


def _device(result: dict) -> str:
    device = result["machine"].get("device", "cpu")
    return "CPU" if device == "cpu" else device


def _sections(result: dict) -> list[list[str]]:
    """Contenders, decode (summary and details), prefill, memory and targets, each a list of lines."""
    s, L = result["settings"], result["num_layers"]
    label = {c["name"]: "teacher" if c["k"] is None else f"k={c['k']}/{L}" for c in result["contenders"]}
    table = harness.markdown_table
    contenders = [[label[c["name"]], ", ".join(map(str, c["linear_layers"])) or "none", c["placement"]]
                  for c in result["contenders"]]
    decode, prefill = result["decode"], result["prefill"]
    contexts = sorted({r["context"] for r in decode})
    cell = {(r["contender"], r["context"]): f"{r['speedup']['median']:.2f}x ({r['ideal_speedup']:.2f}x)"
            for r in decode}
    cpu = lambda t: harness.format_ratio(t["cpu_per_wall"]).rstrip("x")  # noqa: E731
    details = [[_label(r["context"]), label[r["contender"]], f"{r['time_per_token_s']['median'] * 1e3:.1f}",
                f"{r['time_per_token_s']['min'] * 1e3:.1f}-{r['time_per_token_s']['max'] * 1e3:.1f}",
                f"{r['tokens_per_s']:.2f}", _speedup(r["speedup"]), f"{r['ideal_speedup']:.2f}x",
                f"{r['measured_over_ideal']:.2f}", f"{r['concat_model_speedup']:.2f}x", cpu(r["time_per_token_s"])]
               for r in decode]
    prefills = [[_label(r["context"]), label[r["contender"]], harness.format_seconds(r["time_s"]["median"]),
                 f"{harness.format_seconds(r['time_s']['min'])}-{harness.format_seconds(r['time_s']['max'])}",
                 f"{r['tokens_per_s']:.0f}", _speedup(r["speedup"]), f"{r['ideal_speedup']:.2f}x",
                 f"{r['measured_over_ideal']:.2f}", cpu(r["time_s"])] for r in prefill]
    prefill_by = {(r["contender"], r["context"]): r for r in prefill}
    memory = []
    for r in decode:
        p = prefill_by.get((r["contender"], r["context"]))
        cache = (p or r)["cache"]
        exact = "yes" if cache["exact"] and r["cache"]["exact"] else "NO"
        memory.append([_label(r["context"]), label[r["contender"]], harness.format_bytes(cache["measured"]),
                       harness.format_bytes(cache["formula"]), exact,
                       harness.format_bytes(p["peak_bytes"]) if p else "not run",
                       harness.format_bytes(r["peak_bytes"])])
    peak = "peak RSS" if _device(result) == "CPU" else "peak GPU memory"
    t = result["targets"]
    c, v, h = t["cache_exact"], t["speedup_vs_ideal"], t["headline"]
    misses = ", ".join(f"{m['phase']} {label.get(m['contender'], m['contender'])} T={_label(m['context'])} "
                       f"{m['speedup']:.2f}x of {m['ideal']:.2f}x ({m['measured_over_ideal']:.2f})"
                       for m in sorted(v["misses"], key=lambda m: m["measured_over_ideal"])) or "-"
    targets = [
        ["cache = K/V of the full layers + constant linear states", _verdict(c["met"]),
         f"{c['checked']} caches checked; mismatches: {len(c['mismatches'])}"],
        [f"every speed-up at T >= {_label(v['min_context'])} >= {v['fraction']} x its ideal", _verdict(v["met"]),
         f"{v['checked']['decode']} decode, {v['checked']['prefill']} prefill ratios; below: {misses}"],
        [f"decode {h['contender']} at T={_label(h['context'])} >= {h['target']}x", _verdict(h["met"]),
         "-" if h["speedup"] is None else f"{_speedup(h['speedup'])}; ideal {h['ideal']:.2f}x, concat-KV model "
         f"{h['concat_model']:.2f}x"],
    ]
    return [
        ["## Contenders", "", table(["model", "linear layers", "placement"], contenders, "lll")],
        ["## Decode speed-up vs the teacher: measured (ideal)", "",
         f"Median over {s['repeats']} repeats of {s['decode_tokens']} greedy steps from a synthetic cache of T tokens.",
         "", table(["model"] + [f"T={_label(x)}" for x in contexts],
                   [[label[n]] + [cell[(n, x)] for x in contexts] for n in label]), "",
         "## Decode details", "",
         table(["T", "model", "ms/token", "min-max ms", "tokens/s", "speed-up [range]", "ideal", "measured/ideal",
                "concat-KV model", "cpu/wall"], details)],
        ["## Prefill", ""] + ([f"Median over {s['prefill_repeats']} repeats of one forward over T tokens.", "",
                               table(["T", "model", "time", "min-max", "tokens/s", "speed-up [range]", "ideal",
                                      "measured/ideal", "cpu/wall"], prefills), ""] if prefill else [])
        + [f"- skipped: {skip['reason']}." for skip in result["prefill_skipped"]],
        ["## Memory", "", table(["T", "model", "cache (measured)", "formula", "exact", f"{peak} prefill",
                                 f"{peak} decode"], memory)],
        ["## Targets", "", table(["target", "verdict", "numbers"], targets, "lll")],
    ]


def markdown(result: dict) -> str:
    s, b = result["settings"], result["machine_balance"]
    balance = (f"{b['read_gbps']:.1f} GB/s read, {b['matvec_gbps']:.1f} GB/s matrix-vector, {b['gemm_gflops']:.0f} "
               f"GFLOP/s float32 matmul ({b['threads']} CPU threads): {b['balance_flop_per_byte']:.1f} FLOP/byte")
    out = [f"# Inference: {s['model']} teacher vs {s['mixer']} hybrids ({_device(result)}, batch 1)", "",
           harness.environment(result, {"dtype": s["dtype"], "machine balance": balance}), ""]
    for section in _sections(result):
        out += section + ["", harness.footer(result), ""]
    out += ["## Plots", ""] + [f"![{name[:-4].replace('_', ' ')}]({name})\n" for name in result.get("files", [])
                               if name.endswith(".png")]
    return "\n".join(out)


def _speedup_series(result: dict, phase: str, contexts: list[int]) -> list[harness.Series]:
    series = []
    for c in result["contenders"]:
        if c["k"] is None:
            continue
        mine = {r["context"]: r for r in result[phase] if r["contender"] == c["name"]}
        label = f"k={c['k']}/{result['num_layers']}"
        measured = [mine[t]["speedup"]["median"] if t in mine else None for t in contexts]
        ideal = [mine[t]["ideal_speedup"] if t in mine else None for t in contexts]
        series.append(harness.Series(f"{label} measured", contexts, measured, group=label))
        series.append(harness.Series(f"{label} ideal", contexts, ideal, group=label, dashed=True, marker=None))
    return series


def plots(result: dict, out_dir: Path) -> list[str]:
    """decode_speedup.png, prefill_speedup.png (with 2+ prefill contexts), cache_memory.png."""
    model, mixer = result["settings"]["model"], result["settings"]["mixer"]
    names = []
    for phase in ("decode", "prefill"):
        contexts = sorted({r["context"] for r in result[phase]})
        if len(contexts) < (1 if phase == "decode" else 2):
            continue
        harness.plot_lines(out_dir / f"{phase}_speedup.png", _speedup_series(result, phase, contexts),
                           f"{phase.capitalize()} speed-up vs the teacher ({model}, {mixer})", "context T (tokens)",
                           "speed-up (teacher time / hybrid time)", logx=True, hline=1.0, xticks=contexts,
                           xticklabels=[_label(t) for t in contexts])
        names.append(f"{phase}_speedup.png")
    contexts = sorted({r["context"] for r in result["decode"]})
    series = []
    for c in result["contenders"]:
        if c["k"] == 0:
            continue  # the same cache as the teacher's
        mine = {r["context"]: r["cache"] for r in result["decode"] if r["contender"] == c["name"]}
        label = "teacher (= k=0)" if c["k"] is None else f"k={c['k']}/{result['num_layers']}"
        for key, dashed in (("measured", False), ("formula", True)):
            series.append(harness.Series(f"{label} {key}", contexts, [mine[t][key] / 2**20 for t in contexts],
                                         group=label, dashed=dashed, marker=None if dashed else "o"))
    harness.plot_lines(out_dir / "cache_memory.png", series, f"Decoding cache size ({model}, batch 1)",
                       "context T (tokens)", "cache (MiB)", logx=True, logy=True, xticks=contexts,
                       xticklabels=[_label(t) for t in contexts])
    return names + ["cache_memory.png"]


BENCH = harness.Benchmark("inference", Settings, measure, markdown, plots, check=check,
                          description=__doc__.split("\n\n")[0], presets={"quick": QUICK},
                          ok=lambda result: result["targets"]["cache_exact"]["met"])


def main(argv: list[str] | None = None) -> int:
    return harness.main(BENCH, argv)


if __name__ == "__main__":
    sys.exit(main())
