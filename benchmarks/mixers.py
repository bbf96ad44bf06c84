"""Time of the linear-attention ops (GLA, gated delta rule) against causal SDPA; method in docs/BENCHMARKS_MIXERS.md.

Per op and length T (no grad, batch 1, H = 9 query heads sharing H_kv = 3 key/value heads, D = 64 like SmolLM2-135M and
the students built from it): the naive per-token loop and the chunked
form over the sequence (plus flash-linear-attention's kernels on a GPU), one decoding `step` per token, and SDPA's
causal prefill and one-query decode against T cached keys; interleaved call by call after a warm-up.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys

import torch
import torch.nn.functional as F

from benchmarks import harness
from benchmarks.harness import option
from dtr_core.ops import dispatch
from dtr_core.ops.gated_delta_rule import (
    chunk_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
    recurrent_gated_delta_rule_step,
)
from dtr_core.ops.gla import chunk_gla, naive_recurrent_gla, recurrent_gla_step

FULL_LENGTHS = (512, 2048, 8192, 32768)
GPU_LENGTHS = (2048, 8192, 32768, 65536)
TINY_LENGTHS = (64, 130)  # tests only: checks the output's shape in seconds, says nothing about speed
DECODE_STEPS = 32  # consecutive steps timed together for the per-token rows
WARMUP_MAX_LENGTH = 8192  # warm-up calls of the whole-sequence rows run on at most this prefix
GLA_GATE_NORMALIZER = 16.0  # GLA's logsigmoid(x) / 16 gate, so decay is realistic, not instant
OPS = ("gla", "gated_delta_rule")
MIN_REPEATS, REPEAT_BUDGET_S = 3, 20.0  # past 3 repeats, stop once a measurement has taken 20 s

NAIVE = {"gla": naive_recurrent_gla, "gated_delta_rule": naive_recurrent_gated_delta_rule}
CHUNK = {"gla": chunk_gla, "gated_delta_rule": chunk_gated_delta_rule}
STEP = {"gla": recurrent_gla_step, "gated_delta_rule": recurrent_gated_delta_rule_step}
FLA = {"gla": dispatch.gla, "gated_delta_rule": dispatch.gated_delta_rule}  # backend="fla": CUDA only


@dataclasses.dataclass(frozen=True)
class Settings:
    lengths: tuple[int, ...] | None = option(None, "sequence lengths T (default 512-32K; on cuda 2K-64K)",
                                             harness.int_list, minimum=1)
    heads: int = option(9, "query heads H", minimum=1)
    kv_heads: int = option(3, "key/value heads H_kv (and recurrent states); H must be a multiple", minimum=1)
    head_dim: int = option(64, "head dim D", minimum=1)
    repeats: int = option(5, "timed repeats (at least 3; slow ones stop after ~20 s)", minimum=1)
    clock: str = option("wall", "wall: elapsed time; cpu: this process's CPU time (with --threads 1 robust to "
                        "other jobs)", choices=("wall", "cpu"))
    device: str = option("cpu", "cuda: tensors on the GPU, plus flash-linear-attention rows", choices=("cpu", "cuda"))


def check(settings: Settings, preset: str | None) -> Settings:
    harness.check_device(settings.device)
    if settings.heads % settings.kv_heads:
        raise ValueError(f"--heads {settings.heads} must be a multiple of --kv-heads {settings.kv_heads}")
    if settings.device == "cuda" and settings.clock != "wall":
        raise ValueError("--clock cpu measures CPU time, not GPU work: use --clock wall with --device cuda")
    if settings.lengths is not None:
        return settings
    lengths = GPU_LENGTHS if settings.device == "cuda" else FULL_LENGTHS
    return dataclasses.replace(settings, lengths=lengths[:3] if preset == "quick" else lengths)


@dataclasses.dataclass(frozen=True)
class Row:
    op: str  # "gla" | "gated_delta_rule" | "attention"
    impl: str  # "naive" | "chunk" | "fla" | "step" | "sdpa" | "sdpa_decode"
    length: int
    unit: str  # "sequence" (whole prefill) | "token" (one decoding step)
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    vs_naive: float | None = None  # naive time / this time, same unit
    vs_sdpa: float | None = None  # sdpa (prefill or decode) time / this time, same unit


def _time(s: Settings, fns: dict, warmups: dict | None = None) -> dict[str, list[float]]:
    """ms per call of each fn, interleaved call by call (same order every round) after one warm-up each."""
    def run(fn) -> harness.Sample:
        sample = harness.timed(fn, s.device)
        return sample if s.clock == "wall" else harness.Sample(sample.cpu_s, sample.cpu_s)

    timings = harness.interleave({name: (lambda fn=fn: run(fn)) for name, fn in fns.items()}, s.repeats,
                                 warmup=warmups or {},
                                 rotate=False, budget_s=REPEAT_BUDGET_S, min_repeats=MIN_REPEATS)
    return {name: [t * 1e3 for t in timing.samples] for name, timing in timings.items()}


def _row(op: str, impl: str, length: int, unit: str, times: list[float], per: int = 1) -> Row:
    times = [t / per for t in times]
    return Row(op, impl, length, unit, statistics.median(times), min(times), max(times), len(times))


def _inputs(op: str, length: int, s: Settings) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(length)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(s.device)

    q = randn(1, length, s.heads, s.head_dim)  # (B, T, H, D)
    k, v = (randn(1, length, s.kv_heads, s.head_dim) for _ in range(2))  # (B, T, H_kv, D)
    if op == "gla":
        return {"q": q, "k": k, "v": v,
                "gk": F.logsigmoid(randn(1, length, s.kv_heads, s.head_dim)) / GLA_GATE_NORMALIZER}
    return {"q": F.normalize(q, dim=-1), "k": F.normalize(k, dim=-1), "v": v,
            "g": F.logsigmoid(randn(1, length, s.kv_heads) + 4.0),  # decay close to 1, as trained models have
            "beta": torch.sigmoid(randn(1, length, s.kv_heads))}


def _head(inputs: dict[str, torch.Tensor], length: int, start: int = 0) -> dict[str, torch.Tensor]:
    return {name: x[:, start : start + length] for name, x in inputs.items()}


def _measure_op(op: str, length: int, s: Settings) -> list[Row]:
    inputs = _inputs(op, length, s)
    warm = _head(inputs, min(length, 256))  # warm the naive loop on a prefix: its cost is per token anyway
    warm_chunk = _head(inputs, min(length, WARMUP_MAX_LENGTH))
    fns = {"naive": lambda: NAIVE[op](**inputs), "chunk": lambda: CHUNK[op](**inputs)}
    warmups = {"naive": lambda: NAIVE[op](**warm), "chunk": lambda: CHUNK[op](**warm_chunk)}
    if s.device == "cuda":
        fns["fla"] = lambda: FLA[op](**inputs, backend="fla")
        warmups["fla"] = lambda: FLA[op](**warm_chunk, backend="fla")
    rows = [_row(op, impl, length, "sequence", times) for impl, times in _time(s, fns, warmups).items()]
    _, state = CHUNK[op](**inputs, output_final_state=True)  # decode from the state after `length` tokens
    tokens = [_head(inputs, 1, start=t) for t in range(min(DECODE_STEPS, length))]

    def decode() -> None:
        current = state
        for token in tokens:
            _, current = STEP[op](**token, state=current)

    return rows + [_row(op, "step", length, "token", _time(s, {"step": decode})["step"], per=len(tokens))]


def _measure_sdpa(length: int, s: Settings) -> list[Row]:
    generator = torch.Generator().manual_seed(length)
    q = torch.randn(1, s.heads, length, s.head_dim, generator=generator).to(s.device)  # (B, H, T, D): SDPA's layout
    k, v = (torch.randn(1, s.kv_heads, length, s.head_dim, generator=generator).to(s.device) for _ in range(2))
    grouped = s.kv_heads != s.heads  # the teacher's GQA: H_kv cached key/value heads
    warm = [x[:, :, :WARMUP_MAX_LENGTH] for x in (q, k, v)]
    prefill = _time(s, {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=grouped)},
                    {"sdpa": lambda: F.scaled_dot_product_attention(*warm, is_causal=True, enable_gqa=grouped)})["sdpa"]
    steps = min(DECODE_STEPS, length)

    def decode() -> None:
        for t in range(steps):
            F.scaled_dot_product_attention(q[:, :, t : t + 1], k, v, enable_gqa=grouped)  # one query, T cached keys

    return [_row("attention", "sdpa", length, "sequence", prefill),
            _row("attention", "sdpa_decode", length, "token", _time(s, {"d": decode})["d"], per=steps)]


def _with_ratios(rows: list[Row]) -> list[Row]:
    by_key = {(row.op, row.impl, row.length): row for row in rows}
    result = []
    for row in rows:
        sdpa = by_key.get(("attention", "sdpa" if row.unit == "sequence" else "sdpa_decode", row.length))
        naive = by_key.get((row.op, "naive", row.length))
        naive_ms = None if naive is None else naive.median_ms / (1 if row.unit == "sequence" else row.length)
        result.append(dataclasses.replace(row, vs_naive=naive_ms / row.median_ms if naive_ms else None,
                                          vs_sdpa=sdpa.median_ms / row.median_ms if sdpa else None))
    return result


def crossover(rows: list[Row], op: str) -> dict[str, int | None]:
    """Smallest measured T from which `chunk` beats SDPA prefill at every larger T (None if never)."""
    lengths = sorted({row.length for row in rows})
    time_of = {(row.op, row.impl, row.length): row.median_ms for row in rows}
    first = None
    for index in range(len(lengths) - 1, -1, -1):
        if time_of[(op, "chunk", lengths[index])] >= time_of[("attention", "sdpa", lengths[index])]:
            break
        first = index
    if first is None:
        return {"from_length": None, "after_length": None}
    return {"from_length": lengths[first], "after_length": lengths[first - 1] if first > 0 else None}


def measure(s: Settings) -> dict:
    rows: list[Row] = []
    with torch.inference_mode():
        for length in s.lengths:
            for op in OPS:
                rows.extend(_measure_op(op, length, s))
            rows.extend(_measure_sdpa(length, s))
    rows = _with_ratios(rows)
    meta = {"device": harness.device_name(s.device), "batch": 1, "heads": s.heads, "kv_heads": s.kv_heads,
            "head_dim": s.head_dim,
            "dtype": "float32", "lengths": list(s.lengths), "repeats": s.repeats, "clock": s.clock}
    return {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows],
            "crossover": {op: crossover(rows, op) for op in OPS}}


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}x"


def markdown(result: dict) -> str:
    meta = result["meta"]
    rows = [[r["op"], r["impl"], r["length"], r["unit"], f"{r['median_ms']:.3f}",
             f"{r['min_ms']:.3f}-{r['max_ms']:.3f}", _ratio(r["vs_naive"]), _ratio(r["vs_sdpa"])]
            for r in result["rows"]]
    kv_heads = meta.get("kv_heads", meta["heads"])  # results measured before grouping had H_kv = H
    lines = [f"batch {meta['batch']}, H={meta['heads']}, H_kv={kv_heads}, D={meta['head_dim']}, {meta['dtype']}, "
             f"{meta['clock']} clock, median of up to {meta['repeats']} repeats", "",
             harness.markdown_table(["op", "impl", "T", "unit", "median ms", "min-max ms", "vs naive", "vs SDPA"],
                                    rows, "llrlrrrr"), ""]
    for op, cross in result["crossover"].items():
        after = cross["after_length"]
        lines.append(f"- {op}: chunked beats SDPA prefill from T = {cross['from_length']}"
                     + ("" if after is None else f" (crossover between T = {after} and T = {cross['from_length']})")
                     if cross["from_length"] is not None else f"- {op}: chunked never beats SDPA prefill")
    device = "CPU" if meta["device"] == "cpu" else meta["device"]
    return harness.report(f"Linear-attention ops vs softmax attention ({device})", result, "\n".join(lines))


BENCH = harness.Benchmark(
    "mixers", Settings, measure, markdown, check=check, publishes=False,
    presets={"quick": {"repeats": 3},
             "tiny": {"lengths": TINY_LENGTHS, "heads": 2, "kv_heads": 1, "head_dim": 16, "repeats": 2}})
main = BENCH.main

if __name__ == "__main__":
    sys.exit(main())
