"""Helpers shared by the benchmarks: timing, peak memory, machine info, report writers, plots.

- Timing: `timed(fn)` turns a call into a `Sample` (wall and process-CPU seconds); `run_interleaved(tasks,
  repeats, warmup)` runs several measurements round-robin (rotating the order every round) so that load
  drifting over the run hits every contender alike, and returns a `Timing` (median, min-max, IQR) per task.
  The CPU/wall ratio of every sample is kept: on a machine shared with other work it shows how much of
  the wall time the process actually got (a 2-thread run that gets its cores has CPU/wall ~ 2).
- Peak memory: `PeakRSS` measures the peak resident set size reached during a block, above the resident
  size at its start (Linux `/proc/self/status` VmHWM, reset through `/proc/self/clear_refs`; glibc's free
  lists are trimmed first so that memory freed earlier is not silently reused without being counted).
  torch has no CPU allocator statistics and `tracemalloc` cannot see its buffers, so RSS is the measure.
- Machine and version block (`machine_info`), the exact command (`command_lines`), markdown tables,
  atomic JSON/text writers, and line plots (matplotlib, Agg backend: no display needed).

Benchmarks print tables with the baseline measured in the same run and never edit a number by hand.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

# --- timing ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    wall_s: float
    cpu_s: float  # process CPU time (all threads) over the same interval


def is_cuda(device: torch.device | str) -> bool:
    return str(device).startswith("cuda")


def synchronize(device: torch.device | str = "cpu") -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously); nothing to do on CPU."""
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> Sample:
    """Run `fn` once and return its wall and process-CPU time (on CUDA: until its kernels have finished)."""
    synchronize(device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = fn()
    synchronize(device)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    del result  # freeing what the call returned (e.g. a large cache) is not part of its time
    return Sample(wall, cpu)


@dataclass(frozen=True)
class Timing:
    """Repeated measurements of one quantity (seconds): median with min-max and interquartile spread."""

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

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    @property
    def iqr(self) -> tuple[float, float]:
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    @property
    def cpu_per_wall(self) -> float | None:
        """Process CPU seconds per wall second (~ threads when the process gets its cores)."""
        if not self.cpu_samples:
            return None
        return sum(self.cpu_samples) / sum(self.samples)

    def scaled(self, factor: float) -> Timing:
        """The same measurements in another unit, e.g. per token (`factor = 1 / tokens`)."""
        return Timing(tuple(s * factor for s in self.samples), tuple(c * factor for c in self.cpu_samples))

    def to_dict(self) -> dict:
        q1, q3 = self.iqr
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "q1": q1,
            "q3": q3,
            "repeats": len(self.samples),
            "samples": list(self.samples),
            "cpu_per_wall": self.cpu_per_wall,
        }


def ratio_of(numerator: Timing, denominator: Timing) -> dict:
    """median(numerator) / median(denominator), with the widest range the min-max spreads allow."""
    return {
        "median": numerator.median / denominator.median,
        "low": numerator.min / denominator.max,
        "high": numerator.max / denominator.min,
    }


