"""Inference speed and memory of DtR hybrids against their teacher (issue 5, section 1).

The teacher and hybrids with k of its L layers linear (k = 0, L/4, L/2, 3L/4, L by default, rounded down;
the layers from a greedy-search result with `--layers-from`, else evenly interleaved) run in one process,
batch 1, on CPU (or `--device cuda`), with freshly initialised students (speed does not depend on their
training). Per context T:
- prefill: wall time of `model(ids[:, :T], use_cache=True, logits_to_keep=1)` (fresh cache each time);
  skipped above `--prefill-max` (quadratic attention makes 16K/32K prefills take minutes on 2 cores);
- decode: tokens/s of greedy decoding steps from a cache holding T tokens. The cache is synthetic: a short
  real prefill gives the exact cache structure, then every full layer's K/V is replaced by random tensors
  of length T and every linear layer's state by random values (decode cost does not depend on the values);
- cache bytes: the bytes of the tensors the cache holds (after the real prefill, and of the synthetic
  cache), checked equal to the formula (K/V of the full layers + constant linear states) of
  `benchmarks.cost_model.cache_bytes` and to `dtr_core.hybrid.cache_bytes`;
- peak memory: peak RSS above the start of the prefill / of building the T-token cache and decoding
  (see `benchmarks.common.PeakRSS`); on a GPU, torch's peak CUDA allocation above the start instead.
On a CUDA GPU (`--device cuda`, bfloat16 by default) every model and tensor lives on the GPU, each timed call
ends with `torch.cuda.synchronize()`, contexts go up to 64K and are all prefilled, and the linear layers run
flash-linear-attention's kernels (`dtr_core.ops.dispatch`).
Contenders are measured round-robin (rotating order) so load drift hits all alike; speed-ups are ratios of
medians to the teacher measured in the same run, next to the ideal ratio of `benchmarks.cost_model`.

    python -m benchmarks.inference [--quick] [--json] [--out DIR] [--model NAME] [--mixer NAME]
        [--layers-from GREEDY_JSON] [--contexts 2048,8192,...] [--repeats N] [--doc MARKDOWN]
        [--device cpu|cuda] [--dtype float32|bfloat16]
    dtr bench inference [same options]
    dtr bench inference --from-json docs/bench/inference/inference.json   # re-render only

Results: docs/BENCHMARKS_INFERENCE.md (method, cost model, the generated tables, what they mean).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import common
from benchmarks import cost_model as cm
from benchmarks.inference_report import markdown_report, write_plots
from dtr_core.baselines import uniform_layers

logger = logging.getLogger("benchmarks.inference")

DEFAULT_CONTEXTS = (2048, 8192, 16384, 32768)
QUICK_CONTEXTS = (256, 1024)
DEFAULT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
QUICK_FRACTIONS = (0.0, 0.5, 1.0)
DEFAULT_PREFILL_MAX = 8192  # teacher prefill at 16K is ~4x the 8K one on 2 cores (minutes per run): opt in
GPU_CONTEXTS = (2048, 8192, 16384, 32768, 65536)  # on a GPU every one of them is also prefilled
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_OUT = common.REPO_ROOT / "docs" / "bench" / "inference"
WARMUP_PROMPT = 128  # tokens of the untimed warm-up prefill of every model
STRUCTURE_PROMPT = 8  # tokens of the real prefill that gives a synthetic cache its exact structure
STATE_SCALE = 0.02  # random linear states are small, like trained ones; values do not change the cost

# targets (issue 5, section 1)
TARGET_MIN_CONTEXT = 8192  # every measured speed-up at T >= this ...
TARGET_IDEAL_FRACTION = 0.9  # ... reaches this fraction of its ideal
HEADLINE_FRACTION, HEADLINE_CONTEXT, HEADLINE_SPEEDUP = 0.5, 32768, 1.6  # half linear, 32K, decode >= 1.6x


# --- which layers --------------------------------------------------------------------------------


def read_greedy_order(path: str | Path) -> list[int]:
    """Layer order of a greedy result: the layer chosen in each round (`dtr_core.greedy.GreedyResult` JSON),
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
    from dtr_core.hybrid import make_hybrid
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
    from dtr_core.hybrid import layer_map

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


