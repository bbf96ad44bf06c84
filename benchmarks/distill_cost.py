"""Cost of blockwise local distillation (DtR phase 1): wall time per layer and training tokens/s, 1 vs 2 workers.

The same layers distilled from the same captured activations, into a fresh folder each time, by 1 worker x 1
thread (the baseline), 1 worker x 2 threads, 2 workers x 1 thread (Python threads, as the flow's thread runner)
and, with `--processes`, 2 spawned processes x 1 thread; a warm-up each, then the repeats interleaved.
Method and reading: docs/BENCHMARKS_DISTILL.md.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.harness import option
from benchmarks.students import DISTILL, DISTILL_BATCH, WORK_DIR, distill_config

logger = logging.getLogger("benchmarks.distill_cost")

WARMUP_STEPS = 2


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = option("smollm2-135m", "teacher: a dtr_core.models.load_model source")
    mixer: str = option("gated_deltanet", "student type")
    layers: int = option(4, "layers distilled per batch", minimum=1)
    steps: int = option(DISTILL["distill_steps"], "optimiser steps per layer", minimum=1)
    tokens: int = option(DISTILL["distill_tokens"], "captured teacher tokens", minimum=1)
    seq_len: int = option(DISTILL["distill_seq_len"], "tokens per sequence", minimum=1)
    repeats: int = option(3, "timed repeats", minimum=1)
    processes: bool = option(False, "also measure 2 spawned processes x 1 thread")
    work_dir: str = option(WORK_DIR, "captured activations and scratch folders")


def check(s: Settings, preset: str | None) -> Settings:
    harness.check_mixer(s.mixer)
    if s.tokens // s.seq_len < 2:
        raise ValueError(f"--tokens ({s.tokens}) must hold at least 2 sequences of --seq-len {s.seq_len}")
    return s


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    workers: int
    threads: int
    kind: str  # "serial" | "threads" | "processes"


CONFIGS = (Config("1 worker x 1 thread", 1, 1, "serial"), Config("1 worker x 2 threads", 1, 2, "serial"),
           Config("2 workers x 1 thread", 2, 1, "threads"))
PROCESS_CONFIG = Config("2 processes x 1 thread", 2, 1, "processes")
BASELINE = CONFIGS[0].name

_WORKER: dict = {}  # the teacher of a worker process


def _worker_init(model_name: str, threads: int) -> None:
    from dtr_core.models import load_model

    torch.set_num_threads(threads)
    _WORKER["model"], _ = load_model(model_name)


def _worker_distill(layer: int, activations: str, mixer: str, config: dict, out_dir: str) -> dict:
    from dtr_core.distill.training import DistillConfig, distill_layer

    return distill_layer(_WORKER["model"], layer, activations, mixer, DistillConfig.from_dict(config),
                         out_dir).to_dict()


class Runner:
    """Distils a list of layers under one configuration into a fresh folder; returns (Sample, layer results)."""

    def __init__(self, model, settings: Settings, activations: Path, config: Config):
        self.model, self.settings, self.activations, self.config = model, settings, activations, config
        self.pool = None
        if config.kind == "processes":
            import multiprocessing

            self.pool = ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init, initargs=(settings.model, config.threads))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def __call__(self, layers: Sequence[int], steps: int) -> tuple[harness.Sample, list[dict]]:
        from dtr_core.distill.training import distill_layer

        config, s = distill_config(steps), self.settings
        out = Path(tempfile.mkdtemp(prefix="distill-cost-", dir=s.work_dir))
        previous = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        results: list[dict] = []

        def one(layer: int) -> dict:
            return distill_layer(self.model, layer, self.activations, s.mixer, config, out).to_dict()

        def work() -> None:
            if self.config.kind == "serial":
                results.extend(one(layer) for layer in layers)
            elif self.config.kind == "threads":
                with ThreadPoolExecutor(self.config.workers) as pool:
                    results.extend(pool.map(one, layers))
            else:
                futures = [self.pool.submit(_worker_distill, layer, str(self.activations), s.mixer,
                                            config.to_dict(), str(out)) for layer in layers]
                results.extend(f.result() for f in futures)

        try:
            sample = harness.timed(work)
        finally:
            torch.set_num_threads(previous)
            shutil.rmtree(out, ignore_errors=True)
        # timing needs every step trained afresh; a student's quality verdict does not matter here
        bad = [r for r in results if r["reused"] or r.get("steps") != steps]
        if bad:
            raise RuntimeError(f"{self.config.name}: layers not freshly distilled: {bad}")
        return sample, results


def _spread(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(s: Settings) -> dict:
    from dtr_core.search.baselines import uniform_layers
    from dtr_core.distill.capture import capture_activations
    from dtr_core.run_layout import slug
    from dtr_core.distill.corpus import load_corpus, token_chunks
    from dtr_core.models import load_model
    from dtr_core.hybrid.surgery import num_layers

    configs = list(CONFIGS) + ([PROCESS_CONFIG] if s.processes else [])
    Path(s.work_dir).mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(s.model)
    model.eval()
    L = num_layers(model)
    layers = list(uniform_layers(L, min(s.layers, L)))
    activations = Path(s.work_dir) / f"{slug(s.model)}-distill-cost" / "activations"
    started = time.perf_counter()
    manifest = capture_activations(model, token_chunks(load_corpus("bbc"), tokenizer, s.seq_len, s.tokens),
                                   activations, layers=layers, metadata={"corpus": "bbc", "token_budget": s.tokens})
    capture = {"seconds": time.perf_counter() - started, "reused": bool(manifest.get("reused", False)),
               "tokens": manifest["num_tokens"], "layers": len(layers)}
    runners = {c.name: Runner(model, s, activations, c) for c in configs}
    layer_seconds: dict[str, list[float]] = {c.name: [] for c in configs}

    def task(name: str):
        def run() -> harness.Sample:
            sample, results = runners[name](layers, s.steps)
            layer_seconds[name].append(statistics.fmean(r["seconds"] for r in results))
            return sample

        return run

    def warm(runner: Runner):
        return lambda: runner(layers[:runner.config.workers], WARMUP_STEPS)

    try:
        logger.info("warm-up: one layer, %d steps, per configuration", WARMUP_STEPS)
        timings = harness.interleave({name: task(name) for name in runners}, s.repeats,
                                     warmup={name: warm(r) for name, r in runners.items()},
                                     on_sample=harness.log_sample(logger, f"{len(layers)} layers"))
    finally:
        for runner in runners.values():
            runner.close()
    tokens_per_layer = s.steps * DISTILL_BATCH * s.seq_len
    baseline = timings[BASELINE].scaled(1 / len(layers))
    rows = []
    for c in configs:
        per_layer = timings[c.name].scaled(1 / len(layers))
        rows.append({**dataclasses.asdict(c), "wall_per_layer_s": per_layer.to_dict(),
                     "tokens_per_s": _spread([tokens_per_layer / x for x in per_layer.samples]),
                     "layer_latency_s": _spread(layer_seconds[c.name]),
                     "speedup": harness.ratio_of(baseline, per_layer), "cpu_per_wall": timings[c.name].cpu_per_wall})
    return {"num_layers": L, "layers": layers, "batch_size": DISTILL_BATCH, "tokens_per_layer": tokens_per_layer,
            "capture": capture, "rows": rows}


def markdown(result: dict) -> str:
    s, c, L = result["settings"], result["capture"], result["num_layers"]
    base = next(r for r in result["rows"] if r["name"] == BASELINE)
    rows = [[r["name"], harness.spread(r["wall_per_layer_s"]) + " s", harness.spread(r["tokens_per_s"], ".0f"),
             harness.spread(r["layer_latency_s"]) + " s",
             f"{r['layer_latency_s']['median'] / base['layer_latency_s']['median']:.2f}x",
             f"{r['speedup']['median']:.2f}x [{r['speedup']['low']:.2f}-{r['speedup']['high']:.2f}]",
             f"{r['workers'] * r['threads']}x", harness.cpu_per_wall(r)]
            for r in result["rows"]]
    best = max(result["rows"], key=lambda r: r["speedup"]["median"])
    return harness.report(f"Distillation cost: {s['model']}, {s['mixer']} students", result, "\n".join([
        f"Layers {result['layers']} of {L}, each {s['steps']} AdamW steps of {result['batch_size']} sequences x "
        f"{s['seq_len']} tokens ({result['tokens_per_layer']} training tokens per layer); median [min-max] over "
        f"{s['repeats']} repeats after a warm-up; speed-up vs {BASELINE} in the same run.", "",
        harness.markdown_table(["configuration", "wall per layer", "training tokens/s", "one layer's latency",
                                "latency vs alone", "speed-up vs 1x1", "ideal", "CPU/wall"], rows), "",
        f"- fastest: {best['name']}, {best['speedup']['median']:.2f}x; all {L} layers at this budget: about "
        f"{best['wall_per_layer_s']['median'] * L / 60:.1f} min (time per layer x {L}, an estimate)",
        f"- teacher capture (once, shared by all layers): {c['tokens']} tokens x {c['layers']} layers in "
        f"{c['seconds']:.1f} s" + (" (reused from an earlier run)" if c["reused"] else "")]))


def plots(result: dict, out_dir: Path) -> list[str]:
    names = [r["name"] for r in result["rows"]]
    x = list(range(1, len(names) + 1))
    label = "training tokens/s (median)"
    series = [harness.Series(label if key == "median" else key, x, [r["tokens_per_s"][key] for r in result["rows"]],
                             group=label, dashed=key != "median", marker="o" if key == "median" else None)
              for key in ("median", "min", "max")]
    harness.plot_lines(out_dir / "distill_throughput.png", series,
                       f"Distillation throughput ({result['settings']['model']})", "configuration",
                       "training tokens/s", xticks=x, xticklabels=names)
    return ["distill_throughput.png"]


BENCH = harness.Benchmark("distill", Settings, measure, markdown, plots, check=check,
                          presets={"quick": dict(layers=2, steps=5, tokens=2048, seq_len=128, repeats=2)})
main = BENCH.main

if __name__ == "__main__":
    sys.exit(main())
