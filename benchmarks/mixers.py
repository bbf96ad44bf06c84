"""Timing of the linear-attention ops against causal softmax attention (SDPA), on CPU or a CUDA GPU.

For each mixer op (`gla`, `gated_delta_rule`) and sequence length T, times (no grad, batch 1, H = 9,
D = 64 like SmolLM2-135M):
- `naive`: the per-token recurrent loop (`naive_recurrent_*`), the whole sequence;
- `chunk`: the chunked parallel form (`chunk_*`), the whole sequence (training / prefill);
- `step`: one decoding step (`recurrent_*_step`) from a state, per token;
and, once per T, `torch.nn.functional.scaled_dot_product_attention`:
- `sdpa`: causal prefill of the whole sequence;
- `sdpa_decode`: one query against T cached keys/values, per token.

Every number is measured (the naive loop too, at every T): one warm-up call (on a prefix for long
sequences), then the median of up to `repeats` calls (at least 3; slow ones stop after ~20 s) with the
min-max spread. The naive and chunked calls of one op and T alternate (naive, chunk, naive, chunk, ..),
so both see the same machine and their ratio holds up when its speed drifts. `--clock cpu` times this
process's CPU time instead of wall time: with `--threads 1` it stays meaningful when other jobs share the
machine. `vs naive` and `vs SDPA` are speed-ups (reference time / this time) against the naive loop and
against SDPA in the same unit: whole-sequence rows against `sdpa`, per-token rows against `sdpa_decode` and
against the naive loop's time per token. The crossover is the smallest measured T from which the chunked
form beats SDPA prefill at every larger measured T.

On a CUDA GPU (`--device cuda`) every tensor lives on the GPU, each timed call is bracketed by
`torch.cuda.synchronize()`, T goes up to 64K, and an `fla` row per op times flash-linear-attention's Triton
kernels (`dtr_core.ops.dispatch`, backend "fla") next to our PyTorch `chunk` form.

    python -m benchmarks.mixers [--quick] [--json] [--threads N] [--clock wall|cpu] [--device cpu|cuda]
    dtr bench mixers [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from benchmarks import common
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
HEADS, HEAD_DIM = 9, 64  # SmolLM2-135M: 9 query heads of 64
DECODE_STEPS = 32  # consecutive steps timed together for the per-token rows
WARMUP_MAX_LENGTH = 8192  # warm-up calls of the whole-sequence rows run on at most this prefix
GLA_GATE_NORMALIZER = 16.0  # GLA's logsigmoid(x) / 16 gate, so decay is realistic, not instant
OPS = ("gla", "gated_delta_rule")


@dataclass(frozen=True)
class Row:
    op: str  # "gla" | "gated_delta_rule" | "attention"
    impl: str  # "naive" | "chunk" | "step" | "sdpa" | "sdpa_decode"
    length: int
    unit: str  # "sequence" (whole prefill) | "token" (one decoding step)
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    vs_naive: float | None = None  # naive time / this time, same unit
    vs_sdpa: float | None = None  # sdpa (prefill or decode) time / this time, same unit


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter
_device = torch.device("cpu")

MIN_REPEATS, REPEAT_BUDGET_S = 3, 20.0  # past 3 repeats, stop once a measurement has taken 20 s


def _time_interleaved(
    fns: list[Callable[[], object]], repeats: int, warmups: list[Callable[[], object] | None]
) -> list[list[float]]:
    """Times in ms of `repeats` rounds of calls, each round calling every fn once in turn, after one warm-up
    call each (fewer rounds, but at least 3, when they are slow). Interleaving lets the fns share whatever
    the machine does meanwhile, so their ratios hold up when its speed drifts."""
    for fn, warmup in zip(fns, warmups):
        (warmup or fn)()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            common.synchronize(_device)
            start = _clock()
            fn()
            common.synchronize(_device)
            fn_times.append((_clock() - start) * 1e3)
        if len(times[0]) >= MIN_REPEATS and sum(map(sum, times)) > REPEAT_BUDGET_S * 1e3 * len(fns):
            break
    return times


def _time_ms(fn: Callable[[], object], repeats: int, warmup: Callable[[], object] | None = None) -> list[float]:
    """Times in ms of `repeats` calls after one warm-up call (fewer, but at least 3, for slow calls)."""
    return _time_interleaved([fn], repeats, [warmup])[0]


def _inputs(op: str, length: int, heads: int, dim: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(_device)

    q, k, v = randn(1, length, heads, dim), randn(1, length, heads, dim), randn(1, length, heads, dim)
    if op == "gla":
        return {"q": q, "k": k, "v": v, "gk": F.logsigmoid(randn(1, length, heads, dim)) / GLA_GATE_NORMALIZER}
    return {
        "q": F.normalize(q, dim=-1),
        "k": F.normalize(k, dim=-1),
        "v": v,
        "g": F.logsigmoid(randn(1, length, heads) + 4.0),  # decay close to 1, as trained models have
        "beta": torch.sigmoid(randn(1, length, heads)),
    }


def _head(inputs: dict[str, torch.Tensor], length: int, start: int = 0) -> dict[str, torch.Tensor]:
    return {name: x[:, start : start + length] for name, x in inputs.items()}


NAIVE = {"gla": naive_recurrent_gla, "gated_delta_rule": naive_recurrent_gated_delta_rule}
CHUNK = {"gla": chunk_gla, "gated_delta_rule": chunk_gated_delta_rule}
STEP = {"gla": recurrent_gla_step, "gated_delta_rule": recurrent_gated_delta_rule_step}
FLA = {"gla": dispatch.gla, "gated_delta_rule": dispatch.gated_delta_rule}  # backend="fla": CUDA only


def _spread(op: str, impl: str, length: int, unit: str, times: list[float], per: int = 1) -> Row:
    times = [t / per for t in times]
    return Row(op, impl, length, unit, statistics.median(times), min(times), max(times), len(times))


def _measure_op(op: str, length: int, heads: int, dim: int, repeats: int) -> list[Row]:
    inputs = _inputs(op, length, heads, dim, torch.Generator().manual_seed(length))
    warm = _head(inputs, min(length, 256))  # warm the naive loop on a prefix: its cost is per token anyway
    warm_chunk = _head(inputs, min(length, WARMUP_MAX_LENGTH))
    impls = {"naive": (lambda: NAIVE[op](**inputs), lambda: NAIVE[op](**warm)),
             "chunk": (lambda: CHUNK[op](**inputs), lambda: CHUNK[op](**warm_chunk))}
    if _device.type == "cuda":
        impls["fla"] = (lambda: FLA[op](**inputs, backend="fla"), lambda: FLA[op](**warm_chunk, backend="fla"))
    times = _time_interleaved([fn for fn, _ in impls.values()], repeats, [warmup for _, warmup in impls.values()])
    rows = [_spread(op, impl, length, "sequence", impl_times) for impl, impl_times in zip(impls, times)]
    _, state = CHUNK[op](**inputs, output_final_state=True)  # decode from the state after `length` tokens
    steps = min(DECODE_STEPS, length)
    tokens = [_head(inputs, 1, start=t) for t in range(steps)]

    def decode() -> None:
        current = state
        for token in tokens:
            _, current = STEP[op](**token, state=current)

    rows.append(_spread(op, "step", length, "token", _time_ms(decode, repeats), per=steps))
    return rows


def _measure_sdpa(length: int, heads: int, dim: int, repeats: int) -> list[Row]:
    gen = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(1, heads, length, dim, generator=gen).to(_device) for _ in range(3))  # (B, H, T, D)
    warm = [x[:, :, :WARMUP_MAX_LENGTH] for x in (q, k, v)]
    prefill = _time_ms(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        repeats,
        lambda: F.scaled_dot_product_attention(*warm, is_causal=True),
    )
    steps = min(DECODE_STEPS, length)

    def decode() -> None:
        for t in range(steps):
            F.scaled_dot_product_attention(q[:, :, t : t + 1], k, v)  # one new query, T cached keys

    return [
        _spread("attention", "sdpa", length, "sequence", prefill),
        _spread("attention", "sdpa_decode", length, "token", _time_ms(decode, repeats), per=steps),
    ]


def _with_ratios(rows: list[Row]) -> list[Row]:
    by_key = {(row.op, row.impl, row.length): row for row in rows}
    result = []
    for row in rows:
        sdpa = by_key.get(("attention", "sdpa" if row.unit == "sequence" else "sdpa_decode", row.length))
        naive = by_key.get((row.op, "naive", row.length))
        naive_ms = None
        if naive is not None:
            naive_ms = naive.median_ms if row.unit == "sequence" else naive.median_ms / row.length
        vs_naive = naive_ms / row.median_ms if naive_ms else None
        vs_sdpa = sdpa.median_ms / row.median_ms if sdpa else None
        result.append(Row(**{**asdict(row), "vs_naive": vs_naive, "vs_sdpa": vs_sdpa}))
    return result


def crossover(rows: list[Row], op: str) -> dict[str, int | None]:
    """Smallest measured T from which `chunk` beats SDPA prefill at every larger T (None if never)."""
    lengths = sorted({row.length for row in rows})
    time_of = {(row.op, row.impl, row.length): row.median_ms for row in rows}
    wins = [time_of[(op, "chunk", t)] < time_of[("attention", "sdpa", t)] for t in lengths]
    first = None
    for index in range(len(lengths) - 1, -1, -1):
        if not wins[index]:
            break
        first = index
    if first is None:
        return {"from_length": None, "after_length": None}
    return {"from_length": lengths[first], "after_length": lengths[first - 1] if first > 0 else None}


def run(lengths: tuple[int, ...], heads: int, dim: int, repeats: int, clock: str = "wall",
        device: str = "cpu") -> dict:
    global _clock, _device
    _clock, _device = CLOCKS[clock], torch.device(device)
    load_before = os.getloadavg()
    started = time.perf_counter()
    rows: list[Row] = []
    with torch.inference_mode():
        for length in lengths:
            for op in OPS:
                rows.extend(_measure_op(op, length, heads, dim, repeats))
            rows.extend(_measure_sdpa(length, heads, dim, repeats))
    rows = _with_ratios(rows)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "device": common.device_name(_device),
        "batch": 1,
        "heads": heads,
        "head_dim": dim,
        "dtype": "float32",
        "lengths": list(lengths),
        "repeats": repeats,
        "clock": clock,
        "wall_s": round(time.perf_counter() - started, 1),
        "loadavg_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
    }
    return {"meta": meta, "rows": [asdict(row) for row in rows], "crossover": {op: crossover(rows, op) for op in OPS}}


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}x"


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"batch {meta['batch']}, H={meta['heads']}, D={meta['head_dim']}, {meta['dtype']}, "
        f"device {meta.get('device', 'cpu')}, {meta['threads']} CPU threads, torch {meta['torch']}, "
        f"{meta['clock']} clock, median of up to "
        f"{meta['repeats']} repeats (1-min load avg before/after: {meta['loadavg_1min_before_after']}; "
        f"run took {meta['wall_s']} s)",
        "",
        "| op | impl | T | unit | median ms | min-max ms | vs naive | vs SDPA |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['op']} | {row['impl']} | {row['length']} | {row['unit']} | {row['median_ms']:.3f} | "
            f"{row['min_ms']:.3f}-{row['max_ms']:.3f} | {_fmt(row['vs_naive'])} | {_fmt(row['vs_sdpa'])} |"
        )
    lines.append("")
    for op, cross in result["crossover"].items():
        if cross["from_length"] is None:
            lines.append(f"- {op}: chunked never beats SDPA prefill at the measured T.")
        elif cross["after_length"] is None:
            lines.append(f"- {op}: chunked beats SDPA prefill at every measured T (from T={cross['from_length']}).")
        else:
            lines.append(
                f"- {op}: chunked beats SDPA prefill from T={cross['from_length']} on "
                f"(crossover between T={cross['after_length']} and T={cross['from_length']})."
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.mixers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the three shortest T, 3 repeats (< 2 min)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time (default); cpu: this process's CPU time, summed over threads, which with "
        "--threads 1 is robust to other jobs sharing the machine",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help=f"cuda: tensors on the GPU, T in {GPU_LENGTHS}, plus flash-linear-attention rows")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # tests: tiny shapes, seconds
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is visible to torch")
    if args.device == "cuda" and args.clock != "wall":
        parser.error("--clock cpu measures CPU time, not GPU work: use --clock wall with --device cuda")
    lengths = GPU_LENGTHS if args.device == "cuda" else FULL_LENGTHS
    if args.tiny:
        result = run(TINY_LENGTHS, heads=2, dim=16, repeats=2, clock=args.clock, device=args.device)
    elif args.quick:
        result = run(lengths[:3], HEADS, HEAD_DIM, repeats=3, clock=args.clock, device=args.device)
    else:
        result = run(lengths, HEADS, HEAD_DIM, repeats=5, clock=args.clock, device=args.device)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
