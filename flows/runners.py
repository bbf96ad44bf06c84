"""Task runners for the parallel stages (distillation, greedy candidates), chosen by `RunnerParams`.

| kind | what runs the tasks | notes |
|---|---|---|
| `threads` (default) | `ThreadPoolTaskRunner(max_workers=workers)` in the flow's process | models loaded once and shared; tasks use one torch thread each |
| `processes` | `ProcessPoolTaskRunner(max_workers=workers)` (spawned processes) | each process loads the teacher once |
| `dask` | `DaskTaskRunner` on `dask_address`, else a `LocalCluster(host="127.0.0.1", n_workers=workers, threads_per_worker=1, processes=True, dashboard off)` | ~10 s to start; for coarse tasks |

Embedded Prefect (no `PREFECT_API_URL`) and worker processes: every process that finds no API URL starts its
own temporary server, so its task runs would land in a throwaway database. Our decision: `shared_api()`
starts one temporary server for the whole run and exports its URL to child processes; `dtr convert` and
`run_convert` use it. Against a real server (`dtr ui up`, deployments) nothing is needed.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from tasks.params import RunnerParams

logger = logging.getLogger(__name__)


def make_task_runner(runner: RunnerParams, dask_address: str | None = None):
    """The Prefect task runner for `runner`; `dask_address` overrides `runner.dask_address`."""
    if runner.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner.workers)
    if runner.kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=runner.workers)
    from prefect_dask import DaskTaskRunner

    address = dask_address or runner.dask_address
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(runner.workers))


def local_cluster_kwargs(workers: int) -> dict:
    """Every listener on loopback, no dashboard, one thread per worker process.

    A Dask scheduler always opens an HTTP server (health, metrics), and `dashboard_address=None` puts it on
    the dashboard's port 8787; here it gets a free loopback port and no dashboard pages (tested by connecting)."""
    return {"host": "127.0.0.1", "n_workers": workers, "threads_per_worker": 1, "processes": True,
            "dashboard_address": "127.0.0.1:0", "scheduler_kwargs": {"dashboard": False}}


@contextlib.contextmanager
def dask_cluster(runner: RunnerParams) -> Iterator[str | None]:
    """For `kind == "dask"` without an address: one LocalCluster for the whole flow run (its address is
    given to every stage); else yields the configured address (or None)."""
    if runner.kind != "dask" or runner.dask_address:
        yield runner.dask_address
        return
    from distributed import LocalCluster

    with LocalCluster(**local_cluster_kwargs(runner.workers)) as cluster:
        logger.info("started a local Dask cluster at %s (%d workers)", cluster.scheduler_address, runner.workers)
        yield cluster.scheduler_address


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


@contextlib.contextmanager
def shared_api(kind: str) -> Iterator[str | None]:
    """Make worker processes report to the same Prefect API as the flow (see the module docstring)."""
    if kind == "threads" or api_url():
        yield api_url()
        return
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = SubprocessASGIServer()
    server.start()
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by pool processes and Dask workers
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield server.api_url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


def parallel_threads(runner: RunnerParams) -> int:
    """Torch threads for a task that runs next to others: 1 when tasks run in parallel."""
    from tasks.runtime import serial_threads

    return 1 if runner.workers > 1 else serial_threads()
