"""Cost of blockwise local distillation (DtR phase 1) on the streamed teacher.

Three measurements:
- teacher layer-forwards per training token and layer trained, for 1, 2 and L layers per task (the formula
  of `dtr_core.distill.block.teacher_layer_forwards`: a block of layers a..b runs the teacher's layers 0..b);
- student training tokens/s: the same layers distilled into a fresh folder each time by 1 task x 1 thread
  (one block of every layer, the baseline), 1 task x 2 threads, and 2 tasks x 1 thread (two blocks in Python
  threads, as the flow's thread runner); a warm-up each, then the repeats interleaved;
- peak disk (the students folder, polled) and peak RAM at two token budgets: disk holds only the students and
  a block checkpoint, so it does not grow with the budget.
Method and reading: docs/BENCHMARKS_DISTILL.md.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.harness import option
from benchmarks.students import DISTILL, DISTILL_BATCH, WORK_DIR, distill_config

logger = logging.getLogger("benchmarks.distill_cost")

WARMUP_STEPS = 2
BUDGET_FACTOR = 4  # the second budget of the disk/RAM measurement: this many times the first


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = option("smollm2-135m", "teacher: a dtr_core.models.load_model source")
    mixer: str = option("gated_deltanet", "student type")
    layers: int = option(4, "layers distilled together (spread over the model)", minimum=1)
    tokens: int = option(DISTILL["distill_tokens"], "training tokens per layer", minimum=1)
    steps: int | None = option(None, "optimiser steps per layer (default: from --tokens)", int, minimum=1)
    seq_len: int = option(DISTILL["distill_seq_len"], "tokens per sequence", minimum=1)
    repeats: int = option(3, "timed repeats", minimum=1)
    work_dir: str = option(WORK_DIR, "scratch folders (removed after each run)")


def check(s: Settings, preset: str | None) -> Settings:
    from dtr_core.distill.config import check_seq_lens, steps_for_tokens
    from dtr_core.preflight import check_model_source

    harness.check_mixer(s.mixer)
    check_seq_lens([s.seq_len], check_model_source(s.model, check_values=False).max_positions)
    return s if s.steps is not None else dataclasses.replace(s, steps=steps_for_tokens(s.tokens, DISTILL_BATCH,
                                                                                         s.seq_len))


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    workers: int
    threads: int
    kind: str  # "serial" (one block of every layer) | "threads" (two blocks, one thread each)


CONFIGS = (Config("1 worker x 1 thread", 1, 1, "serial"), Config("1 worker x 2 threads", 1, 2, "serial"),
           Config("2 workers x 1 thread", 2, 1, "threads"))
BASELINE = CONFIGS[0].name


def _config(steps: int, seq_len: int):
    """The pipeline's DistillConfig for `steps`; the verdict threshold is off (timing, not quality)."""
    return dataclasses.replace(distill_config(steps, seq_len=seq_len), max_normalized_loss=1e30)


class Runner:
    """Distils a list of layers under one configuration into a fresh folder; returns (Sample, layer results)."""

    def __init__(self, model, corpus, settings: Settings, config: Config):
        self.model, self.corpus, self.settings, self.config = model, corpus, settings, config

    def __call__(self, layers: Sequence[int], steps: int) -> tuple[harness.Sample, list[dict]]:
        from dtr_core.distill.block import distill_block

        s, config = self.settings, _config(steps, self.settings.seq_len)
        out = Path(tempfile.mkdtemp(prefix="distill-cost-", dir=s.work_dir))
        previous = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        results: list[dict] = []
        half = (len(layers) + 1) // 2
        blocks = [list(layers)] if self.config.kind == "serial" else [list(layers[:half]), list(layers[half:])]

        def one(block: list[int]) -> list[dict]:
            return [r.to_dict() for r in distill_block(self.model, block, s.mixer, config, self.corpus, out)]

        def work() -> None:
            with ThreadPoolExecutor(len(blocks)) as pool:
                results.extend(r for block_results in pool.map(one, [b for b in blocks if b]) for r in block_results)

        try:
            sample = harness.timed(work)
        finally:
            torch.set_num_threads(previous)
            shutil.rmtree(out, ignore_errors=True)
        bad = [r for r in results if r["reused"] or r.get("steps") != steps]
        if bad:
            raise RuntimeError(f"{self.config.name}: layers not freshly distilled: {bad}")
        return sample, results


