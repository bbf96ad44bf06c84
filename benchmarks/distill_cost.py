"""Cost of blockwise local distillation (DtR phase 1): wall time per layer and training tokens/s, 1 vs 2 workers.

Layers are independent (teacher forcing), so phase 1 parallelises over layers. On one machine the question
is how to spend its cores: one worker using every core for its matrix products, or one worker per core.
The same layers are distilled (from the same captured teacher activations, into a fresh folder each time,
so nothing is reused) under each configuration:
- `1 worker x 1 thread`: the baseline, layers one after another, `torch.set_num_threads(1)`;
- `1 worker x 2 threads`: layers one after another, 2 torch threads;
- `2 workers x 1 thread`: two Python threads distil two layers at a time (torch releases the GIL inside its
  kernels), 1 torch thread in the process (as the Prefect flow's thread runner does, `tasks/runtime.py`);
- with `--processes`, `2 processes x 1 thread`: a pool of two spawned processes, each with its own copy of
  the teacher (loaded once, during the warm-up, not timed).
Every configuration first runs an untimed warm-up (one layer, a few steps), then the timed repeats run
round-robin (rotating order) so that load drifting over the run hits every configuration alike.
Reported per configuration, median [min-max] over repeats: wall time per layer (batch wall / layers),
training tokens/s (steps x batch x seq_len per layer), the mean time one layer took inside the batch (its
latency: longer when two share the cores) and the speed-up over the baseline measured in the same run.

    python -m benchmarks.distill_cost [--quick] [--json] [--out DIR] [--layers 4] [--steps 30] [--repeats 3]
        [--processes] [--model smollm2-135m] [--mixer gated_deltanet]
    dtr bench distill [same options]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import common

logger = logging.getLogger("benchmarks.distill_cost")

DEFAULT_OUT = common.REPO_ROOT / "docs" / "bench" / "distill"
DEFAULT_WORK = common.REPO_ROOT / "runs" / "bench"
WARMUP_STEPS = 2

# the pipeline's default budget (flows/params.py DistillBudget): 8192 tokens of 256, 30 steps of 4 sequences
FULL = dict(layers=4, steps=30, tokens=8192, seq_len=256, repeats=3)
QUICK = dict(layers=2, steps=5, tokens=2048, seq_len=128, repeats=2)


@dataclass(frozen=True)
class Config:
    name: str
    workers: int
    threads: int
    kind: str  # "serial" | "threads" | "processes"


CONFIGS = (Config("1 worker x 1 thread", 1, 1, "serial"), Config("1 worker x 2 threads", 1, 2, "serial"),
           Config("2 workers x 1 thread", 2, 1, "threads"))
PROCESS_CONFIG = Config("2 processes x 1 thread", 2, 1, "processes")
BASELINE = CONFIGS[0].name


@dataclass(frozen=True)
class Settings:
    model: str
    mixer: str
    layers: int
    steps: int
    tokens: int
    seq_len: int
    batch_size: int
    repeats: int
    processes: bool
    work_dir: str


# --- worker processes ----------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_init(model_name: str, threads: int) -> None:
    from dtr_core.models import load_model

    torch.set_num_threads(threads)
    _WORKER["model"], _ = load_model(model_name)


def _worker_distill(layer: int, activations: str, mixer: str, config: dict, out_dir: str) -> dict:
    from dtr_core.distill import DistillConfig, distill_layer

    return distill_layer(_WORKER["model"], layer, activations, mixer, DistillConfig.from_dict(config),
                         out_dir).to_dict()


# --- measurement ---------------------------------------------------------------------------------


def _distill_config(settings: Settings, steps: int):
    from benchmarks.placements import distill_config

    return distill_config(steps)


class Runner:
    """Distils a list of layers under one configuration into a fresh folder; returns (Sample, layer results)."""

    def __init__(self, model, settings: Settings, activations: Path, config: Config):
        self.model, self.settings, self.activations, self.config = model, settings, activations, config
        self.pool: ProcessPoolExecutor | None = None
        if config.kind == "processes":
            import multiprocessing

            self.pool = ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_worker_init, initargs=(settings.model, config.threads))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()

    def __call__(self, layers: Sequence[int], steps: int) -> tuple[common.Sample, list[dict]]:
        from dtr_core.distill import distill_layer

        config = _distill_config(self.settings, steps)
        out = Path(tempfile.mkdtemp(prefix="distill-cost-", dir=self.settings.work_dir))
        previous = torch.get_num_threads()
        torch.set_num_threads(self.config.threads)
        results: list[dict] = []

        def one(layer: int) -> dict:
            return distill_layer(self.model, layer, self.activations, self.settings.mixer, config, out).to_dict()

        def work() -> None:
            if self.config.kind == "serial":
                results.extend(one(layer) for layer in layers)
            elif self.config.kind == "threads":
                with ThreadPoolExecutor(self.config.workers) as pool:
                    results.extend(pool.map(one, layers))
            else:
                futures = [self.pool.submit(_worker_distill, layer, str(self.activations), self.settings.mixer,
                                            config.to_dict(), str(out)) for layer in layers]
                results.extend(f.result() for f in futures)

        try:
            sample = common.timed(work)
        finally:
            torch.set_num_threads(previous)
            shutil.rmtree(out, ignore_errors=True)
        bad = [r for r in results if r["status"] != "ok" or r["reused"]]
        if bad:
            raise RuntimeError(f"{self.config.name}: layers not freshly distilled: {bad}")
        return sample, results


def measure(settings: Settings, configs: Sequence[Config]) -> dict:
    from dtr_core.baselines import uniform_layers
    from dtr_core.capture import capture_activations
    from dtr_core.conversion import slug
    from dtr_core.corpus import load_corpus, token_chunks
    from dtr_core.models import load_model
    from dtr_core.surgery import num_layers

    model, tokenizer = load_model(settings.model)
    model.eval()
    L = num_layers(model)
    layers = list(uniform_layers(L, min(settings.layers, L)))
    activations = Path(settings.work_dir) / f"{slug(settings.model)}-distill-cost" / "activations"
    token_ids = token_chunks(load_corpus("bbc"), tokenizer, settings.seq_len, settings.tokens)
    started = time.perf_counter()
    manifest = capture_activations(model, token_ids, activations, layers=layers,
                                   metadata={"corpus": "bbc", "token_budget": settings.tokens})
    capture = {"seconds": time.perf_counter() - started, "reused": bool(manifest.get("reused", False)),
               "tokens": manifest["num_tokens"], "layers": len(layers)}
    runners = {c.name: Runner(model, settings, activations, c) for c in configs}
    layer_seconds: dict[str, list[float]] = {c.name: [] for c in configs}
    try:
        logger.info("warm-up: one layer, %d steps, per configuration", WARMUP_STEPS)
        for runner in runners.values():
            runner(layers[:runner.config.workers], WARMUP_STEPS)

        def task(name: str) -> Callable[[], common.Sample]:
            def run() -> common.Sample:
                sample, results = runners[name](layers, settings.steps)
                layer_seconds[name].append(statistics.fmean(r["seconds"] for r in results))
                return sample

            return run

        def on_sample(name: str, index: int, sample: common.Sample) -> None:
            logger.info("  %s repeat %d: %.1f s for %d layers (cpu/wall %.2f)", name, index + 1, sample.wall_s,
                        len(layers), sample.cpu_s / sample.wall_s if sample.wall_s else 0.0)

        timings = common.run_interleaved({c.name: task(c.name) for c in configs}, settings.repeats, warmup=0,
                                         on_sample=on_sample)
    finally:
        for runner in runners.values():
            runner.close()
    tokens_per_layer = settings.steps * settings.batch_size * settings.seq_len
    baseline = timings[BASELINE].scaled(1 / len(layers))
    rows = []
    for c in configs:
        per_layer = timings[c.name].scaled(1 / len(layers))
        tps = [tokens_per_layer / s for s in per_layer.samples]
        rows.append({
            **asdict(c), "wall_per_layer_s": per_layer.to_dict(),
            "tokens_per_s": {"median": statistics.median(tps), "min": min(tps), "max": max(tps)},
            "layer_latency_s": {"median": statistics.median(layer_seconds[c.name]), "min": min(layer_seconds[c.name]),
                                "max": max(layer_seconds[c.name])},
            "speedup": common.ratio_of(baseline, per_layer),
            "cpu_per_wall": timings[c.name].cpu_per_wall,
        })
    return {"num_layers": L, "layers": layers, "tokens_per_layer": tokens_per_layer, "capture": capture,
            "rows": rows}


def run(settings: Settings, argv: Sequence[str]) -> dict:
    started = time.perf_counter()
    machine = common.machine_info()
    configs = list(CONFIGS) + ([PROCESS_CONFIG] if settings.processes else [])
    Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
    measured = measure(settings, configs)
    return {
        "benchmark": "distill",
        "settings": asdict(settings),
        "commands": common.command_lines("benchmarks.distill_cost", "distill", argv),
        "machine": machine,
        **measured,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "wall_time_s": time.perf_counter() - started,
    }


# --- report --------------------------------------------------------------------------------------


def _range(d: dict, fmt: Callable[[float], str]) -> str:
    return f"{fmt(d['median'])} [{fmt(d['min'])}-{fmt(d['max'])}]"


def _ideal(row: dict) -> int:
    return row["workers"] * row["threads"]


def paragraph(result: dict) -> str:
    """What the table says, in plain words, computed from the numbers."""
    rows = result["rows"]
    base = next(r for r in rows if r["name"] == BASELINE)
    best = max(rows, key=lambda r: r["speedup"]["median"])
    cores = result["machine"]["usable_cores"]
    L = result["num_layers"]
    per_layer = best["wall_per_layer_s"]["median"]
    parts = [
        f"On this {cores}-core machine the fastest way to distil was {best['name']}: "
        f"{best['speedup']['median']:.2f}x the throughput of one worker with one thread "
        f"({common.format_seconds(per_layer)} per layer vs "
        f"{common.format_seconds(base['wall_per_layer_s']['median'])})."
    ]
    for r in rows:
        if r["name"] == BASELINE:
            continue
        text = f"{r['name']}: {r['speedup']['median']:.2f}x of an ideal {_ideal(r)}x"
        if r["workers"] > 1:
            slower = r["layer_latency_s"]["median"] / base["layer_latency_s"]["median"]
            text += f", each layer taking {slower:.2f}x as long as alone"
        parts.append(text + ".")
    parts.append(
        f"At this budget ({result['tokens_per_layer']} training tokens per layer) all {L} layers would take about "
        f"{per_layer * L / 60:.1f} min with {best['name']} (measured time per layer x {L}; an estimate, not a "
        "measurement), after a one-off teacher capture.")
    load = result["machine"]["load_average"][0]
    short = [r for r in rows if r["name"] != BASELINE and r["speedup"]["median"] < 0.8 * _ideal(r)]
    if short:
        reached = ", ".join(f"{r['name']} reaches {r['speedup']['median'] / _ideal(r):.0%} of its ideal" for r in short)
        busy = (" (other work shared the machine, so the parallel configurations could not get their cores: see "
                "CPU/wall)") if load >= cores else ""
        parts.append(f"Where it falls short: {reached}. The 1-minute load average was {load} at the start on "
                     f"{cores} cores{busy}.")
    return " ".join(parts)


def markdown_report(result: dict) -> str:
    s = result["settings"]
    env = common.environment_markdown(result["machine"], result["commands"], {
        "load average at end": result["load_average_end"],
        "wall time of the run": f"{result['wall_time_s'] / 60:.1f} min",
    })
    rows = []
    for r in result["rows"]:
        rows.append([r["name"], _range(r["wall_per_layer_s"], lambda v: f"{v:.2f} s"),
                     _range(r["tokens_per_s"], lambda v: f"{v:.0f}"),
                     _range(r["layer_latency_s"], lambda v: f"{v:.2f} s"),
                     f"{r['speedup']['median']:.2f}x [{r['speedup']['low']:.2f}-{r['speedup']['high']:.2f}]",
                     "n/a" if r["cpu_per_wall"] is None else f"{r['cpu_per_wall']:.2f}"])
    c = result["capture"]
    return "\n".join([
        f"# Distillation cost: {s['model']}, {s['mixer']} students", "",
        env, "",
        f"Layers {result['layers']} of {result['num_layers']}, each {s['steps']} AdamW steps of {s['batch_size']} "
        f"sequences x {s['seq_len']} tokens ({result['tokens_per_layer']} training tokens per layer), fresh output "
        f"folder every time; median [min-max] over {s['repeats']} repeats after a warm-up; speed-up = baseline "
        f"({BASELINE}, same run) wall per layer / this one. CPU/wall: process CPU seconds per wall second "
        "(the 2-process row counts the parent only).", "",
        common.markdown_table(["configuration", "wall per layer", "training tokens/s", "one layer's latency",
                               "speed-up vs 1x1", "CPU/wall"], rows),
        "",
        paragraph(result), "",
        f"Teacher capture (once, shared by all layers): {c['tokens']} tokens x {c['layers']} layers in "
        f"{c['seconds']:.1f} s" + (" (reused from an earlier run)" if c["reused"] else "") + ".", "",
        f"_`{result['commands']['dtr']}`; {result['machine']['cpu_model']}, load {result['machine']['load_average']}_",
        "",
    ])


def write_plot(result: dict, out_dir: Path) -> str:
    names = [r["name"] for r in result["rows"]]
    x = list(range(1, len(names) + 1))
    label = "training tokens/s (median)"
    series = [common.Series(label, x, [r["tokens_per_s"]["median"] for r in result["rows"]])]
    series += [common.Series(bound, x, [r["tokens_per_s"][bound] for r in result["rows"]], group=label, dashed=True,
                             marker=None) for bound in ("min", "max")]
    common.plot_lines(out_dir / "distill_throughput.png", series,
                      f"Distillation throughput ({result['settings']['model']})", "configuration",
                      "training tokens/s", xticks=x, xticklabels=names)
    return "distill_throughput.png"


# --- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtr bench distill", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK} (< 2 min on an idle machine)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the report")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for distill.{md,json} and the plot")
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK), help="captured activations and scratch folders")
    parser.add_argument("--model", default="smollm2-135m", help="teacher: a dtr_core.models.load_model source")
    parser.add_argument("--mixer", default="gated_deltanet", help="student type")
    parser.add_argument("--layers", type=int, default=None,
                        help=f"layers distilled per batch (default {FULL['layers']})")
    parser.add_argument("--steps", type=int, default=None, help=f"optimiser steps per layer (default {FULL['steps']})")
    parser.add_argument("--tokens", type=int, default=None, help=f"captured teacher tokens (default {FULL['tokens']})")
    parser.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence (default {FULL['seq_len']})")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed repeats (default {FULL['repeats']})")
    parser.add_argument("--processes", action="store_true", help="also measure 2 spawned processes x 1 thread")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    from benchmarks.placements import DISTILL_BATCH
    from dtr_core.mixers import get_mixer_class

    get_mixer_class(args.mixer)
    base = QUICK if args.quick else FULL
    values = {name: getattr(args, name) if getattr(args, name) is not None else base[name] for name in base}
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if values["tokens"] // values["seq_len"] < 2:
        raise ValueError(f"--tokens ({values['tokens']}) must hold at least 2 sequences of --seq-len "
                         f"{values['seq_len']}")
    return Settings(model=args.model, mixer=args.mixer, batch_size=DISTILL_BATCH, processes=args.processes,
                    work_dir=args.work_dir, **values)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    common.setup_logging()
    settings = settings_from_args(args)
    result = run(settings, argv)
    common.publish(args.out, "distill", result, [write_plot(result, Path(args.out))], markdown_report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
