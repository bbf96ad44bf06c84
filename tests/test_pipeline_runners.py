"""The flow gives the same answer on every task runner: threads, a process pool, a 2-worker local Dask cluster."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pipeline_support import cli_env, tiny_params, wait_for

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.usefixtures("prefect_harness", "fresh_runtime_cache")

KEYS = ("swap_order", "best_layers", "opt_layers", "best_score", "opt_score", "teacher_score", "stop_reason")


@pytest.fixture(scope="module")
def teacher_folder(tmp_path_factory) -> str:
    """tiny-llama saved as a folder: every worker process loads the very same weights and tokenizer."""
    from dtr_core.models import load_model

    folder = tmp_path_factory.mktemp("teacher") / "tiny-llama"
    model, tokenizer = load_model("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _run(tmp_path, teacher: str, runner: dict) -> dict:
    from dtr_core.artifacts import read_json
    from flows.convert import run_convert

    tmp_path.mkdir(parents=True, exist_ok=True)
    params = tiny_params(tmp_path, model=teacher, runner=runner, tracking={"register_models": False})
    summary = run_convert(params)
    trajectory = read_json(summary["run_dir"] + "/greedy/trajectory.json")
    layers = {p["layer"]: p["normalized_loss"] for p in
              (read_json(m) for m in sorted((tmp_path / "runs").glob("*/students/*/meta.json")))}
    return {**{key: trajectory[key] for key in KEYS}, "losses": layers,
            "rounds": [(r["chosen"], r["score"], r["accepted"]) for r in trajectory["rounds"]]}


@pytest.mark.slow
def test_dask_local_cluster_matches_threads(tmp_path, teacher_folder):
    threads = _run(tmp_path / "threads", teacher_folder, {"kind": "threads", "workers": 2})
    dask = _run(tmp_path / "dask", teacher_folder, {"kind": "dask", "workers": 2})
    assert dask == threads


@pytest.mark.slow
def test_process_pool_matches_threads(tmp_path, teacher_folder):
    threads = _run(tmp_path / "threads", teacher_folder, {"kind": "threads", "workers": 2})
    processes = _run(tmp_path / "processes", teacher_folder, {"kind": "processes", "workers": 2})
    assert processes == threads


def _answers(port: int) -> bool:

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_dask_dashboard_is_off_on_both_cluster_paths():
    """No listener on the dashboard port 8787: neither the flow's LocalCluster nor DaskTaskRunner's own."""
    from distributed import Client

    from tasks.params import RunnerParams
    from flows.runners import dask_cluster, make_task_runner

    if _answers(8787):
        pytest.skip("something else listens on 127.0.0.1:8787")
    runner = RunnerParams(kind="dask", workers=1)
    with dask_cluster(runner) as address:
        with Client(address) as client:
            assert client.submit(sum, [1, 2]).result(timeout=60) == 3  # the cluster is up and working
            http = client.scheduler_info()["services"].get("dashboard")
        assert not _answers(8787)
        assert http is None or http != 8787
    with make_task_runner(runner) as task_runner:
        assert task_runner.client.submit(sum, [3, 4]).result(timeout=60) == 7  # starts its LocalCluster
        assert task_runner._cluster.scheduler_address.startswith("tcp://127.0.0.1:")
        assert not _answers(8787)


@contextlib.contextmanager
def _external_cluster(tmp_path: Path, worker_homes: list[Path]) -> Iterator[tuple[str, Callable, list]]:
    """A Dask scheduler and one single-threaded worker per folder of `worker_homes`, as separate processes.

    Each worker runs in its own folder, with its own HOME, cache and scratch folders: a machine of its own as
    far as dtr can tell; only the run folder (an absolute path on storage everyone reaches) is shared. Yields
    (address, start, processes): `start(*argv, cwd=..., **env)` runs another process, killed with the cluster;
    `processes[0]` is the scheduler."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started: list[subprocess.Popen] = []

    def start(*args: str, cwd: Path = tmp_path, **extra_env: str) -> subprocess.Popen:
        process = subprocess.Popen(list(args), cwd=cwd, env=cli_env(**extra_env), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE if args[0].endswith("dtr") else subprocess.DEVNULL,
                                   text=True, start_new_session=True)
        started.append(process)
        return process

    address = f"tcp://127.0.0.1:{port}"
    try:
        start(str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
              "--dashboard-address", "127.0.0.1:0")
        for home in worker_homes:
            home.mkdir(parents=True)
            start(str(BIN / "dask"), "worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1",
                  "--dashboard-address", "127.0.0.1:0", "--local-directory", str(home / "scratch"), cwd=home,
                  HOME=str(home), DTR_CACHE_DIR=str(home / ".cache" / "dtr"))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(len(worker_homes), timeout=120)
        yield address, start, started
    finally:
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.mark.slow
def test_dask_workers_in_their_own_folders_write_only_the_shared_run_folder(tmp_path):
    """Workers that share nothing with the flow but the run folder distil every layer and search into it; the
    answer equals the in-process thread runner's, and nothing lands in a worker's working folder."""
    from dtr_core.artifacts import read_json

    shared = tmp_path / "shared"  # the shared mount: the run folder lives here
    workers = [tmp_path / "worker_a", tmp_path / "worker_b"]
    flow_dir = tmp_path / "flow"
    flow_dir.mkdir()
    shared.mkdir()
    with _external_cluster(tmp_path, workers) as (address, start, _):
        cli = start(str(BIN / "dtr"), "convert", "--profile", "smoke", "--no-register", "--output-dir",
                    str(shared / "runs"), "--runner", "dask", "--dask-address", address, cwd=flow_dir,
                    MLFLOW_TRACKING_URI=f"sqlite:///{shared / 'mlflow.db'}")
        _, err = cli.communicate(timeout=600)
    assert cli.returncode == 0, err[-3000:]
    (run_dir,) = (shared / "runs").iterdir()
    for home in workers:  # a worker's folder (its HOME) holds only Dask's scratch space, caches and Prefect's home
        assert {p.name for p in home.iterdir()} <= {"scratch", ".cache", ".prefect"}, sorted(home.iterdir())
    threads = subprocess.run([str(BIN / "dtr"), "convert", "--profile", "smoke", "--no-register", "--output-dir",
                              str(tmp_path / "threads"), "--runner", "threads"], cwd=flow_dir, text=True,
                             capture_output=True, env=cli_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 't.db'}"),
                             timeout=600)
    assert threads.returncode == 0, threads.stderr[-3000:]
    (threads_dir,) = (tmp_path / "threads").iterdir()
    for name in ("greedy/trajectory.json", *(str(p.relative_to(threads_dir)) for p in
                                             sorted(threads_dir.glob("students/layer_*/meta.json")))):
        ours, reference = read_json(run_dir / name), read_json(threads_dir / name)
        same = lambda record: {k: v for k, v in record.items() if "second" not in k and k != "weights_sha256"}
        assert same(ours) == same(reference), name  # timings and float rounding across processes aside


def test_dask_scheduler_killed_mid_run_fails_fast(tmp_path):
    """`--dask-address` of a scheduler that dies while layers are distilled: the run ends in well under 60 s."""
    with _external_cluster(tmp_path, [tmp_path / "worker"]) as (address, start, processes):
        cli = start(str(BIN / "dtr"), "convert", "--profile", "smoke", "--steps", "60", "--no-register",
                    "--output-dir", str(tmp_path / "runs"), "--runner", "dask", "--dask-address", address,
                    MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert wait_for(lambda: bool(list((tmp_path / "runs").glob("*/students/layer_*/meta.json"))), 300, cli), \
            "no layer was distilled on the cluster"
        os.killpg(processes[0].pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = cli.communicate(timeout=120)
        assert time.monotonic() - killed < 60
    assert cli.returncode != 0
    assert [line for line in err.splitlines() if line.startswith("error:")], err[-2000:]
