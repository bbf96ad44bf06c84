"""The flow gives the same answer on every task runner: threads, a process pool, a 2-worker local Dask cluster."""

from __future__ import annotations

import pytest
from pipeline_support import tiny_params

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
    import socket

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


def test_dask_scheduler_killed_mid_run_fails_fast(tmp_path):
    """`--dask-address` of a scheduler that dies while layers are distilled: the run ends in well under 60 s."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "DTR_TORCH_THREADS": "1",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("PREFECT_API_URL", None)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        process = subprocess.Popen(list(args), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE if args[0].endswith("dtr") else subprocess.DEVNULL,
                                   text=True, start_new_session=True)
        started.append(process)
        return process

    try:
        scheduler = start(str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                          "--dashboard-address", "127.0.0.1:0")
        start(str(bin_dir / "dask"), "worker", f"tcp://127.0.0.1:{port}", "--nworkers", "1", "--nthreads", "1",
              "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0")
        from distributed import Client

        with Client(f"tcp://127.0.0.1:{port}", timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        cli = start(str(bin_dir / "dtr"), "convert", "--profile", "smoke", "--steps", "60", "--no-register",
                    "--output-dir", str(tmp_path / "runs"), "--runner", "dask",
                    "--dask-address", f"tcp://127.0.0.1:{port}")
        deadline = time.monotonic() + 300
        while not list((tmp_path / "runs").glob("*/students/layer_*/meta.json")):
            assert time.monotonic() < deadline and cli.poll() is None, "no layer was distilled on the cluster"
            time.sleep(0.2)
        os.killpg(scheduler.pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = cli.communicate(timeout=120)
        assert time.monotonic() - killed < 60
    finally:
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    assert cli.returncode != 0
    assert [line for line in err.splitlines() if line.startswith("error:")], err[-2000:]
