"""Reliability probe: every bad input and fault dtr should survive, run for real, in one table.

Each case is a real `dtr` process in its own fresh temporary folder `$T`, listed before and after (what appeared,
changed or went is what it wrote), and judged against the goal of its kind (`GOALS`), written in the case, never
tuned to pass. The environment, the goals, the fixtures and the fault runs: docs/RELIABILITY.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import name_list, option

BAD_INPUT_SECONDS = 5.0  # a bad input is answered within this
FAULT_EXIT_SECONDS = 60.0  # after a server or disk fault, dtr exits within this
DID_CHARS, COMMAND_CHARS, WRITTEN_SHOWN = 150, 110, 4
MINI_MODEL = "tiny-llama"
# The real runs of the fault cases: the smoke profile with a longer distillation and a larger validation
# split, so that a kill lands inside the stage it aims at (distillation ~10 s, each greedy round ~10 s).
FAULT_RUN = ("convert", "--profile", "smoke", "--max-layers", "2", "--steps", "150", "--val-limit", "96",
             "--run-id", "probe")
CONVERT = ("convert", "--profile", "smoke")
VERBALISERS = ("--verbaliser", "pos= positive", "--verbaliser", "neg= negative")

CATEGORIES = {  # in the order of the report
    "arguments": "Command-line arguments",
    "models": "Model sources",
    "data": "Task data",
    "output": "Where things go",
    "servers": "Servers",
    "faults": "Faults during a real run (slow)",
}
GOALS = {
    "bad input": f"exit 2, one `error:` line on stderr, under {BAD_INPUT_SECONDS:g} s, nothing written",
    "completes": "exit 0; writes only its run folder, the MLflow store, its artifacts and dtr's cache",
    "resume": "killed with SIGKILL, then the same command: exit 0 and the layers of an uninterrupted run",
    "refused": "the second process: exit 2, one `error:` line (its last), no traceback; the first: exit 0",
    "runtime fault": f"exit 1, one `error:` line (the last on stderr), no traceback, within "
                     f"{FAULT_EXIT_SECONDS:g} s of the fault",
    "interrupt": "exit 130 with the one line `interrupted; run the same command again to resume`",
}


# --- one case ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
    """What a case's setup and checks see: its folder `T`, the probe's fixtures, and format values for argv."""

    root: Path  # the probe's temporary folder
    folder: Path  # this case's folder ($T)
    fixtures: Callable[[str], Path]  # a built fixture by name (built once, on first use)
    values: dict = dataclasses.field(default_factory=dict)  # `{name}` fields of argv (T and what setup adds)
    cleanups: list = dataclasses.field(default_factory=list)  # called after the case, last first


@dataclasses.dataclass
class Outcome:
    """One `dtr` process: its exit code (None: killed at the hard timeout), output and time to exit."""

    argv: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    category: str  # a key of CATEGORIES
    argv: tuple[str, ...] = ()  # dtr's arguments; `{T}` and setup's values are filled in
    goal: str = "bad input"  # a key of GOALS
    env: dict | None = None  # environment variables over the probe's (`{T}` and setup's values filled in)
    setup: Callable[[Context], None] | None = None  # prepares $T (before the first listing)
    check: Callable[[Context, Outcome], list[str]] | None = None  # extra conditions; problems found
    driver: Callable[[Case, Context, Probe], dict] | None = None  # a fault case runs itself (its record)
    quick: bool = False  # in the --quick subset
    slow: bool = False  # a fault case: a real conversion (about a minute)


# --- running dtr ---------------------------------------------------------------------------------


def dtr_env(folder: Path) -> dict[str, str]:
    """The environment of every case: the caller's, without dtr/MLflow/Prefect settings, plus the probe's."""
    dropped = ("DTR_", "MLFLOW_", "PREFECT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    return {**env, "HOME": str(folder / "home"), "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
            "DTR_TORCH_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CI": "true",
            "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


class Process:
    """A `dtr` process in its own process group, stdout/stderr in files outside the case folder."""

    def __init__(self, argv: list[str], folder: Path, capture: Path, env: dict[str, str]):
        self.argv, self.capture = argv, capture
        capture.parent.mkdir(parents=True, exist_ok=True)
        self._out, self._err = open(f"{capture}.out", "w"), open(f"{capture}.err", "w")
        self.started = time.perf_counter()
        self.popen = subprocess.Popen([sys.executable, "-m", "dtr.cli", *argv], cwd=folder, env=env,
                                      stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
                                      start_new_session=True)
        self.ended: float | None = None

    def wait(self, timeout: float) -> Outcome:
        """Wait up to `timeout` s; past it the process group is killed and the exit code is None."""
        try:
            code = self.popen.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            self.popen.wait()
            code = None
        self.ended = self.ended or time.perf_counter()
        self._out.close()
        self._err.close()
        return Outcome(self.argv, code, Path(f"{self.capture}.out").read_text(errors="replace"),
                       Path(f"{self.capture}.err").read_text(errors="replace"), self.ended - self.started)

    def poll(self) -> int | None:
        code = self.popen.poll()
        if code is not None and self.ended is None:
            self.ended = time.perf_counter()
        return code

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path under `folder` (relative) -> (kind, size, mtime_ns); folders without size and time."""
    found = {}
    for base, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(base, name)
            try:
                info = os.lstat(path)
            except OSError:
                continue
            rel = os.path.relpath(path, folder)
            if os.path.isdir(path) and not os.path.islink(path):
                found[rel] = ("dir", 0, 0)
            else:
                found[rel] = ("link" if os.path.islink(path) else "file", info.st_size, info.st_mtime_ns)
    return found