@dataclass(frozen=True)
class Settings:
    model: str
    mixer: str
    contexts: tuple[int, ...]
    fractions: tuple[float, ...]
    repeats: int
    prefill_repeats: int
    decode_tokens: int
    prefill_max: int
    warmup: int
    seed: int
    layers_from: str | None
    threads: int
    balance_mb: int
    device: str = "cpu"
    dtype: str = "float32"


def _cache_check(profile: cm.ModelProfile, kinds: list[str], model, context: int, measured: int) -> dict:
    from dtr_core.hybrid import cache_bytes as dtr_cache_bytes

    formula = cm.cache_bytes(profile, kinds, context)
    dtr = dtr_cache_bytes(model, context)
    return {"measured": measured, "formula": formula, "dtr_cache_bytes": dtr, "exact": measured == formula == dtr}


def measure(settings: Settings, models: dict, profile: cm.ModelProfile) -> dict:
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
        with common.peak_memory(settings.device) as peak:
            out = model(ids, use_cache=True, logits_to_keep=1)
            measured = cache_nbytes(out.cache)
        del out
        memory[name] = {
            "peak_bytes": peak.peak_bytes,
            "cache": _cache_check(profile, kinds[name], model, context, measured),
            "first_run_s": time.perf_counter() - start,
        }
        logger.info("  %s: %.2f s, cache %s", name, memory[name]["first_run_s"], common.format_bytes(measured))

    def task(model):
        def run() -> common.Sample:
            return common.timed(lambda: model(ids, use_cache=True, logits_to_keep=1), settings.device)

        return run

    extra_warmup = max(0, settings.warmup - 1)  # the memory run above was the first warm-up
    timings = common.run_interleaved({name: task(m) for name, m in models.items()}, settings.prefill_repeats,
                                     warmup=extra_warmup, on_sample=_log_sample(f"prefill T={context}"))
    return [
        {"contender": name, "context": context, "time_s": timings[name].to_dict(), **memory[name]} for name in models
    ]


def _measure_decode(settings, models, kinds, profile, context, generator) -> list[dict]:
    logger.info("decode T=%d: synthetic caches (peak memory: cache + %d warm-up steps)", context, 2 * settings.warmup)
    caches, memory, tokens = {}, {}, {}
    for name, model in models.items():
        with common.peak_memory(settings.device) as peak:
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
        def run() -> common.Sample:
            sample = common.timed(lambda: decode(model, caches[name], tokens[name], settings.decode_tokens),
                                  settings.device)
            rewind(caches[name], context)
            return sample

        return run

    timings = common.run_interleaved({name: task(name, m) for name, m in models.items()}, settings.repeats,
                                     warmup=0, on_sample=_log_sample(f"decode T={context}"))
    caches.clear()
    gc.collect()
    return [
        {"contender": name, "context": context, "steps": settings.decode_tokens,
         "time_per_token_s": timings[name].scaled(1 / settings.decode_tokens).to_dict(), **memory[name]}
        for name in models
    ]


def _log_sample(label: str):
    def on_sample(name: str, round_index: int, sample: common.Sample) -> None:
        logger.info("  %s %s repeat %d: %.3f s (cpu/wall %.2f)", label, name, round_index + 1, sample.wall_s,
                    sample.cpu_s / sample.wall_s if sample.wall_s else 0.0)

    return on_sample


# --- analysis ------------------------------------------------------------------------------------


