"""Flow `benchmarks`: run dtr's benchmarks (as `dtr bench all` does) and log their reports to MLflow.

Each benchmark is one Prefect task running `python -m benchmarks.<module>` in its own process, one after
another (timings must not share the machine). Its markdown, JSON and plots land in `out_root/<name>/` and
`doc` is re-assembled from every benchmark's latest output; by default a full run publishes into docs/bench/
and docs/BENCHMARKS.md, and a quick run writes into runs/bench-quick/ (`benchmarks.all.default_paths`).
One MLflow run in the experiment `dtr-benchmarks` then gets each benchmark's folder as artifacts
(`<name>/`), its wall time as a metric and its status as a tag; it ends FAILED when any benchmark failed.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.params import TrackingParams
from tasks.checks import check_tracking_uri
from tasks.tracking import Tracking, resolve_tracking_uri

BenchName = Literal["mixers", "search", "distill", "students", "placements", "inference", "recall", "healing",
                    "reliability"]  # = harness.REGISTRY (tested)
EXPERIMENT = "dtr-benchmarks"


@task(name="run-benchmark", cache_policy=NO_CACHE)
def run_benchmark_task(name: str, out_root: str, logs: str, quick: bool, extra: list[str]) -> dict[str, Any]:
    """One benchmark in its own process; its status record (see `benchmarks.all.run_bench`)."""
    from benchmarks import all as suite

    return suite.run_bench(suite.BY_NAME[name], Path(out_root), Path(logs), quick, extra, None)


@flow(name="benchmarks", task_runner=ThreadPoolTaskRunner(max_workers=1),
      description="Run dtr's benchmarks, regenerate docs/BENCHMARKS.md and log the reports to MLflow")
def benchmarks(
    names: list[BenchName] = ["mixers"],  # noqa: B006 - Prefect needs a literal default for the UI form
    quick: bool = True,
    extra: dict[str, str] = {},  # noqa: B006
    out_root: str | None = None,
    doc: str | None = None,
    logs: str = "runs/bench/logs",
    tracking: TrackingParams = TrackingParams(experiment=EXPERIMENT),
) -> dict[str, dict[str, Any]]:
    """{name: status record}. `extra`: arguments per benchmark, e.g. {"placements": "--tasks sentiment"}.
    `out_root` / `doc`: None for docs/bench and docs/BENCHMARKS.md (full run) or runs/bench-quick/ (quick)."""
    from benchmarks import all as suite

    logger = get_run_logger()
    unknown = sorted(set(extra) - set(names))
    if unknown:
        raise ValueError(f"extra arguments for benchmarks that are not run: {unknown}; run them or drop them")
    uri = resolve_tracking_uri(tracking.tracking_uri)
    check_tracking_uri(uri)
    root, document = suite.default_paths(quick, out_root, doc)
    records: dict[str, dict[str, Any]] = {}
    for name in names:
        logger.info("benchmark %s: running%s", name, " (quick)" if quick else "")
        records[name] = run_benchmark_task(name, str(root), logs, quick, shlex.split(extra.get(name, "")))
        logger.info("benchmark %s: %s in %.1f min", name, records[name]["status"], records[name]["seconds"] / 60)
    argv = (["--quick"] if quick else []) + ["--only", ",".join(names)]
    argv += [arg for name, args in extra.items() for arg in ("--extra", f"{name}={args}")]
    suite.record_and_assemble(root, document, records, argv)

    run = Tracking.start_parent(uri, tracking.experiment, f"benchmarks-{time.strftime('%Y%m%d-%H%M%S')}",
                                {"names": names, "quick": quick, "extra": extra},
                                tags={"dtr.kind": "benchmarks"})
    for name, record in records.items():
        folder = root / name
        if folder.is_dir():
            run.log_artifact(folder, name)
        run.log_metrics({f"{name}_minutes": record["seconds"] / 60})
        run.set_tags({f"dtr.bench.{name}": record["status"]})
    run.log_artifact(document)
    failed = [name for name, record in records.items() if record["status"] not in suite.OK_STATUSES]
    run.finish("FAILED" if failed else "FINISHED")
    if failed:
        raise RuntimeError(f"benchmarks failed: {failed}; see their logs in {logs}")
    return records
