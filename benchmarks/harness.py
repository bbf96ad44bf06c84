"""The one harness of dtr's benchmarks: registry, settings-built command line, timing, memory, publishing, plots.

A benchmark module holds only what it measures: a frozen `Settings` dataclass whose fields carry their help
(`option`), `measure(settings) -> dict`, `markdown(result) -> str` and optionally `plots(result, out_dir)`,
bundled as a `Benchmark`; `main` parses (bad input: one `error: ...` line, exit 2, before any work), measures,
and publishes (docs/bench/<name>/ for a full run, runs/bench-quick/<name>/ for `--quick`, `--out` anywhere).
Conventions, result JSON and the timing and memory methods: docs/BENCHMARKS_HARNESS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import datetime as _dt
import gc
import json
import logging
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dtr_core.artifacts import atomic_path, atomic_write_text

logger = logging.getLogger("benchmarks")

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_BENCH = REPO_ROOT / "docs" / "bench"  # where full runs publish
QUICK_ROOT = REPO_ROOT / "runs" / "bench-quick"  # where preset (--quick) runs write


# --- registry: shared by `dtr bench`, `benchmarks.all` and the flow `benchmarks` --------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # the `dtr bench` name and the output folder
    module: str
    title: str  # section heading in docs/BENCHMARKS.md
    help: str


REGISTRY: tuple[Entry, ...] = (  # in the order `dtr bench all` runs them
    Entry("mixers", "benchmarks.mixers", "Linear-attention ops vs softmax attention (CPU)",
          "CPU time of the linear-attention ops (naive, chunked, step) vs causal SDPA."),
    Entry("search", "benchmarks.search_cost", "Cost of the greedy search: fast vs paper-style evaluator",
          "Greedy search cost: fast evaluator vs the plain one, same answer."),
    Entry("distill", "benchmarks.distill_cost", "Cost of distillation: 1 vs 2 workers",
          "Blockwise distillation cost per layer, 1 vs 2 workers."),
    Entry("students", "benchmarks.student_loss", "Student quality: variants and token budgets",
          "Held-out loss of students by variant and training budget."),
    Entry("placements", "benchmarks.placements", "Quality: greedy DtR vs placement baselines",
          "Layer placements: greedy DtR vs baselines."),
    Entry("inference", "benchmarks.inference", "Inference speed and memory: hybrids vs the teacher",
          "Hybrid vs teacher: prefill/decode speed and cache size."),
    Entry("recall", "benchmarks.recall", "Long-context recall: teacher vs M_opt",
          "Long-context recall probe: teacher vs hybrid."),
    Entry("healing", "benchmarks.healing", "Healing: hybrids before and after end-to-end distillation",
          "Healed vs unhealed hybrids: test score, perplexity, passkey, cost."),
    Entry("reliability", "benchmarks.reliability", "Reliability: bad input and faults, run for real",
          "Every bad input and fault as a real dtr process: exit code, lines, time, what was written."),
)
BY_NAME = {entry.name: entry for entry in REGISTRY}


# --- settings and command line -------------------------------------------------------------------


def option(default: Any, help: str, parse: Callable[[str], Any] | None = None, minimum: float | None = None,
           choices: Sequence[str] | None = None) -> Any:
    """A `Settings` field: its full-run default, help, parser of the flag's text and lower bound."""
    return dataclasses.field(default=default, metadata={"help": help, "parse": parse, "min": minimum,
                                                        "choices": choices})


def int_list(text: str) -> tuple[int, ...]:
    """`1,2,8K` -> (1, 2, 8192); `3-5` -> (3, 4, 5)."""
    values: list[int] = []
    try:
        for part in (p.strip().upper() for p in text.split(",") if p.strip()):
            if "-" in part[1:]:
                low, high = part.split("-", 1)
                values += range(int(low), int(high) + 1)
            else:
                values.append(int(part[:-1]) * 1024 if part.endswith("K") else int(part))
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected integers like 1,2,8K or 1-12, got {text!r}") from error
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return tuple(values)


