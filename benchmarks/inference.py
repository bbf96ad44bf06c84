"""Inference speed and memory of DtR hybrids against their teacher, at batch 1, in one process.

The teacher and hybrids with k = floor(f L) layers linear (fresh students; greedy order with `--layers-from`, else
evenly interleaved): per context T, prefill time, decode tokens/s from a synthetic T-token cache, the cache's bytes
(checked equal to the cost model and `dtr_core.hybrid.model.cache_bytes`) and peak memory, timed interleaved;
speed-ups are ratios of medians to the teacher beside the cost model's ideal. Method and reading:
docs/BENCHMARKS_INFERENCE.md.
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
from dtr_core.speed import cache_nbytes, decode, rewind, synthetic_cache

logger = logging.getLogger("benchmarks.inference")

DEFAULT_CONTEXTS = (2048, 8192, 16384, 32768)
DEFAULT_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_PREFILL_MAX = 8192  # teacher prefill at 16K is ~4x the 8K one on 2 cores (minutes per run): opt in
GPU_CONTEXTS = (2048, 8192, 16384, 32768, 65536)  # on a GPU every one of them is also prefilled
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WARMUP_PROMPT = 128  # tokens of the untimed warm-up prefill of every model

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
    harness.check_mixer(s.mixer)
    harness.check_device(s.device)
    if s.layers_from is not None:
        if not Path(s.layers_from).is_file():
            raise ValueError(f"--layers-from {s.layers_from} is not a file; pass a greedy result JSON")
        read_greedy_order(s.layers_from)  # a ValueError names what the file lacks
    if any(f > 1.0 for f in s.fractions) or not s.fractions:
        raise ValueError(f"--fractions must be in [0, 1], got {s.fractions}")
    gpu = s.device == "cuda"
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


def plan_contenders(num_layers: int, fractions: Sequence[float],
                    greedy_order: Sequence[int] | None = None) -> list[Contender]:
    """The teacher, then one hybrid per fraction f with k = floor(f L) linear layers."""
    if bad := [f for f in fractions if not 0.0 <= f <= 1.0]:
        raise ValueError(f"fractions must be in [0, 1], got {bad[0]}")
    contenders = [Contender("teacher", None, (), "teacher")]
    for k in dict.fromkeys(int(f * num_layers + 1e-9) for f in fractions):
        if greedy_order is None:
            contenders.append(Contender(f"k={k}", k, uniform_layers(num_layers, k), "uniform"))
            continue
        chosen = [layer for layer in greedy_order if 0 <= layer < num_layers][:k]
        placement = "greedy" if len(chosen) == k else "greedy+uniform"
        rest = [layer for layer in range(num_layers) if layer not in chosen]
        chosen += list(uniform_layers(num_layers, k - len(chosen), available=rest)) if len(chosen) < k else []
        contenders.append(Contender(f"k={k}", k, tuple(sorted(chosen)), placement))
    return contenders


# --- models and caches ---------------------------------------------------------------------------


def build_models(teacher, mixer: str, contenders: Sequence[Contender]):
    """({contender name: model}, cost profile). Hybrids get fresh students (the teacher's q/k/v/o copied)."""
    from dtr_core.hybrid.model import make_hybrid
    from dtr_core.hybrid.surgery import attention_module
    from dtr_core.mixers import build_student

    def student(layer: int):
        return build_student(mixer, teacher.config, layer, teacher_attention=attention_module(teacher, layer))

    models = {c.name: teacher if c.k is None else make_hybrid(teacher, {i: student(i) for i in c.linear_layers}).eval()
              for c in contenders}
    return models, cm.profile_model(teacher, build_student(mixer, teacher.config, 0))


def layer_kinds(model) -> list[str]:
    from dtr_core.hybrid.model import layer_map

    return list(layer_map(model))


# --- measurement ---------------------------------------------------------------------------------


def _cache_check(profile: cm.ModelProfile, kinds: list[str], model, context: int, measured: int) -> dict:
    from dtr_core.hybrid.model import cache_bytes as dtr_cache_bytes

    formula, dtr = cm.cache_bytes(profile, kinds, context), dtr_cache_bytes(model, context)
    return {"measured": measured, "formula": formula, "dtr_cache_bytes": dtr, "exact": measured == formula == dtr}


def measure_models(settings: Settings, models: dict, profile: cm.ModelProfile) -> dict:
    """Warm every model up, then per context: prefill (if T <= prefill_max) and decode; the raw records."""
    generator = torch.Generator().manual_seed(settings.seed)
    kinds = {name: layer_kinds(model) for name, model in models.items()}
    records: dict[str, list[dict]] = {"prefill": [], "decode": []}
    vocab = next(iter(models.values())).config.vocab_size
    gc.collect()
    gc.freeze()  # the models and imports are long-lived: later collections (in PeakRSS) skip them
    try:
        with torch.inference_mode():
            logger.info("warm-up: %d-token prefill and 2 decode steps per model", WARMUP_PROMPT)
            warm_ids = torch.randint(0, vocab, (1, WARMUP_PROMPT), generator=generator).to(settings.device)
            for model in models.values():
                decode(model, model(warm_ids, use_cache=True, logits_to_keep=1).cache, warm_ids[:, -1:], 2)
            for context in settings.contexts:
                ids = torch.randint(0, vocab, (1, context), generator=generator).to(settings.device)
                if context <= settings.prefill_max:
                    records["prefill"] += _measure_prefill(settings, models, kinds, profile, ids)
                records["decode"] += _measure_decode(settings, models, kinds, profile, context, generator)
    finally:
        gc.unfreeze()
    return records


def _measure_prefill(settings, models, kinds, profile, ids) -> list[dict]:
    context, memory = ids.shape[1], {}
    logger.info("prefill T=%d: one run per model for cache bytes and peak memory (also the warm-up at this T)", context)
    for name, model in models.items():
        start = time.perf_counter()
        with harness.peak_memory(settings.device) as peak:
            out = model(ids, use_cache=True, logits_to_keep=1)
            measured = cache_nbytes(out.cache)
        del out
        memory[name] = {"peak_bytes": peak.peak_bytes, "first_run_s": time.perf_counter() - start,
                        "cache": _cache_check(profile, kinds[name], model, context, measured)}
        logger.info("  %s: %.2f s, cache %s", name, memory[name]["first_run_s"], harness.format_bytes(measured))
    tasks = {name: (lambda m=m: harness.timed(lambda: m(ids, use_cache=True, logits_to_keep=1), settings.device))
             for name, m in models.items()}
    timings = harness.interleave(tasks, settings.prefill_repeats, warmup=max(0, settings.warmup - 1),  # 1: above
                                 on_sample=harness.log_sample(logger, f"prefill T={context}"))
    return [{"contender": name, "context": context, "time_s": timings[name].to_dict(), **memory[name]}
            for name in models]


def _measure_decode(settings, models, kinds, profile, context, generator) -> list[dict]:
    logger.info("decode T=%d: synthetic caches (peak memory: cache + %d warm-up steps)", context, 2 * settings.warmup)
    caches, memory, tokens = {}, {}, {}
    for name, model in models.items():
        with harness.peak_memory(settings.device) as peak:
            cache = caches[name] = synthetic_cache(model, context, generator)
            measured = cache_nbytes(cache)
            tokens[name] = torch.randint(0, model.config.vocab_size, (1, 1), generator=generator).to(settings.device)
            if settings.warmup:
                decode(model, cache, tokens[name], 2 * settings.warmup)
        rewind(cache, context)
        memory[name] = {"peak_bytes": peak.peak_bytes, "cache": _cache_check(profile, kinds[name], model, context,
                                                                             measured)}

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
    return [{"contender": name, "context": context, "steps": settings.decode_tokens,
             "time_per_token_s": timings[name].scaled(1 / settings.decode_tokens).to_dict(), **memory[name]}
            for name in models]


# --- analysis ------------------------------------------------------------------------------------


def analyse(settings: Settings, contenders: list[Contender], kinds: dict[str, list[str]], profile: cm.ModelProfile,
            records: dict) -> dict:
    """Ratios to the teacher, ideal ratios, target verdicts, skipped prefills."""
    timing_key = {"decode": "time_per_token_s", "prefill": "time_s"}
    teacher = {(phase, r["context"]): harness.Timing(tuple(r[timing_key[phase]]["samples"]))
               for phase in records for r in records[phase] if r["contender"] == "teacher"}
    rows: dict[str, list[dict]] = {"decode": [], "prefill": []}
    for phase, phase_rows in rows.items():
        for r in records[phase]:
            t = harness.Timing(tuple(r[timing_key[phase]]["samples"]))
            layers, context = kinds[r["contender"]], r["context"]
            speedup = harness.ratio_of(teacher[(phase, context)], t)
            if phase == "decode":
                ideal = cm.ideal_decode_speedup(profile, layers, context)
                cost = cm.decode_cost(profile, layers, context)
                extra = {"tokens_per_s": 1 / t.median, "bytes_per_token": cost.bytes, "flops_per_token": cost.flops,
                         "concat_model_speedup": cm.ideal_decode_speedup(profile, layers, context, kv_append="concat")}
            else:
                ideal = cm.ideal_prefill_speedup(profile, layers, context)
                extra = {"tokens_per_s": context / t.median, "flops": cm.prefill_cost(profile, layers, context).flops}
            phase_rows.append({**r, "speedup": speedup, "ideal_speedup": ideal,
                               "measured_over_ideal": speedup["median"] / ideal, **extra})
    return {**rows, "prefill_skipped": _skipped_prefills(settings, profile, rows["prefill"], len(contenders)),
            "targets": targets(profile.num_layers, rows["decode"], rows["prefill"])}


def _skipped_prefills(settings, profile, prefill_rows, n_models) -> list[dict]:
    teacher_rows = sorted((r for r in prefill_rows if r["contender"] == "teacher"), key=lambda r: r["context"])
    full, out = [cm.FULL] * profile.num_layers, []
    for context in (t for t in settings.contexts if t > settings.prefill_max):
        reason = f"prefill at T={context} not run (--prefill-max {settings.prefill_max}): attention cost grows as T^2"
        estimate = None
        if teacher_rows:
            ref = teacher_rows[-1]
            scale = cm.prefill_cost(profile, full, context).flops / cm.prefill_cost(profile, full, ref["context"]).flops
            estimate = ref["time_s"]["median"] * scale
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
    h = next((r for r in decode_rows if r["contender"] == f"k={k_half}" and r["context"] == HEADLINE_CONTEXT), None)
    return {
        "cache_exact": {"met": not mismatches, "checked": len(cache_rows), "mismatches": mismatches},
        "speedup_vs_ideal": {"met": None if not sum(checked.values()) else not misses, "checked": checked,
                             "min_context": TARGET_MIN_CONTEXT, "fraction": TARGET_IDEAL_FRACTION, "misses": misses},
        "headline": {"met": None if h is None else h["speedup"]["median"] >= HEADLINE_SPEEDUP,
                     "contender": f"k={k_half}", "context": HEADLINE_CONTEXT, "target": HEADLINE_SPEEDUP,
                     **{key: None if h is None else h[field] for key, field in (("speedup", "speedup"),
                        ("ideal", "ideal_speedup"), ("concat_model", "concat_model_speedup"))}},
    }


def measure(s: Settings) -> dict:
    from dtr_core.models import load_model
    from dtr_core.hybrid.surgery import num_layers

    logger.info("measuring the %s's memory bandwidth and matmul throughput", s.device)
    balance = cm.measure_machine_balance(size_mb=s.balance_mb, device=s.device)
    teacher, _ = load_model(s.model)
    teacher.to(device=s.device, dtype=DTYPES[s.dtype]).eval()
    L = num_layers(teacher)
    contenders = plan_contenders(L, s.fractions, read_greedy_order(s.layers_from) if s.layers_from else None)
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
    return harness.spread(speedup, ".2f", "x", "low", "high")


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("**MET**" if met else "**MISSED**")


def _device(result: dict) -> str:
    device = result["machine"].get("device", "cpu")
    return "CPU" if device == "cpu" else device


def _targets(t: dict, label: dict) -> list[list[str]]:
    c, v, h = t["cache_exact"], t["speedup_vs_ideal"], t["headline"]
    misses = ", ".join(f"{m['phase']} {label.get(m['contender'], m['contender'])} T={_label(m['context'])} "
                       f"{m['speedup']:.2f}x of {m['ideal']:.2f}x ({m['measured_over_ideal']:.2f})"
                       for m in sorted(v["misses"], key=lambda m: m["measured_over_ideal"])) or "-"
    return [["cache = K/V of the full layers + constant linear states", _verdict(c["met"]),
             f"{c['checked']} caches checked; mismatches: {len(c['mismatches'])}"],
            [f"every speed-up at T >= {_label(v['min_context'])} >= {v['fraction']} x its ideal", _verdict(v["met"]),
             f"{v['checked']['decode']} decode, {v['checked']['prefill']} prefill ratios; below: {misses}"],
            [f"decode {h['contender']} at T={_label(h['context'])} >= {h['target']}x", _verdict(h["met"]),
             "-" if h["speedup"] is None else f"{_speedup(h['speedup'])}; ideal {h['ideal']:.2f}x, concat-KV model "
             f"{h['concat_model']:.2f}x"]]


def _sections(result: dict) -> list[str]:
    """Contenders, decode (summary and details), prefill, memory and targets."""
    s, L, table = result["settings"], result["num_layers"], harness.markdown_table
    label = {c["name"]: "teacher" if c["k"] is None else f"k={c['k']}/{L}" for c in result["contenders"]}
    decode, prefill = result["decode"], result["prefill"]
    contexts = sorted({r["context"] for r in decode})
    cell = {(r["contender"], r["context"]): f"{r['speedup']['median']:.2f}x ({r['ideal_speedup']:.2f}x)"
            for r in decode}
    details = [[_label(r["context"]), label[r["contender"]], f"{r['time_per_token_s']['median'] * 1e3:.1f}",
                f"{r['time_per_token_s']['min'] * 1e3:.1f}-{r['time_per_token_s']['max'] * 1e3:.1f}",
                f"{r['tokens_per_s']:.2f}", _speedup(r["speedup"]), f"{r['ideal_speedup']:.2f}x",
                f"{r['measured_over_ideal']:.2f}", f"{r['concat_model_speedup']:.2f}x",
                harness.cpu_per_wall(r["time_per_token_s"])] for r in decode]
    prefills = [[_label(r["context"]), label[r["contender"]], harness.format_seconds(r["time_s"]["median"]),
                 f"{harness.format_seconds(r['time_s']['min'])}-{harness.format_seconds(r['time_s']['max'])}",
                 f"{r['tokens_per_s']:.0f}", _speedup(r["speedup"]), f"{r['ideal_speedup']:.2f}x",
                 f"{r['measured_over_ideal']:.2f}", harness.cpu_per_wall(r["time_s"])] for r in prefill]
    prefill_by = {(r["contender"], r["context"]): r for r in prefill}
    memory = []
    for r in decode:
        p = prefill_by.get((r["contender"], r["context"]))
        cache = (p or r)["cache"]
        memory.append([_label(r["context"]), label[r["contender"]], harness.format_bytes(cache["measured"]),
                       harness.format_bytes(cache["formula"]),
                       "yes" if cache["exact"] and r["cache"]["exact"] else "NO",
                       harness.format_bytes(p["peak_bytes"]) if p else "not run",
                       harness.format_bytes(r["peak_bytes"])])
    peak = "peak RSS" if _device(result) == "CPU" else "peak GPU memory"
    prefill_lines = [f"Median over {s['prefill_repeats']} repeats of one forward over T tokens.", "",
                     table(["T", "model", "time", "min-max", "tokens/s", "speed-up [range]", "ideal", "measured/ideal",
                            "cpu/wall"], prefills), ""] if prefill else []
    return ["\n".join(lines) for lines in (
        ["## Contenders", "", table(["model", "linear layers", "placement"], [
            [label[c["name"]], ", ".join(map(str, c["linear_layers"])) or "none", c["placement"]]
            for c in result["contenders"]], "lll")],
        ["## Decode speed-up vs the teacher: measured (ideal)", "",
         f"Median over {s['repeats']} repeats of {s['decode_tokens']} greedy steps from a synthetic cache of T tokens.",
         "", table(["model"] + [f"T={_label(x)}" for x in contexts],
                   [[label[n]] + [cell[(n, x)] for x in contexts] for n in label]), "", "## Decode details", "",
         table(["T", "model", "ms/token", "min-max ms", "tokens/s", "speed-up [range]", "ideal", "measured/ideal",
                "concat-KV model", "cpu/wall"], details)],
        ["## Prefill", "", *prefill_lines] + [f"- skipped: {skip['reason']}." for skip in result["prefill_skipped"]],
        ["## Memory", "", table(["T", "model", "cache (measured)", "formula", "exact", f"{peak} prefill",
                                 f"{peak} decode"], memory)],
        ["## Targets", "", table(["target", "verdict", "numbers"], _targets(result["targets"], label), "lll")])]


def markdown(result: dict) -> str:
    s, b = result["settings"], result["machine_balance"]
    balance = (f"{b['read_gbps']:.1f} GB/s read, {b['matvec_gbps']:.1f} GB/s matrix-vector, {b['gemm_gflops']:.0f} "
               f"GFLOP/s float32 matmul ({b['threads']} CPU threads): {b['balance_flop_per_byte']:.1f} FLOP/byte")
    plots_ = "\n".join(["", "## Plots", ""] + [f"![{name[:-4].replace('_', ' ')}]({name})\n"
                                               for name in result.get("files", []) if name.endswith(".png")])
    return harness.report(f"Inference: {s['model']} teacher vs {s['mixer']} hybrids ({_device(result)}, batch 1)",
                          result, *_sections(result), extra={"dtype": s["dtype"], "machine balance": balance}) + plots_


def plots(result: dict, out_dir: Path) -> list[str]:
    """decode_speedup.png, prefill_speedup.png (with 2+ prefill contexts), cache_memory.png."""
    model, mixer, L = result["settings"]["model"], result["settings"]["mixer"], result["num_layers"]
    names = []
    for phase in ("decode", "prefill"):
        contexts = sorted({r["context"] for r in result[phase]})
        if len(contexts) < (1 if phase == "decode" else 2):
            continue
        series = []
        for c in (c for c in result["contenders"] if c["k"] is not None):
            mine, label = {r["context"]: r for r in result[phase] if r["contender"] == c["name"]}, f"k={c['k']}/{L}"
            series += [harness.Series(f"{label} measured", contexts, [mine[t]["speedup"]["median"] if t in mine
                                                                      else None for t in contexts], group=label),
                       harness.Series(f"{label} ideal", contexts, [mine[t]["ideal_speedup"] if t in mine else None
                                                                   for t in contexts], group=label, dashed=True,
                                      marker=None)]
        harness.plot_lines(out_dir / f"{phase}_speedup.png", series,
                           f"{phase.capitalize()} speed-up vs the teacher ({model}, {mixer})", "context T (tokens)",
                           "speed-up (teacher time / hybrid time)", logx=True, hline=1.0, xticks=contexts,
                           xticklabels=[_label(t) for t in contexts])
        names.append(f"{phase}_speedup.png")
    contexts, series = sorted({r["context"] for r in result["decode"]}), []
    for c in (c for c in result["contenders"] if c["k"] != 0):  # k=0 has the teacher's cache
        mine = {r["context"]: r["cache"] for r in result["decode"] if r["contender"] == c["name"]}
        label = "teacher (= k=0)" if c["k"] is None else f"k={c['k']}/{L}"
        series += [harness.Series(f"{label} {key}", contexts, [mine[t][key] / 2**20 for t in contexts], group=label,
                                  dashed=key == "formula", marker=None if key == "formula" else "o")
                   for key in ("measured", "formula")]
    harness.plot_lines(out_dir / "cache_memory.png", series, f"Decoding cache size ({model}, batch 1)",
                       "context T (tokens)", "cache (MiB)", logx=True, logy=True, xticks=contexts,
                       xticklabels=[_label(t) for t in contexts])
    return names + ["cache_memory.png"]


BENCH = harness.Benchmark("inference", Settings, measure, markdown, plots, check=check, presets={"quick": QUICK},
                          ok=lambda result: result["targets"]["cache_exact"]["met"])
main = BENCH.main

if __name__ == "__main__":
    sys.exit(main())