def run_interleaved(
    tasks: Mapping[str, Callable[[], Sample]],
    repeats: int,
    warmup: int = 1,
    rotate: bool = True,
    on_sample: Callable[[str, int, Sample], None] | None = None,
) -> dict[str, Timing]:
    """Measure every task `repeats` times, round-robin, after `warmup` untimed rounds.

    Each task returns its own `Sample` (use `timed`), so untimed setup can live inside it. With `rotate`,
    round r starts at task r (mod n): no contender is always first after a pause.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(tasks)
    for _ in range(warmup):
        for name in names:
            tasks[name]()
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names) if rotate and names else 0
        for name in names[shift:] + names[:shift]:
            sample = tasks[name]()
            samples[name].append(sample)
            if on_sample is not None:
                on_sample(name, round_index, sample)
    return {name: Timing.from_samples(values) for name, values in samples.items()}


# --- peak resident memory --------------------------------------------------------------------------

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (None where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _malloc_trim() -> None:
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_rss_supported() -> bool:
    return _status_kib("VmHWM") is not None and os.access(_CLEAR_REFS, os.W_OK)


class PeakRSS:
    """Context manager: `peak_bytes` = peak RSS during the block minus RSS at its start (None if unsupported).

    Method: collect garbage and `malloc_trim(0)` (glibc hands freed heap pages back, so reusing them
    faults them in again and counts), reset the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`),
    read VmRSS, run the block, read VmHWM. Covers every allocation of the process, torch's included;
    resolution is a page, and memory allocated but never touched does not count (as it costs nothing).
    """

    def __init__(self) -> None:
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None
        self.end_bytes: int | None = None

    def __enter__(self) -> PeakRSS:
        gc.collect()
        _malloc_trim()
        if peak_rss_supported():
            _CLEAR_REFS.write_text("5")
            self.start_bytes = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.start_bytes is None:
            return
        hwm = _status_kib("VmHWM")
        self.end_bytes = rss_bytes()
        self.peak_bytes = None if hwm is None else max(0, hwm * 1024 - self.start_bytes)


class PeakCudaMemory:
    """Context manager: `peak_bytes` = peak CUDA memory allocated by torch during the block minus the start."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.start_bytes: int | None = None
        self.peak_bytes: int | None = None

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


def peak_memory(device: torch.device | str = "cpu") -> PeakRSS | PeakCudaMemory:
    """Peak memory of a block on `device`: resident memory on CPU, torch's CUDA allocations on a GPU."""
    return PeakCudaMemory(device) if is_cuda(device) else PeakRSS()


def device_name(device: torch.device | str) -> str:
    """The GPU's name for a CUDA device, else "cpu"."""
    if not is_cuda(device):
        return "cpu"
    import torch

    return torch.cuda.get_device_name(device)


# --- machine, versions, command --------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


DATE_FORMAT = "%Y-%m-%d %H:%M:%S"  # `machine_info()["date_utc"]`, shown as "- date (UTC): ..." in reports


def machine_info(packages: Sequence[str] = ("torch", "transformers", "numpy")) -> dict:
    """Where and with what a benchmark ran: CPU, cores, threads, memory, load, versions, git commit."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem_total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime(DATE_FORMAT),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": mem_total,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in packages},
        "git_commit": None if commit is None else commit + ("-dirty" if dirty else ""),
    }


def command_lines(module: str, cli_name: str, argv: Sequence[str]) -> dict[str, str]:
    """The exact command that reproduces a run, as a module call and as the `dtr bench` call."""
    args = shlex.join(list(argv))
    return {
        "python": f"python -m {module} {args}".rstrip(),
        "dtr": f"dtr bench {cli_name} {args}".rstrip(),
    }


def environment_markdown(info: Mapping[str, Any], commands: Mapping[str, str], extra: Mapping[str, str] = ()) -> str:
    """The machine/version/command block printed beside every table."""
    versions = ", ".join(f"{name} {ver}" for name, ver in info["versions"].items() if ver)
    memory = info.get("memory_total_bytes")
    lines = [
        f"- command: `{commands['dtr']}` (same as `{commands['python']}`)",
        f"- machine: {info['cpu_model']}, {info['usable_cores']} usable of {info['logical_cores']} logical cores, "
        f"torch threads: {info['torch_threads']}" + (f", {format_bytes(memory)} RAM" if memory else ""),
        f"- load average (1, 5, 15 min) at start: {info['load_average']}",
        f"- versions: Python {info['python']}, {versions}; dtr commit {info['git_commit']}",
        f"- date (UTC): {info['date_utc']}; platform {info['platform']}",
    ]
    lines += [f"- {key}: {value}" for key, value in dict(extra).items()]
    return "\n".join(lines)


# --- formatting and writers ------------------------------------------------------------------------


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
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 1e-3:
        return f"{value * 1e3:.1f} ms"
    return f"{value * 1e6:.0f} us"


def format_ratio(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}x"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` has one character per column: l, r or c (default: l then r)."""
    headers = [str(h) for h in headers]
    align = align or ("l" + "r" * (len(headers) - 1))
    if len(align) != len(headers):
        raise ValueError(f"align has {len(align)} entries for {len(headers)} columns")
    rule = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule[a] for a in align) + "|"]
    for row in rows:
        cells = [str(c) for c in row]
        if len(cells) != len(headers):
            raise ValueError(f"row {cells} has {len(cells)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n"


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write atomically (temp file in the same folder + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, to_json(obj))


def setup_logging() -> None:
    """Time-stamped INFO lines on stderr (progress of a benchmark), unless logging is configured already."""
    import logging

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")


def publish(out_dir: str | os.PathLike, name: str, result: dict, plots: list[str],
            render: Callable[[dict], str], as_json: bool) -> str:
    """Write a benchmark's `<name>.md` (rendered from `result`) and `<name>.json` into `out_dir`, print one of
    them (JSON with `as_json`), and return the report. `plots` are the image files already written there."""
    out_dir = Path(out_dir)
    result["files"] = [f"{name}.md", f"{name}.json"] + list(plots)
    report = render(result)
    write_text(out_dir / f"{name}.md", report)
    write_json(out_dir / f"{name}.json", result)
    print(to_json(result) if as_json else report)
    return report


# --- plots -----------------------------------------------------------------------------------------


@dataclass
class Series:
    """One line of a plot. Lines sharing `group` share a colour (e.g. measured solid, ideal dashed)."""

    label: str
    x: Sequence[float]
    y: Sequence[float | None]
    group: str | None = None
    dashed: bool = False
    marker: str | None = "o"
    style: dict = field(default_factory=dict)


def plot_lines(
    path: str | os.PathLike,
    series: Sequence[Series],
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    logy: bool = False,
    hline: float | None = None,
    xticks: Sequence[float] | None = None,
    xticklabels: Sequence[str] | None = None,
) -> Path:
    """Save a line plot as PNG (atomically); `None` y values are left out of their line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours: dict[str, Any] = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for line in series:
        key = line.group or line.label
        colour = colours.setdefault(key, palette[len(colours) % len(palette)])
        points = [(x, y) for x, y in zip(line.x, line.y, strict=True) if y is not None]
        if not points:
            continue
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
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path


def replace_between_markers(path: str | os.PathLike, name: str, text: str) -> Path:
    """Replace the block between `<!-- BEGIN name -->` and `<!-- END name -->` in a markdown file.

    Lets a hand-written document embed generated tables that a rerun refreshes; the file must already
    contain both markers (so a typo never appends a second copy).
    """
    path = Path(path)
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    content = path.read_text()
    start, stop = content.find(begin), content.find(end)
    if start < 0 or stop < start:
        raise ValueError(f"{path} has no '{begin}' ... '{end}' block to replace")
    return write_text(path, content[: start + len(begin)] + "\n" + text.strip() + "\n" + content[stop:])
