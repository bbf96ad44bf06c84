"""Markdown report and plots of `benchmarks.inference` (the measuring lives there; this only renders its JSON)."""

from __future__ import annotations

from pathlib import Path

from benchmarks import common


def _context_label(context: int) -> str:
    return f"{context // 1024}K" if context % 1024 == 0 and context >= 1024 else str(context)


def _verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("MET" if met else "MISSED")


def _speedup_cell(speedup: dict) -> str:
    return f"{speedup['median']:.2f}x [{speedup['low']:.2f}-{speedup['high']:.2f}]"


def _cpu(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _labels(result: dict) -> dict[str, str]:
    layers = result["num_layers"]
    return {c["name"]: "teacher" if c["k"] is None else f"k={c['k']}/{layers}" for c in result["contenders"]}


def _device(result: dict) -> str:
    """Where the benchmark ran: CPU, or the GPU's name."""
    device = result["machine"].get("device", "cpu")
    return "CPU" if device == "cpu" else device


def _on_gpu(result: dict) -> bool:
    return _device(result) != "CPU"


def _footer(result: dict) -> str:
    machine = result["machine"]
    where = f"{machine['cpu_model']}, torch threads: {machine['torch_threads']}"
    if _on_gpu(result):
        where = f"{_device(result)}, {result['settings']['dtype']}; host {where}"
    return f"_`{result['commands']['dtr']}`; {where}, load {machine['load_average']}_"


def _balance_line(b: dict) -> str:
    return (f"{b['read_gbps']:.1f} GB/s read, {b['matvec_gbps']:.1f} GB/s matrix-vector, {b['gemm_gflops']:.0f} "
            f"GFLOP/s float32 matmul (on the benchmark's device; {b['threads']} CPU threads): balance "
            f"{b['balance_flop_per_byte']:.1f} FLOP/byte, above "
            "decode's <= 1.5 FLOP/byte, so decode is memory-bound")


def _contenders_section(result: dict, label: dict[str, str]) -> list[str]:
    rows = [[label[c["name"]], ", ".join(map(str, c["linear_layers"])) or "none", c["placement"]]
            for c in result["contenders"]]
    return ["## Contenders", "", common.markdown_table(["model", "linear layers", "placement"], rows, "lll")]


def _decode_sections(result: dict, label: dict[str, str]) -> list[str]:
    s, decode = result["settings"], result["decode"]
    contexts = sorted({r["context"] for r in decode})
    cell = {
        (r["contender"], r["context"]): f"{r['speedup']['median']:.2f}x ({r['ideal_speedup']:.2f}x)" for r in decode
    }
    summary = [[label[name]] + [cell[(name, t)] for t in contexts] for name in label]
    details = []
    for r in decode:
        t = r["time_per_token_s"]
        details.append([
            _context_label(r["context"]), label[r["contender"]], f"{t['median'] * 1e3:.1f}",
            f"{t['min'] * 1e3:.1f}-{t['max'] * 1e3:.1f}", f"{r['tokens_per_s']:.2f}", _speedup_cell(r["speedup"]),
            f"{r['ideal_speedup']:.2f}x", f"{r['measured_over_ideal']:.2f}", f"{r['concat_model_speedup']:.2f}x",
            _cpu(t["cpu_per_wall"]),
        ])
    return [
        "## Decode speed-up vs the teacher: measured (ideal)", "",
        f"Median over {s['repeats']} repeats of {s['decode_tokens']} greedy steps from a synthetic cache of T tokens; "
        "ideal = bytes(teacher) / bytes(hybrid) per token (`benchmarks/cost_model.py`).", "",
        common.markdown_table(["model"] + [f"T={_context_label(t)}" for t in contexts], summary), "",
        _footer(result), "",
        "## Decode details", "",
        common.markdown_table(["T", "model", "ms/token", "min-max ms", "tokens/s", "speed-up [range]", "ideal",
                               "measured/ideal", "concat-KV model", "cpu/wall"], details), "",
        "_concat-KV model_: the cost model with the K/V append done as this implementation does it (`torch.cat` "
        "rereads and rewrites every full layer's K/V each token); an explanation, not the target. _cpu/wall_: "
        "process CPU seconds per wall second while timing (about the thread count when the process has its cores).",
    ]


def _prefill_section(result: dict, label: dict[str, str]) -> list[str]:
    s, prefill = result["settings"], result["prefill"]
    out = ["## Prefill", ""]
    if prefill:
        rows = []
        for r in prefill:
            t = r["time_s"]
            rows.append([
                _context_label(r["context"]), label[r["contender"]], common.format_seconds(t["median"]),
                f"{common.format_seconds(t['min'])}-{common.format_seconds(t['max'])}", f"{r['tokens_per_s']:.0f}",
                _speedup_cell(r["speedup"]), f"{r['ideal_speedup']:.2f}x", f"{r['measured_over_ideal']:.2f}",
                _cpu(t["cpu_per_wall"]),
            ])
        out += [f"Wall time of one forward over T tokens (fresh cache, logits of the last token only), median over "
                f"{s['prefill_repeats']} repeats; ideal = FLOPs(teacher) / FLOPs(hybrid).", "",
                common.markdown_table(["T", "model", "time", "min-max", "tokens/s", "speed-up [range]", "ideal",
                                       "measured/ideal", "cpu/wall"], rows), ""]
    out += [f"- skipped: {skip['reason']}." for skip in result["prefill_skipped"]]
    return out


def _memory_section(result: dict, label: dict[str, str]) -> list[str]:
    prefill_by = {(r["contender"], r["context"]): r for r in result["prefill"]}
    rows = []
    for r in result["decode"]:
        p = prefill_by.get((r["contender"], r["context"]))
        cache = (p or r)["cache"]
        exact = cache["exact"] and r["cache"]["exact"]
        rows.append([
            _context_label(r["context"]), label[r["contender"]], common.format_bytes(cache["measured"]),
            common.format_bytes(cache["formula"]), "yes" if exact else "NO",
            common.format_bytes(p["peak_bytes"]) if p else "not run", common.format_bytes(r["peak_bytes"]),
        ])
    peak = ("Peak GPU memory: torch's peak CUDA allocation above the start of the prefill, or of building the "
            "T-token cache and decoding from it (`common.PeakCudaMemory`)." if _on_gpu(result) else
            "Peak RSS: resident memory above the start of the prefill, or of building the T-token cache and "
            "decoding from it (`common.PeakRSS`).")
    name = "peak GPU memory" if _on_gpu(result) else "peak RSS"
    return [
        "## Memory", "",
        "Cache: storage bytes of every tensor the cache holds, after a real prefill where one ran and for the "
        "synthetic cache (both must match); formula: K/V of the full layers + constant linear states "
        f"(`cost_model.cache_bytes`, equal to `dtr_core.hybrid.cache_bytes`). {peak}", "",
        common.markdown_table(["T", "model", "cache (measured)", "formula", "exact", f"{name} prefill",
                               f"{name} decode"], rows),
    ]


def _target_lines(result: dict) -> list[str]:
    t = result["targets"]
    c = t["cache_exact"]
    lines = [f"- Cache memory exactly the K/V of the full layers left + the constant recurrent state: "
             f"**{_verdict(c['met'])}** ({c['checked']} caches checked"
             + (f"; mismatches: {c['mismatches']}" if c["mismatches"] else "") + ")."]
    v = t["speedup_vs_ideal"]
    text = (f"- Every measured speed-up at T >= {_context_label(v['min_context'])} at least {v['fraction']} of its "
            f"ideal: **{_verdict(v['met'])}** ({v['checked']['decode']} decode and {v['checked']['prefill']} prefill "
            "ratios checked")
    if v["misses"]:
        worst = sorted(v["misses"], key=lambda m: m["measured_over_ideal"])
        text += "; below: " + ", ".join(
            f"{m['phase']} {m['contender']} T={_context_label(m['context'])} {m['speedup']:.2f}x of {m['ideal']:.2f}x "
            f"({m['measured_over_ideal']:.2f})" for m in worst)
    lines.append(text + ").")
    h = t["headline"]
    head = (f"- Headline: {h['contender']} (half the layers linear), T={_context_label(h['context'])}, decode >= "
            f"{h['target']}x the teacher: ")
    if h["speedup"] is None:
        lines.append(head + "**not measured** in this run.")
    else:
        lines.append(head + f"**{_verdict(h['met'])}**, {_speedup_cell(h['speedup'])}; the cost model's ideal is "
                     f"{h['ideal']:.2f}x (K/V appended in place) and {h['concat_model']:.2f}x with this "
                     "implementation's `torch.cat` append.")
    return lines


def markdown_report(result: dict) -> str:
    s = result["settings"]
    label = _labels(result)
    env = common.environment_markdown(result["machine"], result["commands"], {
        "load average at end": result["load_average_end"],
        "wall time of the run": f"{result['wall_time_s'] / 60:.1f} min",
        "machine balance": _balance_line(result["machine_balance"]),
    })
    out = [f"# Inference: {s['model']} teacher vs {s['mixer']} hybrids ({_device(result)}, batch 1)", "", env, ""]
    for section in (_contenders_section, _decode_sections, _prefill_section, _memory_section):
        out += section(result, label) + ["", _footer(result), ""]
    out += ["## Targets", ""] + _target_lines(result) + ["", "## Plots", ""]
    out += [f"![{name[:-4].replace('_', ' ')}]({name})\n" for name in result.get("files", []) if name.endswith(".png")]
    return "\n".join(out)


def _speedup_series(result: dict, phase: str, contexts: list[int]) -> list[common.Series]:
    series = []
    for c in result["contenders"]:
        if c["k"] is None:
            continue
        mine = {r["context"]: r for r in result[phase] if r["contender"] == c["name"]}
        label = f"k={c['k']}/{result['num_layers']}"
        measured = [mine[t]["speedup"]["median"] if t in mine else None for t in contexts]
        ideal = [mine[t]["ideal_speedup"] if t in mine else None for t in contexts]
        series.append(common.Series(f"{label} measured", contexts, measured, group=label))
        series.append(common.Series(f"{label} ideal", contexts, ideal, group=label, dashed=True, marker=None))
    return series


def write_plots(result: dict, out_dir: Path) -> list[str]:
    """decode_speedup.png, prefill_speedup.png (with 2+ prefill contexts), cache_memory.png; returns the names."""
    model, mixer = result["settings"]["model"], result["settings"]["mixer"]
    names = []
    for phase in ("decode", "prefill"):
        contexts = sorted({r["context"] for r in result[phase]})
        if len(contexts) < (1 if phase == "decode" else 2):
            continue
        name = f"{phase}_speedup.png"
        common.plot_lines(out_dir / name, _speedup_series(result, phase, contexts),
                          f"{phase.capitalize()} speed-up vs the teacher ({model}, {mixer})", "context T (tokens)",
                          "speed-up (teacher time / hybrid time)", logx=True, hline=1.0, xticks=contexts,
                          xticklabels=[_context_label(t) for t in contexts])
        names.append(name)
    contexts = sorted({r["context"] for r in result["decode"]})
    series = []
    for c in result["contenders"]:
        if c["k"] == 0:
            continue  # the same cache as the teacher's
        mine = {r["context"]: r["cache"] for r in result["decode"] if r["contender"] == c["name"]}
        label = "teacher (= k=0)" if c["k"] is None else f"k={c['k']}/{result['num_layers']}"
        measured = [mine[t]["measured"] / 2**20 for t in contexts]
        formula = [mine[t]["formula"] / 2**20 for t in contexts]
        series.append(common.Series(f"{label} measured", contexts, measured, group=label))
        series.append(common.Series(f"{label} formula", contexts, formula, group=label, dashed=True, marker=None))
    common.plot_lines(out_dir / "cache_memory.png", series, f"Decoding cache size ({model}, batch 1)",
                      "context T (tokens)", "cache (MiB)", logx=True, logy=True, xticks=contexts,
                      xticklabels=[_context_label(t) for t in contexts])
    return names + ["cache_memory.png"]