def name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    settings: type
    measure: Callable[[Any], dict]
    markdown: Callable[[dict], str]
    plots: Callable[[dict, Path], list[str]] | None = None
    presets: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)  # "quick", hidden others
    check: Callable[[Any, str | None], Any] | None = None  # (settings, preset) -> Settings; raises ValueError
    ok: Callable[[dict], bool] | None = None  # exit status 1 when this says no (a completed run)
    description: str = ""  # --help's text (default: the registry's one-line help)
    publishes: bool = True  # False: without --out, print the report and write nothing

    @property
    def entry(self) -> Entry:
        return BY_NAME[self.name]

    def main(self, argv: Sequence[str] | None = None) -> int:
        return main(self, argv)


def check_device(device: str) -> None:
    """ValueError unless `device` is usable: cuda needs a GPU torch can see."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU, and torch sees none; run on CPU with --device cpu")


def check_students(path: str | None) -> None:
    if path is not None and not Path(path).is_dir():
        raise ValueError(f"--students {path} is not a folder; pass the students folder of a run (runs/<id>/students)")


def check_mixer(name: str) -> None:
    from dtr_core.mixers import MIXERS

    if name not in MIXERS:
        raise ValueError(f"unknown mixer '{name}'; choose one of: {', '.join(sorted(MIXERS))}")


def build_parser(bench: Benchmark) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"dtr bench {bench.name}",
                                     description=bench.description or bench.entry.help)
    for preset, values in bench.presets.items():
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        parser.add_argument(f"--{preset}", action="store_true",
                            help=f"short run, never published into docs/: {shown}" if preset == "quick"
                            else argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the report")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: " + (
        f"docs/bench/{bench.name} for a full run, runs/bench-quick/{bench.name} for a preset run)" if bench.publishes
        else "none: print the report, write nothing)"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--from-json", type=Path, default=None, metavar="RESULT_JSON",
                        help="measure nothing: re-render the report and plots of a saved result")
    for f in dataclasses.fields(bench.settings):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=meta["help"])
            continue
        parse = meta["parse"] or (type(f.default) if f.default is not None else str)
        shown_default = "" if f.default is None else f" (default: {_shown_value(f.default)})"
        parser.add_argument(flag, type=parse, default=None, choices=meta["choices"], help=meta["help"] + shown_default)
    return parser


def _shown_value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def settings_from_args(bench: Benchmark, args: argparse.Namespace) -> tuple[Any, str | None]:
    """(Settings, preset name or None); ValueError names the bad flag and its bound."""
    import torch

    presets = [name for name in bench.presets if getattr(args, name)]
    if len(presets) > 1:
        raise ValueError(f"give at most one of {', '.join('--' + p for p in presets)}")
    preset = presets[0] if presets else None
    chosen = bench.presets.get(preset, {})
    values = {}
    for f in dataclasses.fields(bench.settings):
        given = getattr(args, f.name)
        value = given if given is not None else chosen.get(f.name, f.default)
        low = f.metadata["min"]
        smallest = min(value) if isinstance(value, tuple) and value else value
        if low is not None and smallest is not None and smallest < low:
            raise ValueError(f"--{f.name.replace('_', '-')} must be >= {low:g}, got {smallest}")
        values[f.name] = value
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = bench.settings(**values)
    return (bench.check(settings, preset) if bench.check else settings), preset


def output_dir(bench: Benchmark, out: str | os.PathLike | None, preset: str | None) -> Path | None:
    """`--out` if given; else docs/bench/<name> for a full run, runs/bench-quick/<name> for a preset run, and
    nothing (print only) for a benchmark that does not publish by default."""
    if out is not None:
        return Path(out)
    return (QUICK_ROOT if preset else DOCS_BENCH) / bench.name if bench.publishes else None


def main(bench: Benchmark, argv: Sequence[str] | None = None) -> int:
    """Parse, check, measure, publish; the exit status (1 when `bench.ok` says a target failed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(bench)
    args = parser.parse_args(argv)
    setup_logging()
    if args.from_json is not None:
        if not args.from_json.is_file():
            parser.error(f"--from-json {args.from_json} is not a file; pass a saved {bench.name}.json")
        result = json.loads(args.from_json.read_text())
        out = args.out or args.from_json.parent
    else:
        try:
            settings, preset = settings_from_args(bench, args)
        except ValueError as error:
            parser.error(str(error))
        out = output_dir(bench, args.out, preset)
        started = time.perf_counter()
        device = getattr(settings, "device", "cpu")
        result = {"benchmark": bench.name, "settings": dataclasses.asdict(settings), "preset": preset,
                  "commands": command_lines(bench.entry.module, bench.name, argv),
                  "machine": {**machine_info(), "device": device_name(device)}}
        result.update(bench.measure(settings))
        result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        result["wall_time_s"] = time.perf_counter() - started
    publish(bench, out, result, args.json)
    if out is not None:
        quick = args.out is None and args.from_json is None and result["preset"] is not None
        logger.info("%s: wrote %s%s", bench.name, shown(out), " (a quick run: docs/ untouched)" if quick else "")
    return 0 if bench.ok is None or bench.ok(result) else 1


def publish(bench: Benchmark, out_dir: Path | None, result: dict, as_json: bool) -> str:
    """Write `<name>.md`, `<name>.json` and the plots into `out_dir` (if any); print the report (or the JSON)."""
    if out_dir is None:
        report = bench.markdown(result)
        print(to_json(result) if as_json else report)
        return report
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = bench.plots(result, out_dir) if bench.plots else []
    result["files"] = [f"{bench.name}.md", f"{bench.name}.json", *plots]
    report = bench.markdown(result)
    write_text(out_dir / f"{bench.name}.md", report)
    write_json(out_dir / f"{bench.name}.json", result)
    print(to_json(result) if as_json else report)
    return report


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")


def shown(path: str | os.PathLike) -> str:
    """A path relative to the repository when inside it (reports carry no per-user absolute paths)."""
    try:
        return Path(path).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return str(path)


# --- timing --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    wall_s: float
    cpu_s: float  # process CPU time (all threads) over the same interval


def is_cuda(device: Any) -> bool:
    return str(device).startswith("cuda")


def synchronize(device: Any = "cpu") -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); nothing to do on CPU."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