def analyse(settings: Settings, contenders: list[Contender], kinds: dict[str, list[str]], profile: cm.ModelProfile,
            records: dict) -> dict:
    """Ratios to the teacher, ideal ratios, target verdicts, skipped prefills."""
    teacher = "teacher"
    by_key = {(phase, r["contender"], r["context"]): r for phase in records for r in records[phase]}
    decode_rows, prefill_rows = [], []
    for r in records["decode"]:
        t = common.Timing(tuple(r["time_per_token_s"]["samples"]))
        base = common.Timing(tuple(by_key[("decode", teacher, r["context"])]["time_per_token_s"]["samples"]))
        ideal = cm.ideal_decode_speedup(profile, kinds[r["contender"]], r["context"])
        concat = cm.ideal_decode_speedup(profile, kinds[r["contender"]], r["context"], kv_append="concat")
        speedup = common.ratio_of(base, t)
        cost = cm.decode_cost(profile, kinds[r["contender"]], r["context"])
        decode_rows.append({**r, "tokens_per_s": 1 / t.median, "speedup": speedup, "ideal_speedup": ideal,
                            "concat_model_speedup": concat, "measured_over_ideal": speedup["median"] / ideal,
                            "bytes_per_token": cost.bytes, "flops_per_token": cost.flops})
    for r in records["prefill"]:
        t = common.Timing(tuple(r["time_s"]["samples"]))
        base = common.Timing(tuple(by_key[("prefill", teacher, r["context"])]["time_s"]["samples"]))
        ideal = cm.ideal_prefill_speedup(profile, kinds[r["contender"]], r["context"])
        speedup = common.ratio_of(base, t)
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


# --- command line --------------------------------------------------------------------------------