def _disk_and_ram(model, corpus, s: Settings, layers: list[int], steps: int) -> dict:
    """Peak bytes of the students folder (polled every 50 ms, checkpoints included) and peak RAM while
    distilling `layers` for `steps` steps, checkpointing every `steps // 4` steps."""
    from dtr_core.distill.block import distill_block
    from dtr_core.preflight import folder_bytes

    config = dataclasses.replace(_config(steps, s.seq_len), checkpoint_every_steps=max(1, steps // 4))
    out = Path(tempfile.mkdtemp(prefix="distill-cost-", dir=s.work_dir))
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], folder_bytes(out))
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        with harness.peak_memory() as memory:
            distill_block(model, layers, s.mixer, config, corpus, out)
    finally:
        done.set()
        poller.join()
        final = folder_bytes(out)
        shutil.rmtree(out, ignore_errors=True)
    return {"steps": steps, "tokens_per_layer": steps * config.tokens_per_step, "peak_disk_bytes": max(peak[0], final),
            "final_disk_bytes": final, "peak_ram_bytes": memory.peak_bytes}


def _spread(values: Sequence[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(s: Settings) -> dict:
    from dtr_core.distill.block import split_into_blocks, teacher_layer_forwards
    from dtr_core.distill.corpus import Corpus
    from dtr_core.hybrid.surgery import num_layers
    from dtr_core.models import load_model
    from dtr_core.search.baselines import uniform_layers

    Path(s.work_dir).mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(s.model)
    model.eval()
    corpus = Corpus("bbc", tokenizer)
    L = num_layers(model)
    layers = list(uniform_layers(L, min(s.layers, L)))
    forwards = [{"layers_per_task": k, "tasks": len(split_into_blocks(L, k)),
                 "teacher_layer_forwards_per_token": teacher_layer_forwards(split_into_blocks(L, k))}
                for k in sorted({1, 2, L})]
    runners = {c.name: Runner(model, corpus, s, c) for c in CONFIGS}
    layer_seconds: dict[str, list[float]] = {c.name: [] for c in CONFIGS}

    def task(name: str):
        def run() -> harness.Sample:
            sample, results = runners[name](layers, s.steps)
            layer_seconds[name].append(statistics.fmean(r["seconds"] for r in results))
            return sample

        return run

    def warm(runner: Runner):
        return lambda: runner(layers[:runner.config.workers], WARMUP_STEPS)

    logger.info("warm-up: %d steps per configuration", WARMUP_STEPS)
    timings = harness.interleave({name: task(name) for name in runners}, s.repeats,
                                 warmup={name: warm(r) for name, r in runners.items()},
                                 on_sample=harness.log_sample(logger, f"{len(layers)} layers"))
    tokens_per_layer = s.steps * DISTILL_BATCH * s.seq_len
    baseline = timings[BASELINE].scaled(1 / len(layers))
    rows = []
    for c in CONFIGS:
        per_layer = timings[c.name].scaled(1 / len(layers))
        rows.append({**dataclasses.asdict(c), "wall_per_layer_s": per_layer.to_dict(),
                     "tokens_per_s": _spread([tokens_per_layer / x for x in per_layer.samples]),
                     "layer_latency_s": _spread(layer_seconds[c.name]),
                     "speedup": harness.ratio_of(baseline, per_layer), "cpu_per_wall": timings[c.name].cpu_per_wall})
    disk = [_disk_and_ram(model, corpus, s, layers, steps) for steps in (s.steps, BUDGET_FACTOR * s.steps)]
    return {"num_layers": L, "layers": layers, "batch_size": DISTILL_BATCH, "tokens_per_layer": tokens_per_layer,
            "teacher_forwards": forwards, "rows": rows, "disk": disk}


def markdown(result: dict) -> str:
    s, L = result["settings"], result["num_layers"]
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
        "", "Teacher layer-forwards per training token and layer trained, by layers per task:", "",
        harness.markdown_table(["layers per task", "tasks", "teacher layer-forwards per token"],
                               [[f["layers_per_task"], f["tasks"], f"{f['teacher_layer_forwards_per_token']:.2f}"]
                                for f in result["teacher_forwards"]]), "",
        "Disk and memory at two budgets (the same layers, a checkpoint every quarter of the steps):", "",
        harness.markdown_table(["steps", "training tokens per layer", "peak disk", "disk after", "peak RAM"],
                               [[d["steps"], d["tokens_per_layer"], harness.format_bytes(d["peak_disk_bytes"]),
                                 harness.format_bytes(d["final_disk_bytes"]), harness.format_bytes(d["peak_ram_bytes"])]
                                for d in result["disk"]])]))


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
                          presets={"quick": dict(layers=2, tokens=5 * DISTILL_BATCH * 128, seq_len=128,
                                                 repeats=2)})
main = BENCH.main

if __name__ == "__main__":
    sys.exit(main())