_wall_clock = time.perf_counter  # the clock of `timed` (tests replace it)


def timed(fn: Callable[[], object], device: Any = "cpu") -> Sample:
    """Run `fn` once: its wall and process-CPU time (on CUDA: until its kernels have finished)."""
    synchronize(device)
    cpu0, wall0 = time.process_time(), _wall_clock()
    result = fn()
    synchronize(device)
    wall, cpu = _wall_clock() - wall0, time.process_time() - cpu0
    del result  # freeing what the call returned (e.g. a large cache) is not part of its time
    return Sample(wall, cpu)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Repeated measurements of one quantity (seconds): median, min-max and interquartile spread."""

    samples: tuple[float, ...]
    cpu_samples: tuple[float, ...] = ()

    @classmethod
    def from_samples(cls, samples: Iterable[Sample | float]) -> Timing:
        samples = list(samples)
        if not samples:
            raise ValueError("a Timing needs at least one sample")
        walls = tuple(s.wall_s if isinstance(s, Sample) else float(s) for s in samples)
        cpus = tuple(s.cpu_s for s in samples if isinstance(s, Sample))
        return cls(walls, cpus if len(cpus) == len(walls) else ())

    median = property(lambda self: statistics.median(self.samples))
    min = property(lambda self: min(self.samples))
    max = property(lambda self: max(self.samples))

    @property
    def iqr(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    @property
    def cpu_per_wall(self) -> float | None:
        """Process CPU seconds per wall second (~ threads when the process gets its cores)."""
        return sum(self.cpu_samples) / sum(self.samples) if self.cpu_samples else None

    def scaled(self, factor: float) -> Timing:
        """The same measurements in another unit, e.g. per token (`factor = 1 / tokens`)."""
        return Timing(tuple(s * factor for s in self.samples), tuple(c * factor for c in self.cpu_samples))

    def to_dict(self) -> dict:
        q1, q3 = self.iqr
        return {"median": self.median, "min": self.min, "max": self.max, "q1": q1, "q3": q3,
                "repeats": len(self.samples), "samples": list(self.samples), "cpu_per_wall": self.cpu_per_wall}


def ratio_of(numerator: Timing, denominator: Timing) -> dict:
    """median(numerator) / median(denominator), with the widest range the min-max spreads allow."""
    return {"median": numerator.median / denominator.median, "low": numerator.min / denominator.max,
            "high": numerator.max / denominator.min}


def interleave(tasks: Mapping[str, Callable[[], Sample]], repeats: int,
               warmup: int | Mapping[str, Callable[[], object]] = 1, rotate: bool = True,
               budget_s: float | None = None, min_repeats: int = 3,
               on_sample: Callable[[str, int, Sample], None] | None = None) -> dict[str, Timing]:
    """Measure every task `repeats` times, round by round, after the warm-up; a `Timing` per task.

    Each task returns its own `Sample` (use `timed`), so untimed setup can live inside it. `warmup`: that many
    untimed rounds of the tasks, or one call per task of the given warm-up callables (a task without one warms
    up on itself). With `rotate`, round r starts at task r (mod n): no contender is always first after a pause.
    With `budget_s`, rounds stop (after `min_repeats`) once the tasks have taken `budget_s` each on average.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(tasks)
    if isinstance(warmup, int):
        for _ in range(warmup):
            for name in names:
                tasks[name]()
    else:
        for name in names:
            (warmup.get(name) or tasks[name])()
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for index in range(repeats):
        shift = index % len(names) if rotate and names else 0
        for name in names[shift:] + names[:shift]:
            samples[name].append(sample := tasks[name]())
            if on_sample is not None:
                on_sample(name, index, sample)
        spent = sum(s.wall_s for values in samples.values() for s in values)
        if budget_s is not None and index + 1 >= min_repeats and spent > budget_s * len(names):
            break
    return {name: Timing.from_samples(values) for name, values in samples.items()}


