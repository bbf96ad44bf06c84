"""Concurrency and MLflow consistency under faults, with real processes: one process per run folder, one
creator of a new sqlite store, a killed run's MLflow state repaired on resume, no duplicate registration,
no credential in any param or tag, and a bounded failure when the tracking server dies mid-run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pipeline_support import cli_env, mlflow_client, tiny_params, wait_for

DTR = Path(sys.executable).parent / "dtr"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HOLD_LOCK = """
    import sys, time
    from dtr_core.run_lock import run_folder_lock
    with run_folder_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(600)
"""


def test_run_folder_lock_refuses_a_second_process_and_survives_sigkill(tmp_path):
    from dtr_core.run_lock import RunInUse, run_folder_lock

    folder = tmp_path / "runs" / "tiny-run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD_LOCK), str(folder)], env=cli_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, "-c", textwrap.dedent(HOLD_LOCK), str(folder)], env=cli_env(),
                                capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and "locked" not in second.stdout
        assert f"run tiny-run is in use by another dtr process (pid {holder.pid}, started " in second.stderr
        assert "wait for it to finish, or pass another --run-id" in second.stderr
        with pytest.raises(RunInUse, match=f"pid {holder.pid}"), run_folder_lock(folder):
            pass
        assert issubclass(RunInUse, ValueError)  # the CLI prints it as one `error:` line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the killed holder's lock: the next run takes the folder at once
    started = time.monotonic()
    with run_folder_lock(folder):
        assert (folder / ".lock.json").is_file()
    assert time.monotonic() - started < 5
    assert not (folder / ".lock.json").exists()


@pytest.mark.usefixtures("prefect_harness", "fresh_runtime_cache")
def test_convert_refuses_a_run_folder_in_use_before_any_mlflow_run(tmp_path):
    from dtr_core.run_lock import RunInUse
    from flows.convert import run_convert

    params = tiny_params(tmp_path, tracking={"register_models": False})
    folder = tmp_path / "runs" / params.resolved_run_id()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD_LOCK), str(folder)], env=cli_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        with pytest.raises(RunInUse, match=f"run {params.resolved_run_id()} is in use .*pid {holder.pid}"):
            run_convert(params)
        assert time.monotonic() - started < 30
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert sorted(p.name for p in folder.iterdir()) == [".lock", ".lock.json"]  # nothing written by the refused run
    assert not (tmp_path / "mlflow.db").exists()


CREATE_PARENT = """
    import sys, time
    from tasks.tracking import Tracking
    while time.time() < float(sys.argv[2]):  # start together
        time.sleep(0.005)
    tracking = Tracking.start_parent(sys.argv[1], "race", sys.argv[3], {"model": "tiny-llama"})
    tracking.finish("FINISHED")
    print(tracking.parent_run_id, flush=True)
