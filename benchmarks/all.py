"""Run every benchmark and assemble `docs/BENCHMARKS.md` from their outputs (one command for all tables).

Each benchmark of `harness.REGISTRY` runs in its own process, in the registry's order, into
`<out-root>/<name>` (docs/bench/ for a full run, runs/bench-quick/ for `--quick`); inference and recall are wired
to the placements result. Wiring, the document and its sections: docs/BENCHMARKS_HARNESS.md. Exit status 1 when
any benchmark failed.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import BY_NAME, REGISTRY, Entry, shown

DEFAULT_DOC = harness.REPO_ROOT / "docs" / "BENCHMARKS.md"
DEFAULT_LOGS = harness.REPO_ROOT / "runs" / "bench" / "logs"
OK_STATUSES = ("ok", "ok, targets missed")  # a run that completed (inference exits 1 when a target is missed)


def default_paths(quick: bool, out_root: Path | None = None, doc: Path | None = None) -> tuple[Path, Path]:
    """(out_root, doc): docs/bench and docs/BENCHMARKS.md for full runs; a quick run writes both under
    runs/bench-quick/, so it never touches docs/."""
    out_root = Path(out_root) if out_root is not None else harness.QUICK_ROOT if quick else harness.DOCS_BENCH
    return out_root, Path(doc) if doc is not None else (out_root / "BENCHMARKS.md" if quick else DEFAULT_DOC)


# --- wiring --------------------------------------------------------------------------------------


def placements_result(out_root: Path) -> dict | None:
    path = out_root / "placements" / "placements.json"
    return json.loads(path.read_text()) if path.is_file() else None


def wiring_args(name: str, out_root: Path, extra: Sequence[str]) -> tuple[list[str], str | None]:
    """Arguments that connect `name` to the placements result (unless the user's extra args set them)."""
    result = placements_result(out_root)
    if result is None or not result.get("tasks"):
        return [], None
    task_name, task = next(iter(result["tasks"].items()))

    def greedy_order() -> str:
        order = out_root / "placements" / f"greedy_order_{task_name}.json"
        harness.write_json(order, {"swap_order": [r["layer"] for r in task["greedy_trajectory"]]})
        return shown(order)

    if name == "inference" and "--layers-from" not in extra:
        return ["--layers-from", greedy_order()], f"greedy order of placements ({task_name})"
    if name == "healing" and not {"--students", "--order", "--model"} & set(extra):
        return ["--students", shown(Path(result["students"]["dir"])), "--order", greedy_order(), "--tasks",
                task_name], f"placements students and greedy order ({task_name})"
    if name == "recall" and not {"--hybrid", "--layers", "--k", "--students"} & set(extra):
        if result["model"] != _flag(extra, "--model", "smollm2-135m"):
            return [], None
        opt = task["acceptance"].get("point", {}).get("opt_layers")
        students = ["--students", shown(Path(result["students"]["dir"]))]
        if opt:
            return students + ["--layers", ",".join(map(str, opt))], f"M_opt of placements ({task_name}, point)"
        return students, f"placements students (its M_opt on {task_name} has no linear layer: uniform k)"
    return [], None


def _flag(args: Sequence[str], flag: str, default: str) -> str:
    args = list(args)
    return args[args.index(flag) + 1] if flag in args[:-1] else default


# --- running -------------------------------------------------------------------------------------


def run_bench(bench: Entry, out_root: Path, logs: Path, quick: bool, extra: Sequence[str],
              timeout: float | None) -> dict:
    """Run one benchmark in a subprocess, writing into `out_root/<name>`; returns its status record."""
    out_dir, log = out_root / bench.name, logs / f"{bench.name}.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    wired, wiring = wiring_args(bench.name, out_root, extra)
    args = (["--quick"] if quick else []) + wired + list(extra) + ["--out", shown(out_dir)]  # runs from the root
    started = time.perf_counter()
    record = {"name": bench.name, "module": bench.module, "commands": harness.command_lines(bench.module, bench.name,
                                                                                            args),
              "wiring": wiring, "log": str(log),
              "started_utc": time.strftime(harness.DATE_FORMAT, time.gmtime()), "quick": quick}
    try:
        with open(log, "w") as stderr:
            proc = subprocess.run([sys.executable, "-m", bench.module, *args], cwd=harness.REPO_ROOT,
                                  stdout=subprocess.DEVNULL, stderr=stderr, text=True, timeout=timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return {**record, "status": "timeout", "seconds": time.perf_counter() - started,
                "reason": f"stopped after {timeout:.0f} s"}
    record["seconds"] = time.perf_counter() - started
    report = out_dir / f"{bench.name}.md"
    if proc.returncode == 0 or (report.is_file() and _fresh(report, started)):
        return {**record, "status": "ok" if proc.returncode == 0 else "ok, targets missed",
                "returncode": proc.returncode}
    tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
    return {**record, "status": "failed", "returncode": proc.returncode,
            "reason": tail[0] if tail else f"exit status {proc.returncode}"}


def _fresh(path: Path, since_perf: float) -> bool:
    return path.stat().st_mtime >= time.time() - (time.perf_counter() - since_perf)


# --- assembling ----------------------------------------------------------------------------------


def section(bench: Entry, out_root: Path, doc: Path, record: dict | None) -> str:
    """The benchmark's report as a section of the document."""
    out_dir = out_root / bench.name
    report = out_dir / f"{bench.name}.md"
    lines = [f"## {bench.title}", ""]
    if record is not None and record["status"] not in OK_STATUSES:
        lines += [f"**Not completed in this run** (`{record['commands']['dtr']}`): {record['status']} — "
                  f"{record.get('reason', '')}. Log: `{shown(Path(record['log']))}`.", ""]
    if not report.is_file():
        return "\n".join(lines + [f"Not run yet. Command: `dtr bench {bench.name}` (add `--quick` for a short run).",
                                  ""])
    if record is None or record["status"] not in OK_STATUSES:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(report.stat().st_mtime))
        lines += [f"_From an earlier run (report written {stamp}); not rerun in this invocation._", ""]
    body = report.read_text()
    body = re.sub(r"\A# [^\n]*\n+", "", body)  # the section heading replaces the report's title
    body = re.sub(r"^(#{1,5}) ", lambda m: "#" + m.group(1) + " ", body, flags=re.MULTILINE)
    relative = Path(os.path.relpath(out_dir.resolve(), doc.resolve().parent)).as_posix()
    body = re.sub(r"\]\(([^)/:]+\.png)\)", lambda m: f"]({relative}/{m.group(1)})", body)
    return "\n".join(lines + [body.strip(), ""])


def assemble(out_root: Path, doc: Path, records: dict[str, dict], argv: Sequence[str],
             previous: dict[str, dict] | None = None) -> str:
    """The document. `records`: runs of this invocation; `previous`: the last recorded run of the others."""
    env = {"machine": harness.machine_info(), "commands": harness.command_lines("benchmarks.all", "all", argv)}
    previous = previous or {}
    rows = []
    for bench in REGISTRY:
        record = records.get(bench.name)
        report = out_root / bench.name / f"{bench.name}.md"
        earlier = previous.get(bench.name)
        if record is not None:
            status = record["status"] + (" (quick)" if record.get("quick") else "")
            when = f"{record['seconds'] / 60:.1f} min"
        elif report.is_file() and earlier is not None and earlier.get("status") in OK_STATUSES \
                and _written_by(earlier, report):
            status = f"earlier run: {earlier['status']}" + (" (quick)" if earlier.get("quick") else "")
            when = f"{earlier['seconds'] / 60:.1f} min"
        else:
            status = "earlier run (not via `dtr bench all`)" if report.is_file() else "not run"
            when = "-"
        rows.append([f"[{bench.name}](#{_anchor(bench.title)})", bench.title, status, when,
                     f"`{Path(os.path.relpath(out_root / bench.name, doc.parent)).as_posix()}/`"])
    out = [
        "# dtr benchmarks", "",
        "Generated by `dtr bench all` from the benchmarks' outputs; how to read each section: "
        "`docs/BENCHMARKS_*.md`.", "",
        harness.markdown_table(["benchmark", "what", "status", "wall time", "outputs"], rows, align="lllrl"), "",
        harness.environment(env), "",
    ] + [section(bench, out_root, doc, records.get(bench.name)) for bench in REGISTRY]
    return "\n".join(out)


def _written_by(record: dict, report: Path) -> bool:
    """Whether `report` is still the output of the recorded run, not of a later direct run: it shows the
    recorded command, and the date it states (`- date (UTC): ...`) falls within the recorded run."""
    text = report.read_text()
    if record.get("commands", {}).get("dtr", "") not in text:
        return False
    stated = re.search(r"^- date \(UTC\): (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", text, re.MULTILINE)
    if stated is None or "started_utc" not in record:
        return True
    started = _dt.datetime.strptime(record["started_utc"], harness.DATE_FORMAT)
    offset = (_dt.datetime.strptime(stated.group(1), harness.DATE_FORMAT) - started).total_seconds()
    return 0 <= offset <= record.get("seconds", 0) + 60


def record_and_assemble(out_root: Path, doc: Path, records: dict[str, dict], argv: Sequence[str]) -> str:
    """Add this invocation's runs to `out_root/all.json` and rewrite `doc` from every benchmark's output."""
    index = out_root / "all.json"
    previous = json.loads(index.read_text()).get("runs", {}) if index.is_file() else {}
    document = assemble(out_root, doc, records, argv, previous)
    harness.write_text(doc, document)
    harness.write_json(index, {"commands": harness.command_lines("benchmarks.all", "all", argv),
                              "runs": {**previous, **records}})
    return document


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")  # GitHub heading anchors


# --- command line --------------------------------------------------------------------------------


def _names(text: str) -> list[str]:
    names = list(harness.name_list(text))
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown benchmark(s) {unknown}; choose from: {', '.join(BY_NAME)}")
    return names


def _extra(text: str) -> tuple[str, list[str]]:
    name, sep, args = text.partition("=")
    if not sep or name not in BY_NAME:
        raise argparse.ArgumentTypeError(f"--extra takes NAME=ARGS with NAME one of {', '.join(BY_NAME)}, got {text!r}")
    return name, shlex.split(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtr bench all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
    parser.add_argument("--json", action="store_true", help="print the run records as JSON instead of the document")
    parser.add_argument("--only", type=_names, default=None, help="comma-separated benchmarks to run")
    parser.add_argument("--skip", type=_names, default=[], help="comma-separated benchmarks not to run")
    parser.add_argument("--extra", type=_extra, action="append", default=[],
                        help='extra arguments for one benchmark, e.g. --extra placements="--tasks sentiment"')
    parser.add_argument("--assemble-only", action="store_true", help="run nothing; rebuild the document")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default: none)")
    parser.add_argument("--out-root", type=Path, default=None,
                        help="benchmark output folders (default: docs/bench; with --quick runs/bench-quick)")
    parser.add_argument("--doc", type=Path, default=None, help="the assembled markdown document (default: "
                        "docs/BENCHMARKS.md; with --quick BENCHMARKS.md in the out root)")
    parser.add_argument("--logs", type=Path, default=DEFAULT_LOGS, help="folder for the benchmarks' logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    out_root, doc = default_paths(args.quick, args.out_root, args.doc)
    extra: dict[str, list[str]] = {}
    for name, values in args.extra:
        extra.setdefault(name, []).extend(values)
    selected = [] if args.assemble_only else [b for b in REGISTRY if (args.only is None or b.name in args.only)
                                              and b.name not in args.skip]
    records: dict[str, dict] = {}
    for bench in selected:
        print(f"[all] {bench.name}: running ...", file=sys.stderr, flush=True)
        record = records[bench.name] = run_bench(bench, out_root, args.logs, args.quick, extra.get(bench.name, []),
                                                 args.timeout)
        print(f"[all] {bench.name}: {record['status']} in {record['seconds'] / 60:.1f} min"
              + (f" ({record['reason']})" if record.get("reason") else ""), file=sys.stderr, flush=True)
    document = record_and_assemble(out_root, doc, records, argv)
    print(f"[all] wrote {shown(doc)}", file=sys.stderr)
    print(harness.to_json(records) if args.json else document)
    return 1 if any(r["status"] not in OK_STATUSES for r in records.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