def log_sample(log: logging.Logger, label: str) -> Callable[[str, int, Sample], None]:
    """An `on_sample` that logs each repeat with its CPU/wall ratio."""
    def on_sample(name: str, index: int, sample: Sample) -> None:
        log.info("  %s %s repeat %d: %.3f s (cpu/wall %.2f)", label, name, index + 1, sample.wall_s,
                 sample.cpu_s / sample.wall_s if sample.wall_s else 0.0)

    return on_sample


# --- peak memory ---------------------------------------------------------------------------------

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    value = _first(str(_STATUS), key + ":")
    return None if value is None else int(value.split()[0])


def peak_rss_supported() -> bool:
    return _status_kib("VmHWM") is not None and os.access(_CLEAR_REFS, os.W_OK)


class PeakRSS:
    """`peak_bytes` = peak resident memory during the block minus that at its start (None if unsupported).

    gc + `malloc_trim(0)` first (so reusing freed heap pages faults them in again and counts), then the
    kernel's high-water mark is reset (`5 > /proc/self/clear_refs`); page resolution, all of the process.
    """

    start_bytes: int | None = None
    peak_bytes: int | None = None

    def __enter__(self) -> PeakRSS:
        gc.collect()
        libc = ctypes.util.find_library("c")
        try:
            if libc:
                ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
        if peak_rss_supported():
            _CLEAR_REFS.write_text("5")
            self.start_bytes = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        hwm = _status_kib("VmHWM")
        if self.start_bytes is not None and hwm is not None:
            self.peak_bytes = max(0, hwm * 1024 - self.start_bytes)