"""


def test_new_sqlite_store_is_created_once_by_concurrent_processes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start_at = time.time() + 8  # after every interpreter has imported mlflow
    processes = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(CREATE_PARENT), uri, str(start_at),
                                   f"run-{i}"], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(3)]
    outputs = [process.communicate(timeout=240) for process in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-3000:]
    fourth = subprocess.run([sys.executable, "-c", textwrap.dedent(CREATE_PARENT), uri, "0", "run-3"], cwd=tmp_path,
                            env=cli_env(), capture_output=True, text=True, timeout=240)
    assert fourth.returncode == 0, fourth.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["run-0", "run-1", "run-2", "run-3"]
    assert all(run.info.status == "FINISHED" for run in runs)


def test_no_credentials_in_params_tags_or_summary_fields(tmp_path):
    from flows.convert import public_params
    from tasks.params import build_params
    from mlflow.tracking import MlflowClient

    from tasks.tracking import Tracking

    secret_uri = "http://alice:hunter2pw@127.0.0.1:5999"
    params = build_params("smoke", runner={"kind": "dask", "dask_address": "tls://bob:s3cretpw@127.0.0.1:8786"},
                          tracking={"tracking_uri": secret_uri})
    values = public_params(params)
    assert "hunter2pw" not in repr(values) and "s3cretpw" not in repr(values)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # the raw parameters too: flattening for MLflow masks every value, whatever the caller passes
    tracking = Tracking.start_parent(uri, "secrets", "run", params.model_dump(mode="json"),
                                     tags={"dtr.run_dir": "/data/https://carol:tokenpw@host/run"}, run_dir=tmp_path)
    tracking.child_run("child", {"address": "tcp://dave:pw4dave@127.0.0.1:1"}, {}, tags={"where": secret_uri})
    client = MlflowClient(tracking_uri=uri)
    logged = []
    for run in client.search_runs([tracking.experiment_id]):
        logged += [*run.data.params.values(), *run.data.tags.values()]
    assert any("***@127.0.0.1:5999" in value for value in logged)
    for secret in ("hunter2pw", "s3cretpw", "tokenpw", "pw4dave"):
        assert not any(secret in value for value in logged), secret
    assert "hunter2pw" not in Tracking(secret_uri, "1", "abc").run_url()
    assert "hunter2pw" not in (tmp_path / "mlflow_run.json").read_text()


@pytest.mark.parametrize("message", [
    "API request to http://h/api/2.0/mlflow/runs/log-batch failed with exception ('Connection broken: "
    "IncompleteRead(0 bytes read, 2 more expected)', IncompleteRead(0 bytes read, 2 more expected))",  # killed mid-reply
    "HTTPConnectionPool(host='127.0.0.1', port=1): Max retries exceeded with url: /api (Caused by NewConnectionError)",
    "(sqlite3.OperationalError) database or disk is full",
])
def test_a_store_that_dies_in_any_way_is_one_resume_line(message):
    from mlflow.exceptions import MlflowException

    from tasks.tracking import TrackingStoreError, retry

    def call():
        raise MlflowException(message)

    with pytest.raises(TrackingStoreError, match="run the same command again to resume"):
        retry(call, uri="http://127.0.0.1:5000")


def test_store_failure_is_one_line_and_marking_failed_is_bounded(tmp_path):
    """A dead server: MLflow's HTTP retries are bounded, the error is one line, `finish(wait=)` never raises."""
    from tasks.tracking import BOUNDED_HTTP, TrackingStoreError

    code = f"""
        import json, os, time
        from tasks.tracking import Tracking, TrackingStoreError
        tracking = Tracking("http://user:pw@127.0.0.1:{_free_port()}", "1", "abc")
        started = time.monotonic()
        try:
            tracking.log_metrics({{"x": 1.0}})
        except TrackingStoreError as error:
            print(type(error).__mro__[1].__name__, "|", error)
        print("logged in", round(time.monotonic() - started, 1))
        started = time.monotonic()
        print("finish", tracking.finish("FAILED", wait=2.0), round(time.monotonic() - started, 1))
        print(json.dumps({{k: os.environ[k] for k in {sorted(BOUNDED_HTTP)!r}}}, sort_keys=True))
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={
        k: v for k, v in cli_env().items() if not k.startswith("MLFLOW_HTTP_REQUEST")}, cwd=tmp_path,
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("ValueError | MLflow store http://***@127.0.0.1:") and "pw" not in lines[0]
    assert "run the same command again to resume" in lines[0]
    assert float(lines[1].split()[-1]) < 15  # MLflow's defaults: about 4 minutes
    assert lines[2].startswith("finish False") and float(lines[2].split()[-1]) < 4
    assert json.loads(lines[3]) == BOUNDED_HTTP  # set in every process that imports tasks.tracking
    assert issubclass(TrackingStoreError, ValueError)  # the CLI prints it as one `error:` line


def _registered_versions(client, name: str):
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


@pytest.mark.usefixtures("prefect_harness", "fresh_runtime_cache")
def test_rerun_of_a_finished_conversion_reattaches_and_registers_nothing_new(tmp_path):
    from flows.convert import run_convert
    from tasks.registry import HASH_TAG

    params = tiny_params(tmp_path)
    client = mlflow_client(params)
    first = run_convert(params)
    name = params.registered_name()
    versions = _registered_versions(client, name)
    experiment_id = first["mlflow"]["experiment_id"]
    models = client.search_logged_models(experiment_ids=[experiment_id])
    assert versions and all(HASH_TAG in v.tags for v in versions)

    second = run_convert(params)
    assert second["mlflow"]["run_id"] == first["mlflow"]["run_id"]  # the same parent run, reattached
    parent = client.get_run(first["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["dtr.resumed"] == "1"
    assert [(v.version, v.tags) for v in _registered_versions(client, name)] == [(v.version, v.tags) for v in versions]
    assert second["registered"] == first["registered"]
    assert len(client.search_logged_models(experiment_ids=[experiment_id])) == len(models)
    for role in ("best", "opt"):
        assert client.get_model_version_by_alias(name, role).version == first["registered"][role]["version"]
    # one child run per layer and per candidate: the re-run's replace the first attempt's
    children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = [run.info.run_name for run in children]
    assert len(names) == len(set(names)) and {"distill-l000", "distill-l003"} <= set(names)
    assert all(run.data.tags["dtr.reused"] == "True" for run in children)


def test_role_tags_follow_the_aliases(tmp_path):
    """A version that loses an alias loses that role in its `dtr.role` tag; none left: the tag is cleared."""
    from mlflow.tracking import MlflowClient

    from tasks.registry import _sync_role_tags
    from tasks.tracking import Tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = Tracking.start_parent(uri, "roles", "run", {})
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("dtr-roles")
    for tag in ("best,opt", "best"):
        client.create_model_version("dtr-roles", str(tmp_path / "weights"), tags={"dtr.role": tag})
    client.set_registered_model_alias("dtr-roles", "best", "2")
    client.set_registered_model_alias("dtr-roles", "opt", "1")
    _sync_role_tags(tracking, client, "dtr-roles")
    assert client.get_model_version("dtr-roles", "1").tags["dtr.role"] == "opt"
    assert client.get_model_version("dtr-roles", "2").tags["dtr.role"] == "best"
    client.set_registered_model_alias("dtr-roles", "opt", "2")
    _sync_role_tags(tracking, client, "dtr-roles")
    assert "dtr.role" not in client.get_model_version("dtr-roles", "1").tags
    assert client.get_model_version("dtr-roles", "2").tags["dtr.role"] == "best,opt"


def _smoke_args(tmp_path: Path, *extra: str) -> list[str]:
    return [str(DTR), "convert", "--profile", "smoke", "--output-dir", str(tmp_path / "runs"), *extra]


def test_killed_cli_run_is_reattached_and_its_orphans_repaired(tmp_path):
    """SIGKILL `dtr convert --profile smoke` mid-distillation; the re-run reattaches to the same MLflow run."""
    from mlflow.entities import LoggedModelStatus, ViewType
    from mlflow.tracking import MlflowClient

    from dtr_core.artifacts import read_json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = cli_env(MLFLOW_TRACKING_URI=uri)
    args = _smoke_args(tmp_path, "--no-register", "--steps", "30")
    process = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        assert wait_for(lambda: any((tmp_path / "runs").glob("*/students/layer_*/meta.json")), 300, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the CLI and everything it started
        process.wait()
    record = read_json(next((tmp_path / "runs").glob("*/mlflow_run.json")))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    parent = record["run_id"]
    assert client.get_run(parent).info.status == "RUNNING"  # what kill -9 leaves
    # and what a kill inside a child run or a model upload leaves
    orphan = client.create_run(record["experiment_id"], run_name="orphan",
                               tags={"mlflow.parentRunId": parent}).info.run_id
    pending = client.create_logged_model(record["experiment_id"], source_run_id=parent).model_id

    rerun = subprocess.run(args + ["--json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.tags["dtr.resumed"] == "1"
    assert client.get_run(orphan).info.status == "KILLED"
    assert client.get_logged_model(pending).status == LoggedModelStatus.FAILED
    runs = client.search_runs([record["experiment_id"]], run_view_type=ViewType.ALL)
    assert [r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags] == [parent]  # no second parent
    assert not [r for r in runs if r.info.status == "RUNNING"]


def _start_mlflow_server(tmp_path: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "server-artifacts")],
        cwd=tmp_path, env={**cli_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)

    def healthy() -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    assert wait_for(healthy, 90, server), "mlflow server did not start"
    return server


def test_tracking_server_killed_mid_run_fails_fast_with_one_line(tmp_path):
    port = _free_port()
    server = _start_mlflow_server(tmp_path, port)
    args = _smoke_args(tmp_path, "--no-register", "--steps", "30")
    process = subprocess.Popen(args, cwd=tmp_path, env=cli_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wait_for(lambda: any((tmp_path / "runs").glob("*/students/layer_*/meta.json")), 300, process)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        killed = time.monotonic()
        out, err = process.communicate(timeout=150)
        seconds = time.monotonic() - killed
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert process.returncode == 1, err[-3000:]  # a runtime failure: the input was fine
    assert seconds < 90
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: MLflow store http://127.0.0.1:{port} failed")
    assert "resume" in errors[0]
    assert len(err.splitlines()) < 300, f"{len(err.splitlines())} lines"
    assert list((tmp_path / "runs").glob("*/students/layer_*/meta.json"))  # the work done stays for resume


def test_experiments_open_in_the_model_training_view(tmp_path):
    """New experiments and untagged old ones get MLflow's model-training kind; a kind set by a user stays."""
    from mlflow.tracking import MlflowClient

    from tasks.tracking import EXPERIMENT_KIND_TAG, Tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("old")
    client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    for name in ("new", "old", "chosen"):
        Tracking.start_parent(uri, name, "run", {}).finish()
    kinds = {name: client.get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG) for name in ("new", "old", "chosen")}
    assert kinds == {"new": "custom_model_development", "old": "custom_model_development",
                     "chosen": "genai_development"}