def written(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """What changed between two snapshots: new paths, changed files (`~path`) and removed ones (`-path`)."""
    new = [p for p in after if p not in before]
    changed = [f"~{p}" for p in after if p in before and after[p][0] != "dir" and after[p] != before[p]]
    removed = [f"-{p}" for p in before if p not in after]
    new_roots = [p for p in sorted(new) if os.path.dirname(p) not in new]  # a new folder stands for its content
    return new_roots + sorted(changed) + sorted(removed)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shown_text(text: str, ctx: Context) -> str:
    """`text` with the case folder as `$T`, the probe folder as `$P` and credentials masked."""
    from dtr_core.redaction import redact

    return redact(text.replace(str(ctx.folder), "$T").replace(str(ctx.root), "$P"))


def shown_command(argv: list[str], ctx: Context) -> str:
    """`dtr ...` as a shell line, paths as `$T/...` (left unquoted), without the `--output-dir $T/runs` of
    every convert case."""
    argv = list(argv)
    if argv[:1] == ["convert"] and "--output-dir" in argv:  # every convert writes into $T/runs: said once
        at = argv.index("--output-dir")
        if argv[at + 1] == str(ctx.folder / "runs"):
            del argv[at:at + 2]
    return "dtr " + " ".join(quoted(shown_text(arg, ctx)) for arg in argv)


def quoted(arg: str) -> str:
    import shlex

    return arg if arg and re.fullmatch(r"[\w@%+=:,./$-]+", arg) else shlex.quote(arg)


def judge(case: Case, outcome: Outcome, wrote: list[str]) -> list[str]:
    """Problems of a process against the bad-input goal (empty: it meets it)."""
    problems = []
    lines = stderr_lines(outcome.stderr)
    if outcome.returncode is None:
        return [f"still running at the hard timeout ({outcome.seconds:.0f} s)"]
    if outcome.returncode != 2:
        problems.append(f"exit {outcome.returncode}")
    if len(lines) != 1 or not lines[0].startswith("error:"):
        problems.append(f"{len(lines)} stderr lines" if len(lines) != 1 else "not an `error:` line")
    if "Traceback" in outcome.stderr:
        problems.append("traceback")
    if outcome.seconds >= BAD_INPUT_SECONDS:
        problems.append(f"{outcome.seconds:.1f} s")
    if wrote:
        problems.append("wrote " + ", ".join(wrote[:WRITTEN_SHOWN]))
    return problems


def one_error_line(outcome: Outcome, code: int) -> list[str]:
    """Problems of a process against 'exit `code`, one `error:` line, the last on stderr, no traceback'."""
    if outcome.returncode is None:
        return [f"still running at the hard timeout ({outcome.seconds:.0f} s)"]
    problems = [] if outcome.returncode == code else [f"exit {outcome.returncode}"]
    errors, lines = error_lines(outcome.stderr), stderr_lines(outcome.stderr)
    if len(errors) != 1:
        problems.append(f"{len(errors)} `error:` lines")
    elif lines[-1] != errors[0]:
        problems.append("the `error:` line is not the last")
    if "Traceback" in outcome.stderr:
        problems.append("traceback")
    return problems


def did(outcome: Outcome, ctx: Context) -> str:
    """What dtr said: its `error:` line if it printed one, else its first stderr line, else stdout's last."""
    errors, lines = error_lines(outcome.stderr), stderr_lines(outcome.stderr)
    out = stderr_lines(outcome.stdout)
    text = errors[0] if errors else lines[0] if lines else out[-1] if out else ""
    return shorten(shown_text(text, ctx), DID_CHARS)


def record(case: Case, ctx: Context, outcome: Outcome, wrote: list[str], problems: list[str],
           note: str = "", env: dict | None = None) -> dict:
    prefix = "".join(f"{key}={value} " for key, value in (env or {}).items())
    return {"name": case.name, "category": case.category, "goal": case.goal,
            "command": shorten(shown_text(prefix, ctx) + shown_command(outcome.argv, ctx), COMMAND_CHARS),
            "did": did(outcome, ctx),
            "exit": outcome.returncode, "stderr_lines": len(stderr_lines(outcome.stderr)),
            "seconds": round(outcome.seconds, 2), "written": [shown_text(w, ctx) for w in wrote],
            "verdict": "pass" if not problems else "FAIL", "problems": problems, "note": note}


def skipped(case: Case, reason: str) -> dict:
    return {"name": case.name, "category": case.category, "goal": case.goal, "command": "", "did": "",
            "exit": None, "stderr_lines": 0, "seconds": 0.0, "written": [], "verdict": "skipped", "problems": [],
            "note": reason}


# --- the probe -----------------------------------------------------------------------------------


class Probe:
    """A probe run: its temporary folder, the fixtures built in it, and the cases run one by one."""

    def __init__(self, root: Path, timeout: float, fault_timeout: float):
        self.root, self.timeout, self.fault_timeout = root, timeout, fault_timeout
        self._fixtures: dict[str, Path] = {}
        self.reference: dict | None = None  # layers of the uninterrupted fault run, once it ran
        self.reference_ran = False

    def fixture(self, name: str) -> Path:
        if name not in self._fixtures:
            self._fixtures[name] = FIXTURES[name](self.root / "fixtures" / name, self)
        return self._fixtures[name]

    def context(self, case: Case) -> Context:
        folder = self.root / "cases" / re.sub(r"[^A-Za-z0-9]+", "-", case.name).strip("-")
        (folder / "home" / ".cache").mkdir(parents=True)  # as in most homes: dtr's cache goes into .cache/dtr
        return Context(self.root, folder, self.fixture, {"T": str(folder)})

    def dtr(self, ctx: Context, argv: list[str], label: str = "run", env: dict | None = None) -> Process:
        return Process(argv, ctx.folder, self.root / "capture" / f"{ctx.folder.name}.{label}",
                       {**dtr_env(ctx.folder), **(env or {})})

    def run(self, case: Case) -> dict:
        ctx = self.context(case)
        try:
            try:
                if case.setup is not None:
                    case.setup(ctx)
            except Skip as reason:
                return skipped(case, str(reason))
            if case.driver is not None:
                return case.driver(case, ctx, self)
            argv = [arg.format(**ctx.values) for arg in case.argv]
            before = snapshot(ctx.folder)
            env = {key: value.format(**ctx.values) for key, value in (case.env or {}).items()}
            outcome = self.dtr(ctx, argv, env=env).wait(self.timeout)
            wrote = written(before, snapshot(ctx.folder))
            problems = judge(case, outcome, wrote)
            if case.check is not None:
                problems += case.check(ctx, outcome)
            return record(case, ctx, outcome, wrote, problems, env=env)
        finally:
            for cleanup in reversed(ctx.cleanups):
                with contextlib.suppress(Exception):
                    cleanup()


class Skip(Exception):
    """A case that cannot run here (e.g. mounting is not allowed); its reason is recorded."""


# --- fixtures ------------------------------------------------------------------------------------


def _tiny_model(folder: Path, probe: Probe) -> Path:
    from transformers.utils import logging as hf_logging

    from dtr_core.models import load_model

    hf_logging.disable_progress_bar()
    model, tokenizer = load_model(MINI_MODEL)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _damaged(damage: Callable[[Path], None]) -> Callable[[Path, Probe], Path]:
    def build(folder: Path, probe: Probe) -> Path:
        shutil.copytree(probe.fixture("model"), folder)
        damage(folder)
        return folder

    return build


def _corrupt_config(folder: Path) -> None:
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": ')


def _bert_config(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]}))