class PeakCudaMemory:
    """`peak_bytes` = peak CUDA memory torch allocated during the block minus that at its start."""

    def __init__(self, device: Any) -> None:
        self.device, self.peak_bytes = device, None

    def __enter__(self) -> PeakCudaMemory:
        import torch

        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start_bytes = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.start_bytes


def peak_memory(device: Any = "cpu") -> PeakRSS | PeakCudaMemory:
    return PeakCudaMemory(device) if is_cuda(device) else PeakRSS()


def device_name(device: Any) -> str:
    """The GPU's name for a CUDA device, else "cpu"."""
    if not is_cuda(device):
        return "cpu"
    import torch

    return torch.cuda.get_device_name(device)


# --- machine, versions, command ------------------------------------------------------------------

DATE_FORMAT = "%Y-%m-%d %H:%M:%S"  # `machine_info()["date_utc"]`, shown as "- date (UTC): ..." in reports


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _first(path: str, prefix: str) -> str | None:
    try:
        return next((line.split(":", 1)[1].strip() for line in Path(path).read_text().splitlines()
                     if line.startswith(prefix)), None)
    except OSError:
        return None


def machine_info(packages: Sequence[str] = ("torch", "transformers", "numpy")) -> dict:
    """Where and with what a benchmark ran: CPU, cores, threads, memory, load, versions, git commit."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def version_of(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    memory = _first("/proc/meminfo", "MemTotal:")
    commit, dirty = _git("rev-parse", "--short", "HEAD"), _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime(DATE_FORMAT),
        "cpu_model": _first("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": None if memory is None else int(memory.split()[0]) * 1024,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: version_of(name) for name in packages},
        "git_commit": None if commit is None else commit + ("-dirty" if dirty else ""),
    }


def command_lines(module: str, cli_name: str, argv: Sequence[str]) -> dict[str, str]:
    """The exact command that reproduces a run, as a module call and as the `dtr bench` call."""
    args = shlex.join(list(argv))
    return {"python": f"python -m {module} {args}".rstrip(), "dtr": f"dtr bench {cli_name} {args}".rstrip()}


def environment(result: Mapping[str, Any], extra: Mapping[str, Any] = ()) -> str:
    """The command/machine/versions/load block at the top of every report."""
    info, commands = result["machine"], result["commands"]
    versions = ", ".join(f"{name} {ver}" for name, ver in info["versions"].items() if ver)
    memory = info.get("memory_total_bytes")
    lines = [
        f"- command: `{commands['dtr']}` (same as `{commands['python']}`)",
        f"- machine: {info['cpu_model']}, {info['usable_cores']} usable of {info['logical_cores']} logical cores, "
        f"torch threads: {info['torch_threads']}" + (f", {format_bytes(memory)} RAM" if memory else "")
        + (f"; device {info['device']}" if info.get("device", "cpu") != "cpu" else ""),
        f"- load average (1, 5, 15 min) at start: {info['load_average']}",
        f"- versions: Python {info['python']}, {versions}; dtr commit {info['git_commit']}",
        f"- date (UTC): {info['date_utc']}; platform {info['platform']}",
    ]
    if "wall_time_s" in result:
        lines += [f"- load average at end: {result['load_average_end']}",
                  f"- wall time of the run: {result['wall_time_s'] / 60:.1f} min"]
    return "\n".join(lines + [f"- {key}: {value}" for key, value in dict(extra).items()])


def report(title: str, result: Mapping[str, Any], *blocks: str, extra: Mapping[str, Any] = ()) -> str:
    """A report: the title, the environment block, then each block followed by the footer line."""
    lines = [f"# {title}", "", environment(result, extra), ""]
    for block in blocks:
        lines += [block, "", footer(result), ""]
    return "\n".join(lines)


def footer(result: Mapping[str, Any]) -> str:
    """One line beside each table: the command, the machine and the load."""
    m = result["machine"]
    where = m["cpu_model"] if m.get("device", "cpu") == "cpu" else f"{m['device']}; host {m['cpu_model']}"
    return f"_`{result['commands']['dtr']}`; {where}, torch threads: {m['torch_threads']}, load {m['load_average']}_"


# --- formatting and writers ----------------------------------------------------------------------


def format_bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"


def format_seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} s" if value >= 1 else f"{value * 1e3:.1f} ms" if value >= 1e-3 else f"{value * 1e6:.0f} us"


def format_ratio(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}x"


def spread(d: Mapping[str, float], fmt: str = ".2f", unit: str = "", low: str = "min", high: str = "max") -> str:
    """`median [low-high]` of a summary dict, e.g. `1.20x [1.10-1.30]`."""
    return f"{d['median']:{fmt}}{unit} [{d[low]:{fmt}}-{d[high]:{fmt}}]"


def cpu_per_wall(timing: Mapping[str, Any]) -> str:
    return format_ratio(timing["cpu_per_wall"]).rstrip("x")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` has one character per column: l, r or c (default: l then r)."""
    align = align or ("l" + "r" * (len(headers) - 1))
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} entries for {len(headers)} columns")
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join(rule[a] for a in align) + "|"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {list(row)} has {len(row)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n"


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write atomically (`dtr_core.artifacts`: a crash never leaves a half file)."""
    atomic_write_text(path, text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, to_json(obj))


class ResultStore:
    """Finished results as JSON files under `dir`, so a killed or extended run resumes where it stopped.

    `get(name, compute, kind)` loads `name` if a run already wrote it (counted in `reused[kind]`), else computes,
    writes (atomically) and returns it. The caller puts everything that decides the numbers into `dir`'s key.
    """

    def __init__(self, dir: str | os.PathLike, kinds: Iterable[str] = ()):
        self.dir, self.reused = Path(dir), dict.fromkeys(kinds, 0)

    def load(self, name: str) -> Any:
        path = self.dir / name
        return json.loads(path.read_text()) if path.is_file() else None

    def save(self, name: str, value: Any) -> None:
        write_json(self.dir / name, value)

    def get(self, name: str, compute: Callable[[], Any], kind: str) -> Any:
        value = self.load(name)
        if value is None:
            self.save(name, value := compute())
        else:
            self.reused[kind] = self.reused.get(kind, 0) + 1
        return value


# --- plots ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Series:
    """One line of a plot. Lines sharing `group` share a colour (e.g. measured solid, ideal dashed)."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    group: str | None = None
    dashed: bool = False
    marker: str | None = "o"
    style: dict = dataclasses.field(default_factory=dict)


def plot_lines(path: str | os.PathLike, series: Sequence[Series], title: str, xlabel: str, ylabel: str,
               logx: bool = False, logy: bool = False, hline: float | None = None,
               xticks: Sequence[float] | None = None, xticklabels: Sequence[str] | None = None) -> Path:
    """Save a line plot as PNG (atomically; matplotlib's Agg backend); `None` y values are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours: dict[str, Any] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for line in series:
        colour = colours.setdefault(line.group or line.label, palette[len(colours) % len(palette)])
        points = [(x, y) for x, y in zip(line.x, line.y, strict=True) if y is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, color=colour, linestyle="--" if line.dashed else "-", marker=line.marker,
                    label=line.label, **line.style)
    if hline is not None:
        ax.axhline(hline, color="grey", linewidth=0.8)
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    if xticks is not None:
        ax.set_xticks(list(xticks))
        ax.set_xticklabels(list(xticklabels) if xticklabels is not None else [str(x) for x in xticks])
        ax.minorticks_off()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        return Path(path)
    finally:
        plt.close(fig)