def _contexts(text: str) -> tuple[int, ...]:
    values = []
    for part in text.split(","):
        part = part.strip().upper()
        value = int(part[:-1]) * 1024 if part.endswith("K") else int(part)
        if value < 1:
            raise argparse.ArgumentTypeError(f"contexts must be positive, got {part}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("no contexts given")
    return tuple(sorted(set(values)))


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtr bench inference", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"contexts {','.join(map(str, QUICK_CONTEXTS))}, k = 0, L/2, L, 2 repeats "
                        "(< 2 min on a quiet machine)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the markdown report")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for inference.md, inference.json and the PNG plots")
    parser.add_argument("--model", default="smollm2-135m", help="teacher: a dtr_core.models.load_model source")
    parser.add_argument("--mixer", default="gated_deltanet", help="student type (a dtr_core.mixers.MIXERS name)")
    parser.add_argument("--layers-from", default=None, metavar="GREEDY_JSON",
                        help="take the linear layers in the order of a greedy result (else uniform interleaving)")
    parser.add_argument("--contexts", type=_contexts, default=None,
                        help="comma-separated context lengths, K = 1024 "
                        f"(default {','.join(map(str, DEFAULT_CONTEXTS))})")
    parser.add_argument("--fractions", type=_fractions, default=None,
                        help="fractions of the layers made linear, k = floor(f L) (default 0,0.25,0.5,0.75,1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed decode repeats (default 5; quick 2)")
    parser.add_argument("--prefill-repeats", type=int, default=None,
                        help="timed prefill repeats (default 2; the untimed memory run before them is the warm-up)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="decode steps per repeat (default 8; quick 4)")
    parser.add_argument("--prefill-max", type=int, default=None,
                        help=f"longest context that is also prefilled (default {DEFAULT_PREFILL_MAX}; quick 1024)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per model and context before timing")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help=f"cuda: models on the GPU, contexts {','.join(map(str, GPU_CONTEXTS))}, all prefilled")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--doc", type=Path, default=None,
                        help="also refresh the generated block of this markdown file "
                        "(docs/BENCHMARKS_INFERENCE.md)")
    parser.add_argument("--from-json", type=Path, default=None, metavar="INFERENCE_JSON",
                        help="measure nothing: re-render the report, plots (and --doc) from a saved inference.json")
    parser.add_argument("--balance-mb", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    from dtr_core.mixers import MIXERS

    if args.mixer not in MIXERS:
        raise ValueError(f"unknown mixer '{args.mixer}'; choose one of: {', '.join(sorted(MIXERS))}")
    repeats = args.repeats or (2 if args.quick else 5)
    for name, value in (("--repeats", repeats), ("--prefill-repeats", args.prefill_repeats),
                        ("--decode-tokens", args.decode_tokens), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU, and torch sees none; run on CPU with --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    default_contexts = GPU_CONTEXTS if gpu else DEFAULT_CONTEXTS
    default_prefill_max = max(default_contexts) if gpu else DEFAULT_PREFILL_MAX
    return Settings(
        model=args.model,
        mixer=args.mixer,
        contexts=args.contexts or (QUICK_CONTEXTS if args.quick else default_contexts),
        fractions=args.fractions or (QUICK_FRACTIONS if args.quick else DEFAULT_FRACTIONS),
        repeats=repeats,
        prefill_repeats=args.prefill_repeats or min(repeats, 2),
        decode_tokens=args.decode_tokens or (4 if args.quick else 8),
        prefill_max=args.prefill_max if args.prefill_max is not None else (1024 if args.quick else default_prefill_max),
        warmup=args.warmup,
        seed=args.seed,
        layers_from=args.layers_from,
        threads=torch.get_num_threads(),
        balance_mb=args.balance_mb or (64 if args.quick else 256),
        device=args.device,
        dtype=args.dtype or ("bfloat16" if gpu else "float32"),
    )


def run(settings: Settings, argv: Sequence[str]) -> dict:
    started = time.perf_counter()
    machine = {**common.machine_info(), "device": common.device_name(settings.device)}
    logger.info("measuring the %s's memory bandwidth and matmul throughput", settings.device)
    balance = cm.measure_machine_balance(size_mb=settings.balance_mb, device=settings.device)
    greedy_order = read_greedy_order(settings.layers_from) if settings.layers_from else None
    from dtr_core.models import load_model
    from dtr_core.surgery import num_layers

    teacher, _ = load_model(settings.model)
    teacher.to(device=settings.device, dtype=DTYPES[settings.dtype]).eval()
    L = num_layers(teacher)
    contenders = plan_contenders(L, settings.fractions, greedy_order)
    logger.info("building %d models: %s", len(contenders), ", ".join(c.name for c in contenders))
    models, profile = build_models(teacher, settings.mixer, contenders)
    kinds = {name: layer_kinds(model) for name, model in models.items()}
    records = measure(settings, models, profile)
    analysis = analyse(settings, contenders, kinds, profile, records)
    return {
        "benchmark": "inference",
        "settings": asdict(settings),
        "commands": common.command_lines("benchmarks.inference", "inference", argv),
        "machine": machine,
        "machine_balance": balance,
        "num_layers": L,
        "profile": profile.to_dict(),
        "contenders": [asdict(c) for c in contenders],
        **analysis,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_time_s": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    common.setup_logging()
    if args.from_json is not None:  # re-render a saved run: same numbers, current report code
        result = json.loads(Path(args.from_json).read_text())
        result["targets"] = targets(result["num_layers"], result["decode"], result["prefill"])
    else:
        result = run(settings_from_args(args), argv)
    out_dir = Path(args.out)
    report = common.publish(out_dir, "inference", result, write_plots(result, out_dir), markdown_report, args.json)
    if args.doc is not None:
        common.replace_between_markers(args.doc, "inference", _doc_block(report, out_dir, args.doc))
    logger.info("wrote %s (run took %.1f min)", out_dir, result["wall_time_s"] / 60)
    return 0 if result["targets"]["cache_exact"]["met"] else 1


def _doc_block(report: str, out_dir: Path, doc: Path) -> str:
    """The report without its title, image links made relative to the document."""
    relative = Path(os.path.relpath(out_dir.resolve(), doc.resolve().parent))
    body = report.split("\n", 1)[1].replace("\n## ", "\n### ")
    for name in ("decode_speedup.png", "prefill_speedup.png", "cache_memory.png"):
        body = body.replace(f"]({name})", f"]({(relative / name).as_posix()})")
    return body


if __name__ == "__main__":
    sys.exit(main())