def _truncated(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _nan_weights(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    key = sorted(k for k in weights if k.endswith("q_proj.weight"))[0]
    weights[key] = weights[key].clone()
    weights[key][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert not bool(torch.isfinite(load_file(folder / "model.safetensors")[key]).all())


def _no_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)


def _bin_only(folder: Path, probe: Probe) -> Path:
    """`.bin` weights only, written by `torch.save` (a pickle); the probe never loads it."""
    from dtr_core.models import load_model

    import torch

    shutil.copytree(probe.fixture("model"), folder)
    model, _ = load_model(str(folder))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # transformers 5 saves safetensors only
    (folder / "model.safetensors").unlink()
    return folder


FIXTURES: dict[str, Callable[[Path, Probe], Path]] = {
    "model": _tiny_model,
    "corrupt-config": _damaged(_corrupt_config),
    "bert": _damaged(_bert_config),
    "truncated": _damaged(_truncated),
    "nan": _damaged(_nan_weights),
    "no-tokenizer": _damaged(_no_tokenizer),
    "bin-only": _bin_only,
}


def copy_fixture(name: str, into: str = "model") -> Callable[[Context], None]:
    """Setup: copy fixture `name` into `$T/<into>` (so the listing covers it too)."""

    def setup(ctx: Context) -> None:
        shutil.copytree(ctx.fixtures(name), ctx.folder / into)

    return setup


def write_files(files: dict[str, bytes | str]) -> Callable[[Context], None]:
    """Setup: write these files under $T."""

    def setup(ctx: Context) -> None:
        for rel, content in files.items():
            path = ctx.folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def csv_rows(rows: int, labels: tuple[str, ...] = ("pos", "neg"), header: str = "text,label") -> str:
    return header + "\n" + "".join(f"review number {i} of the film,{labels[i % len(labels)]}\n" for i in range(rows))


GOOD_CSV = csv_rows(60)  # enough for the spec files' sizes below (10 + 10 + 1)
SPEC_OK = {"path": "data.csv", "validation_size": 10, "test_size": 10,
           "verbalisers": {"pos": " positive", "neg": " negative"}}


def spec(**changes) -> str:
    return json.dumps({**SPEC_OK, **changes})


# --- servers, ports and mounts -------------------------------------------------------------------


def closed_port() -> int:
    """A port on 127.0.0.1 nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def poll_until(ready: Callable[[], bool], seconds: float, interval: float = 0.1,
               alive: Callable[[], bool] = lambda: True) -> bool:
    """Whether `ready()` came true within `seconds` while `alive()` held (polled every `interval` s)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and alive():
        if ready():
            return True
        time.sleep(interval)
    return False


def answers(address: tuple[str, int] | str) -> bool:
    """Whether a TCP (host, port) accepts a connection, or an http(s) URL answers 200."""
    with contextlib.suppress(OSError):
        if isinstance(address, tuple):
            socket.create_connection(address, timeout=0.5).close()
            return True
        with urllib.request.urlopen(address, timeout=2) as answer:
            return answer.status == 200
    return False


def stop(process: subprocess.Popen) -> None:
    """SIGKILL the process group of a server the probe started (by its pid), and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


def closed_port_value(ctx: Context) -> None:
    ctx.values["closed"] = str(closed_port())


def http_server(ctx: Context) -> None:
    """A plain (non-MLflow) HTTP server on 127.0.0.1, serving an empty folder outside $T."""
    port, www = closed_port(), ctx.root / "www"
    www.mkdir(exist_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], cwd=www,
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    ctx.cleanups.append(lambda: stop(process))
    if not poll_until(lambda: answers(("127.0.0.1", port)), 30):
        raise Skip("python -m http.server did not start within 30 s")
    ctx.values["http"] = str(port)


def silent_server(ctx: Context) -> None:
    """A listening socket that never accepts: connections open, no byte ever comes back."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    ctx.cleanups.append(sock.close)
    ctx.values["silent"] = str(sock.getsockname()[1])


def mount_tmpfs(rel: str, options: str, fill_to_mb: int | None = None) -> Callable[[Context], None]:
    """Setup: a tmpfs at $T/<rel> (`mount -o <options>`), unmounted after the case; Skip when not allowed.
    `fill_to_mb`: a filler file of that size in it first."""

    def setup(ctx: Context) -> None:
        target = ctx.folder / rel
        target.mkdir(parents=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise Skip(f"mount -t tmpfs failed here ({shorten(proc.stderr, 80) or proc.returncode}); needs root "
                       "with CAP_SYS_ADMIN")
        ctx.cleanups.append(lambda: subprocess.run(["umount", "-l", str(target)], capture_output=True))
        if fill_to_mb:
            with open(target / "filler", "wb") as handle:
                handle.write(b"\0" * (fill_to_mb * 2**20))

    return setup


# --- extra checks --------------------------------------------------------------------------------


def file_intact(rel: str, content: str) -> Callable[[Context, Outcome], list[str]]:
    def check(ctx: Context, outcome: Outcome) -> list[str]:
        path = ctx.folder / rel
        return [] if path.is_file() and path.read_text() == content else [f"{rel} changed or gone"]

    return check


def never_shows(secret: str) -> Callable[[Context, Outcome], list[str]]:
    def check(ctx: Context, outcome: Outcome) -> list[str]:
        return [f"'{secret}' printed"] if secret in outcome.stdout + outcome.stderr else []

    return check


# --- fault cases (real runs) ---------------------------------------------------------------------


def run_log(folder: Path) -> Path | None:
    logs = sorted((folder / "runs" / "probe" / "logs").glob("convert-*.log"))
    return logs[-1] if logs else None


def wait_for_log(process: Process, folder: Path, text: str, seconds: float) -> bool:
    """Poll the run's log until it holds `text` (True), the process ends or `seconds` pass (False)."""
    def logged() -> bool:
        log = run_log(folder)
        return log is not None and text in log.read_text(errors="replace")

    return poll_until(logged, seconds, alive=lambda: process.poll() is None)


def layers(folder: Path) -> dict | None:
    """{M_best: [...], M_opt: [...]} from the run's summary.json, or None without one."""
    path = folder / "runs" / "probe" / "summary.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["rows"]
    return {row["model"]: row["linear_layers"] for row in rows if row["model"] != "teacher"}


def stage(folder: Path) -> str:
    """Where the run stood: students saved, greedy candidates scored."""
    run = folder / "runs" / "probe"
    students = len(list(run.glob("students/layer_*/meta.json")))
    candidates = len(list(run.glob("greedy/candidates/*.json")))
    return f"{students} students saved, {candidates} greedy candidates scored"


def outside_dtr(wrote: list[str]) -> list[str]:
    """Paths written outside the run folder, the MLflow store (and its lock), its artifacts and dtr's cache."""
    own = ("runs", "mlflow.db", "mlruns", "mlartifacts")
    return [w for w in wrote if w.lstrip("~-").split(os.sep)[0].split("-journal")[0].split(".lock")[0] not in own
            and not w.lstrip("~-").startswith(os.path.join("home", ".cache", "dtr"))]


def fault_argv(ctx: Context, *extra: str) -> list[str]:
    return [*FAULT_RUN, "--output-dir", str(ctx.folder / "runs"), *extra]


def fault_in_distillation(ctx: Context, probe: Probe, fault: Callable[[Process], None], argv: list[str],
                          log_folder: Path | None = None) -> tuple[Outcome, list[str], list[str], float]:
    """Start a fault run, call `fault(process)` once its log (in `log_folder`, default $T) says distillation
    started, and wait for it to exit: (outcome, what it wrote, problems so far, seconds from the fault to exit)."""
    before = snapshot(ctx.folder)
    process = probe.dtr(ctx, argv)
    reached = wait_for_log(process, log_folder or ctx.folder, "phase 1:", probe.fault_timeout)
    fault_at = time.perf_counter()
    fault(process)
    outcome = process.wait(probe.fault_timeout)
    after = (process.ended or time.perf_counter()) - fault_at
    problems = [] if reached else ["the run never reached distillation"]
    return outcome, written(before, snapshot(ctx.folder)), problems, after


def drive_reference(case: Case, ctx: Context, probe: Probe) -> dict:
    before = snapshot(ctx.folder)
    outcome = probe.dtr(ctx, fault_argv(ctx)).wait(probe.fault_timeout)
    wrote = written(before, snapshot(ctx.folder))
    problems = [] if outcome.returncode == 0 else [f"exit {outcome.returncode}"]
    stray = outside_dtr(wrote)
    if stray:
        problems.append("wrote outside dtr's folders: " + ", ".join(stray[:WRITTEN_SHOWN]))
    probe.reference, probe.reference_ran = layers(ctx.folder), True
    if outcome.returncode == 0 and probe.reference is None:
        problems.append("no summary.json")
    return record(case, ctx, outcome, wrote, problems, note=f"layers {probe.reference}")


def _resume(marker: str, after: float) -> Callable[[Case, Context, Probe], dict]:
    """Kill -9 the process group once the run's log holds `marker` (plus `after` s), then run it again."""

    def drive(case: Case, ctx: Context, probe: Probe) -> dict:
        before = snapshot(ctx.folder)
        first = probe.dtr(ctx, fault_argv(ctx), "first")
        reached = wait_for_log(first, ctx.folder, marker, probe.fault_timeout)
        time.sleep(after)
        alive = first.poll() is None
        first.kill()
        first.wait(30)
        where = stage(ctx.folder)
        outcome = probe.dtr(ctx, fault_argv(ctx), "again").wait(probe.fault_timeout)
        wrote = written(before, snapshot(ctx.folder))
        problems = [] if reached and alive else [f"the first run never reached {marker!r} alive"]
        if outcome.returncode != 0:
            problems.append(f"rerun exit {outcome.returncode}")
        got = layers(ctx.folder)
        if probe.reference is None and not probe.reference_ran:  # run alone (--only): the reference first
            probe.run(BY_NAME["uninterrupted run"])
        if probe.reference is None:
            problems.append("no reference layers (the uninterrupted run failed or did not run)")
        elif got != probe.reference:
            problems.append(f"layers {got}, uninterrupted {probe.reference}")
        return record(case, ctx, outcome, wrote, problems, note=f"killed at: {where}; rerun layers {got}")

    return drive


def drive_concurrent(case: Case, ctx: Context, probe: Probe) -> dict:
    """The first run is paused (SIGSTOP to the dtr process, its Prefect server left running) once it holds
    the run folder, so that the second, which needs tens of seconds to start, surely meets it; then resumed."""
    before = snapshot(ctx.folder)
    first = probe.dtr(ctx, fault_argv(ctx), "first")
    reached = wait_for_log(first, ctx.folder, "run probe in", probe.fault_timeout)
    with contextlib.suppress(ProcessLookupError):
        os.kill(first.popen.pid, signal.SIGSTOP)
    try:
        outcome = probe.dtr(ctx, fault_argv(ctx), "second").wait(probe.fault_timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first.popen.pid, signal.SIGCONT)
    first_outcome = first.wait(probe.fault_timeout)
    wrote = written(before, snapshot(ctx.folder))
    problems = [] if reached else ["the first run never took the run folder"]
    problems += one_error_line(outcome, 2)
    if first_outcome.returncode != 0:
        problems.append(f"first run exit {first_outcome.returncode}")
    return record(case, ctx, outcome, wrote, problems,
                  note=f"first run: exit {first_outcome.returncode} in {first_outcome.seconds:.0f} s")


def drive_mlflow_killed(case: Case, ctx: Context, probe: Probe) -> dict:
    """An MLflow server for the run, SIGKILLed once distillation starts: how long until dtr exits, and how."""
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    port, server_dir = closed_port(), ctx.root / "mlflow-server"
    server_dir.mkdir()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "HOME": str(server_dir)}
    server = subprocess.Popen([mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{server_dir / 'mlflow.db'}",
                               "--artifacts-destination", str(server_dir / "mlartifacts")],
                              cwd=server_dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=open(probe.root / "capture" / "mlflow-server.err", "w"),
                              start_new_session=True)
    ctx.cleanups.append(lambda: stop(server))
    uri = f"http://127.0.0.1:{port}"
    if not poll_until(lambda: answers(uri + "/health"), 90, interval=0.5):
        raise Skip("mlflow server did not answer /health within 90 s")
    outcome, wrote, problems, after_kill = fault_in_distillation(ctx, probe, lambda process: stop(server),
                                                                 fault_argv(ctx, "--tracking-uri", uri))
    problems += one_error_line(outcome, 1)
    if after_kill > FAULT_EXIT_SECONDS:
        problems.append(f"exited {after_kill:.0f} s after the kill")
    return record(case, ctx, outcome, wrote, problems,
                  note=f"exited {after_kill:.1f} s after the server was killed; {stage(ctx.folder)}")


def drive_disk_full(case: Case, ctx: Context, probe: Probe) -> dict:
    """`--output-dir` on a 30 MB tmpfs that a filler file fills up once distillation starts."""
    mount_tmpfs("disk", "size=30m")(ctx)
    disk = ctx.folder / "disk"

    def fill(process: Process) -> None:
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as handle:
            while True:
                handle.write(b"\0" * 2**20)

    # the run's log lies in the run folder on the small disk
    outcome, wrote, problems, after_fill = fault_in_distillation(ctx, probe, fill,
                                                                 [*FAULT_RUN, "--output-dir", str(disk / "runs")],
                                                                 log_folder=disk)
    problems += one_error_line(outcome, 1)
    if outcome.returncode is not None and "no space left" not in " ".join(error_lines(outcome.stderr)):
        problems.append("the line does not say the disk is full")
    if after_fill > FAULT_EXIT_SECONDS:
        problems.append(f"exited {after_fill:.0f} s after the disk filled")
    return record(case, ctx, outcome, [w for w in wrote if w != os.path.join("disk", "filler")], problems,
                  note=f"exited {after_fill:.1f} s after the disk filled")


def drive_sigterm(case: Case, ctx: Context, probe: Probe) -> dict:
    def terminate(process: Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.popen.pid, signal.SIGTERM)  # the dtr process only, as `kill <pid>` does

    outcome, wrote, problems, after = fault_in_distillation(ctx, probe, terminate, fault_argv(ctx))
    lines = stderr_lines(outcome.stderr)
    if outcome.returncode != 130:
        problems.append(f"exit {outcome.returncode}")
    if not lines or lines[-1] != "interrupted; run the same command again to resume":
        problems.append("last stderr line is not the interrupt line")
    if "Traceback" in outcome.stderr:
        problems.append("traceback")
    return record(case, ctx, outcome, wrote, problems, note=f"exited {after:.1f} s after SIGTERM; {stage(ctx.folder)}")


# --- the cases -----------------------------------------------------------------------------------


def convert(*args: str) -> tuple[str, ...]:
    return (*CONVERT, "--output-dir", "{T}/runs", *args)


def hybridize(*args: str, layers: str = "1", out: str = "{T}/out", model: str = MINI_MODEL) -> tuple[str, ...]:
    return ("hybridize", "--model", model, "--layers", layers, "--out", out, *args)


def evaluate(*args: str, model: str = MINI_MODEL, task: str = "sentiment") -> tuple[str, ...]:
    return ("eval", "--model", model, "--task", task, "--limit", "4", *args)


USER_FILE = "a note the user keeps here\n"
A = "arguments"
CASES: tuple[Case, ...] = (
    # --- command-line arguments
    Case("unknown profile", A, convert("--profile", "nope")),
    Case("unknown mixer", A, convert("--mixer", "nope"), quick=True),
    Case("unknown task", A, convert("--task", "nope")),
    Case("--max-layers 0", A, convert("--max-layers", "0"), quick=True),
    Case("--max-layers x", A, convert("--max-layers", "x")),
    Case("--run-id ../../x", A, convert("--run-id", "../../x"), quick=True),
    Case("--run-id ''", A, convert("--run-id", "")),
    Case("--run-id through a symlink", A, convert("--run-id", "link"),
         setup=lambda ctx: ((ctx.folder / "runs").mkdir(), (ctx.folder / "runs" / "link").symlink_to(ctx.root))),
    Case("--model-name a/b", A, convert("--model-name", "a/b")),
    Case("--tolerance 1.5 (relative)", A, convert("--tolerance", "1.5")),
    Case("--tolerance abc", A, convert("--tolerance", "abc")),
    Case("--tolerance-mode bogus", A, convert("--tolerance-mode", "bogus")),
    Case("--acceptance bogus", A, convert("--acceptance", "bogus")),
    Case("--confidence 1.5", A, convert("--acceptance", "bootstrap", "--confidence", "1.5")),
    Case("--resamples 0", A, convert("--acceptance", "bootstrap", "--resamples", "0")),
    Case("--steps 0", A, convert("--steps", "0")),
    Case("--lr -1", A, convert("--lr", "-1")),
    Case("--distill-tokens 5", A, convert("--distill-tokens", "5")),
    Case("--seq-len 100000", A, convert("--seq-len", "100000")),
    Case("one sequence of tokens", A, convert("--distill-tokens", "64", "--seq-len", "64")),
    Case("--workers 0", A, convert("--workers", "0")),
    Case("--runner bogus", A, convert("--runner", "bogus")),
    Case("--seed -1", A, convert("--seed", "-1")),
    Case("--context-len 0", A, convert("--context-len", "0")),
    Case("--speed-repeats 0", A, convert("--speed-repeats", "0")),
    Case("--val-limit 0", A, convert("--val-limit", "0")),
    Case("--verbaliser nolabel", A, convert("--verbaliser", "nolabel")),
    Case("--dask-address with runner threads", A, convert("--runner", "threads", "--dask-address",
                                                          "tcp://127.0.0.1:8786")),
    Case("--corpus missing file", A, convert("--corpus", "{T}/no-such-corpus.txt")),
    Case("unknown option", A, convert("--no-such-option", "1")),
    Case("unknown command", A, ("no-such-command",)),
    Case("hybridize --layers ''", A, hybridize(layers="")),
    Case("hybridize --layers 3-1", A, hybridize(layers="3-1")),
    Case("hybridize --layers 99", A, hybridize(layers="99")),
    Case("hybridize --layers x", A, hybridize(layers="x")),
    Case("hybridize --mixer nope", A, hybridize("--mixer", "nope")),
    Case("hybridize --out a user's folder", A, hybridize(out="{T}/mine"), quick=True,
         setup=write_files({"mine/notes.txt": USER_FILE}), check=file_intact("mine/notes.txt", USER_FILE)),
    Case("hybridize --students missing folder", A, hybridize("--students", "{T}/no-such-students")),
    Case("eval unknown split", A, evaluate("--split", "bogus"), quick=True),
    Case("eval unknown task", A, evaluate(task="nope")),
    Case("eval --limit 0", A, evaluate("--limit", "0")),
    Case("eval --batch-size 0", A, evaluate("--batch-size", "0")),
    Case("eval missing task spec", A, evaluate(task="{T}/no-such-spec.json")),
    # --- model sources
    Case("nonexistent model path", "models", convert("--model", "{T}/no-such-model"), quick=True),
    Case("offline hub id", "models", convert("--model", "some-org/some-model")),
    Case("model folder without config.json", "models", convert("--model", "{T}/empty"),
         setup=lambda ctx: (ctx.folder / "empty").mkdir()),
    Case("model path is a file", "models", convert("--model", "{T}/model.txt"),
         setup=write_files({"model.txt": "not a model\n"})),
    Case("corrupt config.json", "models", convert("--model", "{T}/model"), setup=copy_fixture("corrupt-config")),
    Case("unsupported model_type", "models", convert("--model", "{T}/model"), setup=copy_fixture("bert")),
    Case("truncated model.safetensors", "models", convert("--model", "{T}/model"), setup=copy_fixture("truncated")),
    Case("NaN weights", "models", convert("--model", "{T}/model"), setup=copy_fixture("nan"), quick=True),
    Case("no tokenizer", "models", convert("--model", "{T}/model"), setup=copy_fixture("no-tokenizer")),
    Case(".bin-only weights", "models", convert("--model", "{T}/model"), setup=copy_fixture("bin-only")),
    Case("eval: nonexistent model", "models", evaluate(model="{T}/no-such-model")),
    Case("eval: truncated weights", "models", evaluate(model="{T}/model"), setup=copy_fixture("truncated")),
    Case("eval: corrupt config.json", "models", evaluate(model="{T}/model"), setup=copy_fixture("corrupt-config")),
    Case("hybridize: NaN weights", "models", hybridize(model="{T}/model"), setup=copy_fixture("nan")),
    Case("hybridize: .bin-only weights", "models", hybridize(model="{T}/model"), setup=copy_fixture("bin-only")),
    # --- task data (--data-file, and task spec files)
    Case("latin-1 CSV", "data", convert("--data-file", "{T}/data.csv", *VERBALISERS), quick=True,
         setup=write_files({"data.csv": csv_rows(800).replace("film", "caf\xe9").encode("latin-1")})),
    Case("empty CSV", "data", convert("--data-file", "{T}/data.csv", *VERBALISERS),
         setup=write_files({"data.csv": ""})),
    Case("CSV with one class", "data", convert("--data-file", "{T}/data.csv", "--verbaliser", "pos= positive"),
         setup=write_files({"data.csv": csv_rows(800, labels=("pos",))})),
    Case("CSV missing its columns", "data", convert("--data-file", "{T}/data.csv", *VERBALISERS),
         setup=write_files({"data.csv": csv_rows(800, header="review,stars")})),
    Case("CSV with too few rows", "data", convert("--data-file", "{T}/data.csv", *VERBALISERS),
         setup=write_files({"data.csv": csv_rows(20)})),
    Case("CSV without verbalisers", "data", convert("--data-file", "{T}/data.csv"),
         setup=write_files({"data.csv": csv_rows(800)})),
    Case("data file of another format", "data", convert("--data-file", "{T}/data.txt", *VERBALISERS),
         setup=write_files({"data.txt": csv_rows(800)})),
    Case("missing data file", "data", convert("--data-file", "{T}/no-such.csv", *VERBALISERS)),
    Case("spec: wrong types", "data", convert("--task", "{T}/task.json"),
         setup=write_files({"task.json": spec(validation_size="twenty"), "data.csv": GOOD_CSV})),
    Case("spec: verbalisers as a list", "data", convert("--task", "{T}/task.json"),
         setup=write_files({"task.json": spec(verbalisers=[" positive", " negative"]), "data.csv": GOOD_CSV})),
    Case("spec: nonexistent data file", "data", convert("--task", "{T}/task.json"),
         setup=write_files({"task.json": spec(path="no-such.csv")})),
    Case("spec: not JSON", "data", convert("--task", "{T}/task.json"),
         setup=write_files({"task.json": "{'path': 'data.csv',}", "data.csv": GOOD_CSV})),
    Case("spec: unknown field", "data", convert("--task", "{T}/task.json"),
         setup=write_files({"task.json": spec(labels=["pos"]), "data.csv": GOOD_CSV})),
    Case("eval: spec with wrong types", "data", evaluate(task="{T}/task.json"),
         setup=write_files({"task.json": spec(test_size=-3), "data.csv": GOOD_CSV})),
    # --- where things go
    Case("--output-dir below a file", "output", (*CONVERT, "--output-dir", "{T}/file.txt/runs"),
         setup=write_files({"file.txt": USER_FILE}), check=file_intact("file.txt", USER_FILE)),
    Case("--output-dir is a file", "output", (*CONVERT, "--output-dir", "{T}/file.txt"), quick=True,
         setup=write_files({"file.txt": USER_FILE}), check=file_intact("file.txt", USER_FILE)),
    Case("--output-dir read-only", "output", (*CONVERT, "--output-dir", "{T}/ro/runs"),
         setup=mount_tmpfs("ro", "ro,size=1m")),
    Case("--output-dir without room", "output", (*CONVERT, "--output-dir", "{T}/disk/runs"),
         setup=mount_tmpfs("disk", "size=30m", fill_to_mb=29)),
    Case("hybridize --out below a file", "output", hybridize(out="{T}/file.txt/out"),
         setup=write_files({"file.txt": USER_FILE}), check=file_intact("file.txt", USER_FILE)),
    Case("hybridize --out is a file", "output", hybridize(out="{T}/file.txt"),
         setup=write_files({"file.txt": USER_FILE}), check=file_intact("file.txt", USER_FILE)),
    Case("sqlite store in a missing folder", "output", convert("--tracking-uri", "sqlite:///{T}/no/such/mlflow.db")),
    # --- servers
    Case("tracking URI unreachable", "servers", convert("--tracking-uri", "http://127.0.0.1:{closed}"), quick=True,
         setup=closed_port_value),
    Case("MLFLOW_TRACKING_URI unreachable", "servers", convert(), setup=closed_port_value,
         env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{closed}"}),
    Case("unreachable tracking URI with a password", "servers",
         convert("--tracking-uri", "http://alice:secret@127.0.0.1:{closed}"), setup=closed_port_value,
         check=never_shows("secret")),
    Case("not an MLflow server", "servers", convert("--tracking-uri", "http://127.0.0.1:{http}"), setup=http_server),
    Case("server that never answers", "servers", convert("--tracking-uri", "http://127.0.0.1:{silent}"),
         setup=silent_server),
    Case("postgresql without a driver", "servers", convert("--tracking-uri", "postgresql://u:secret@127.0.0.1/x"),
         check=never_shows("secret")),
    Case("file: store", "servers", convert("--tracking-uri", "file://{T}/mlruns")),
    Case("unknown URI scheme", "servers", convert("--tracking-uri", "ftp://127.0.0.1/x")),
    Case("Dask scheduler unreachable", "servers", convert("--runner", "dask", "--dask-address",
                                                         "tcp://127.0.0.1:{closed}"), setup=closed_port_value),
    # --- faults during a real run (the slow part)
    Case("uninterrupted run", "faults", goal="completes", driver=drive_reference, slow=True),
    Case("kill -9 during distillation then rerun", "faults", goal="resume", slow=True,
         driver=_resume("phase 1:", 1.0)),
    Case("kill -9 during the search then rerun", "faults", goal="resume", slow=True,
         driver=_resume("candidates scored", 0.0)),
    Case("same run twice", "faults", goal="refused", driver=drive_concurrent, slow=True),
    Case("MLflow server killed", "faults", goal="runtime fault", driver=drive_mlflow_killed, slow=True),
    Case("disk fills up", "faults", goal="runtime fault", driver=drive_disk_full, slow=True),
    Case("SIGTERM during distillation", "faults", goal="interrupt", driver=drive_sigterm, slow=True),
)
BY_NAME = {case.name: case for case in CASES}


# --- the benchmark -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    subset: str = option("all", "which cases: all, fast (all but the slow fault runs) or quick (about 10 fast "
                         "ones)", choices=("all", "fast", "quick"))
    only: tuple[str, ...] | None = option(None, "only these cases (comma-separated names)", parse=name_list)
    timeout: float = option(60.0, "hard timeout of one bad-input case (s)", minimum=1)
    fault_timeout: float = option(300.0, "hard timeout of one process of a fault case (s)", minimum=10)
    keep: bool = option(False, "keep the probe's temporary folder (its path is logged)")


def check(settings: Settings, preset: str | None) -> Settings:
    unknown = [name for name in settings.only or () if name not in BY_NAME]
    if unknown:
        raise ValueError(f"--only: unknown case(s) {', '.join(map(repr, unknown))}; see the case names in "
                         "docs/RELIABILITY.md")
    return settings


def selected(settings: Settings) -> list[Case]:
    if settings.only:
        return [BY_NAME[name] for name in settings.only]
    return [case for case in CASES if settings.subset == "all" or (not case.slow and (
        settings.subset == "fast" or case.quick))]


@contextlib.contextmanager
def probe_folder(keep: bool) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="dtr-reliability-"))
    try:
        yield root
    finally:
        if keep:
            harness.logger.info("reliability: kept %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)


def measure(settings: Settings) -> dict:
    cases = selected(settings)
    rows = []
    with probe_folder(settings.keep) as root:
        probe = Probe(root, settings.timeout, settings.fault_timeout)
        for number, case in enumerate(cases, 1):
            started = time.perf_counter()
            try:
                row = probe.run(case)
            except Exception as error:  # Skip, or the probe's own failure: recorded, the other cases still run
                reason = str(error) if isinstance(error, Skip) else f"probe error: {type(error).__name__}: {error}"
                row = skipped(case, reason)
            harness.logger.info("reliability %d/%d %s: %s%s (%.1f s)", number, len(cases), case.name, row["verdict"],
                                f" ({'; '.join(row['problems'])})" if row["problems"] else "",
                                time.perf_counter() - started)
            rows.append(row)
    counts = {verdict: sum(row["verdict"] == verdict for row in rows) for verdict in ("pass", "FAIL", "skipped")}
    return {"goals": GOALS, "categories": CATEGORIES, "cases": rows, "counts": counts,
            "environment": {"T": "a fresh temporary folder per case (cwd, HOME=$T/home)",
                            "MLFLOW_TRACKING_URI": "sqlite:///$T/mlflow.db", "DTR_TORCH_THREADS": "1",
                            "HF_HUB_OFFLINE": "1", "CI": "true", "stdin": "closed", "convert": "--output-dir $T/runs",
                            "fault runs": "dtr " + " ".join(FAULT_RUN) + " --output-dir $T/runs"}}


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _exit_cell(row: dict) -> str:
    if row["verdict"] == "skipped":
        return ""
    return "timeout" if row["exit"] is None else str(row["exit"])


def markdown(result: dict) -> str:
    rows, counts = result["cases"], result["counts"]
    judged = counts["pass"] + counts["FAIL"]
    lines = ["# Reliability probe: bad input and faults, run for real", "", harness.environment(result), "",
             f"**{counts['pass']} of {judged} cases meet their goal**" + (
                 f" ({counts['skipped']} skipped)" if counts["skipped"] else "") + ".", ""]
    summary = []
    for key, title in result["categories"].items():
        mine = [r for r in rows if r["category"] == key]
        if mine:
            summary.append([title, len(mine), sum(r["verdict"] == "pass" for r in mine),
                            sum(r["verdict"] == "FAIL" for r in mine), sum(r["verdict"] == "skipped" for r in mine)])
    lines += [harness.markdown_table(["category", "cases", "pass", "fail", "skipped"], summary), "",
              "Goals:", ""] + [f"- **{goal}**: {text}" for goal, text in result["goals"].items()] + [
              "", "Every case (docs/RELIABILITY.md): " + "; ".join(f"{key}: `{value}`" for key, value in
                                                                  result["environment"].items())
              + ". *written*: paths new under `$T` (`~` changed, `-` removed).", ""]
    headers = ["case", "command", "dtr did (first `error:` line, else first stderr line)", "exit", "lines",
               "seconds", "written", "verdict"]
    for key, title in result["categories"].items():
        mine = [r for r in rows if r["category"] == key]
        if not mine:
            continue
        table = []
        for r in mine:
            wrote = ", ".join(f"`{w}`" for w in r["written"][:WRITTEN_SHOWN]) + (
                f" (+{len(r['written']) - WRITTEN_SHOWN})" if len(r["written"]) > WRITTEN_SHOWN else "")
            verdict = r["verdict"] + (": " + "; ".join(r["problems"]) if r["problems"] else "")
            if r["note"]:
                verdict += f" ({r['note']})"
            table.append([_cell(r["name"]) + ("" if r["goal"] == "bad input" else f" [{r['goal']}]"),
                          f"`{_cell(r['command'])}`" if r["command"] else "", _cell(r["did"]),
                          _exit_cell(r),
                          r["stderr_lines"], f"{r['seconds']:.1f}", _cell(wrote or "nothing"), _cell(verdict)])
        lines += [f"## {title}", "", harness.markdown_table(headers, table, align="llllrrll"), ""]
    failed = [r for r in rows if r["verdict"] == "FAIL"]
    if failed:
        lines += ["## Cases that miss their goal", ""] + [
            f"- {r['name']}: {'; '.join(r['problems'])}" for r in failed] + [""]
    lines += [harness.footer(result), ""]
    return "\n".join(lines)


BENCH = harness.Benchmark("reliability", Settings, measure, markdown, presets={"quick": {"subset": "quick"}},
                          check=check, ok=lambda result: result["counts"]["FAIL"] == 0,
                          description=__doc__.split("\n\n")[0])
main = BENCH.main


if __name__ == "__main__":
    sys.exit(main())
