"""`dtr ui up | down | status`: a local Prefect server + process work pool + worker and an MLflow server.

    dtr ui up        # Prefect UI http://127.0.0.1:4200, MLflow UI http://127.0.0.1:5000, flows deployed
    dtr ui status    # what runs, healthy or not
    dtr ui down      # stops exactly the processes `up` started

Everything listens on 127.0.0.1 only. One place for everything: the folder `dtr ui up` is started in (the
work folder). Flow runs work there (`DTR_WORK_DIR`, see deployments/prefect.yaml), so their run folders
land in `./runs/` as `dtr convert` started there would put them. State lives in `.dtr/` of that folder:
`ui.json` (PID, process group and start time of each process), `logs/`, `prefect/` (PREFECT_HOME: the
server's database, kept apart from your own Prefect profile) and `mlartifacts/` (artifacts of runs logged
through the server).
The MLflow server serves the store `dtr convert` writes to by default, `sqlite:///mlflow.db` in the working
directory (or $MLFLOW_TRACKING_URI when that is a sqlite store), so earlier conversions show up in its UI.
Each process is started in its own session, so `down` can stop it with its children (the servers' uvicorn
processes) and nothing else; a recorded PID whose start time no longer matches is never signalled.
The worker is started with the default SIGINT handler restored: a `prefect worker` launched from a
non-interactive shell inherits an ignored SIGINT and would then ignore SIGTERM too (STACK_NOTES.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import typer

POOL = "dtr-process"
HOST = "127.0.0.1"
# The worker's log holds what flow runs print: no progress bars (tqdm, transformers, MLflow uploads) and no
# "View run ... at ..." line per MLflow run (dtr logs the parent run's link itself). Your environment wins.
QUIET_WORKER = {"TQDM_DISABLE": "1", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

ui_app = typer.Typer(help="Local Prefect + MLflow servers with the dtr flows deployed (127.0.0.1 only).",
                     no_args_is_help=True)


def mlflow_store_uri() -> str:
    """The store `dtr convert` uses without a server: $MLFLOW_TRACKING_URI if it is sqlite, else ./mlflow.db."""
    from tasks.tracking import DEFAULT_TRACKING_URI, resolve_tracking_uri

    configured = os.environ.get("MLFLOW_TRACKING_URI", "")
    return resolve_tracking_uri(configured if configured.startswith("sqlite:") else DEFAULT_TRACKING_URI)


def project_dir() -> Path:
    """The repository root: where `flows/` and `deployments/prefect.yaml` are."""
    import flows

    return Path(flows.__file__).resolve().parent.parent


def _executable(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"'{name}' is not installed in this environment")
    return found


def _start_time(pid: int) -> int | None:
    """The process start time in clock ticks since boot (/proc/<pid>/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def is_running(entry: dict[str, Any]) -> bool:
    """The recorded process is alive and is the one we started (same start time), not a zombie."""
    start = _start_time(entry["pid"])
    if start is None or start != entry["start_time"]:
        return False
    try:
        state = Path(f"/proc/{entry['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _wait_healthy(url: str, entry: dict[str, Any], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _healthy(url):
            return
        if not is_running(entry):
            raise RuntimeError(f"{entry['name']} exited during start-up; see {entry['log']}")
        time.sleep(0.5)
    raise RuntimeError(f"{entry['name']} did not become healthy at {url} within {seconds:.0f}s; see {entry['log']}")


def _restore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _spawn(name: str, command: list[str], env: dict[str, str], state_dir: Path, cwd: Path) -> dict[str, Any]:
    """Start `command` in a new session (its own process group), output to `state_dir/logs/<name>.log`."""
    log = state_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   cwd=cwd, start_new_session=True, preexec_fn=_restore_sigint)
    for _ in range(50):  # /proc entry appears at once; retry briefly on slow machines
        start = _start_time(process.pid)
        if start is not None:
            break
        time.sleep(0.02)
    return {"name": name, "pid": process.pid, "pgid": process.pid, "start_time": start, "command": command,
            "log": str(log)}


def stop_entry(entry: dict[str, Any], timeout: float = 20.0) -> str:
    """SIGTERM the process group we started, SIGKILL after `timeout`. Returns what happened."""
    if not is_running(entry):
        return "not running"
    try:
        os.killpg(entry["pgid"], signal.SIGTERM)
    except ProcessLookupError:
        return "not running"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(entry):
            _reap(entry["pid"])
            return "stopped"
        _reap(entry["pid"])
        time.sleep(0.2)
    try:
        os.killpg(entry["pgid"], signal.SIGKILL)
    except ProcessLookupError:
        pass
    _reap(entry["pid"])
    return "killed"


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our child (tests call up and down in one process)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def read_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / "ui.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_state(state_dir: Path, state: dict[str, Any]) -> None:
    from dtr_core.artifacts import write_json

    write_json(state_dir / "ui.json", state)


def _run(command: list[str], env: dict[str, str], cwd: Path, what: str) -> None:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed: {(result.stderr or result.stdout).strip()[-800:]}")


def _api(api_url: str, method: str, path: str, body: Any = None) -> Any:
    """One JSON call to the Prefect REST API."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{api_url}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = response.read()
    return json.loads(text) if text else None


def schedule_states(api_url: str) -> dict[tuple[str, str], dict[str, Any]]:
    """{(deployment id, schedule slug): {"id", "active"}} of every slugged schedule on the server."""
    states = {}
    for deployment in _api(api_url, "POST", "/deployments/filter", {}):
        for schedule in deployment.get("schedules") or []:
            if schedule.get("slug"):
                states[(deployment["id"], schedule["slug"])] = {"id": schedule["id"], "active": schedule["active"]}
    return states


def restore_schedule_states(api_url: str, before: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Switch every schedule that existed in `before` back to the state it had there; returns their slugs."""
    restored = []
    for (deployment_id, slug), now in schedule_states(api_url).items():
        earlier = before.get((deployment_id, slug))
        if earlier is not None and earlier["active"] != now["active"]:
            _api(api_url, "PATCH", f"/deployments/{deployment_id}/schedules/{now['id']}",
                 {"active": earlier["active"]})
            restored.append(slug)
    return restored


def deploy_flows(api_url: str, env: dict[str, str], root: Path, names: list[str] | None = None) -> None:
    """`prefect deploy` the deployments of deployments/prefect.yaml (all, or `names`), keeping the schedules
    as the user left them.

    `prefect deploy` writes each schedule's `active` from the yaml. Schedules carry a `slug`, so an existing
    one is updated in place (same id); its on/off state from before the deploy is then set back. A new
    schedule starts as the yaml says (off)."""
    before = schedule_states(api_url)
    selection = ["--all"] if names is None else [arg for name in names for arg in ("--name", name)]
    _run([_executable("prefect"), "--no-prompt", "deploy", *selection, "--prefect-file",
          "deployments/prefect.yaml"], {**env, "PREFECT_API_URL": api_url}, root, "deploying the flows")
    restore_schedule_states(api_url, before)


def up(state_dir: Path, prefect_port: int, mlflow_port: int, deploy: bool = True, worker: bool = True) -> dict[str, Any]:
    """Start everything; on any failure stop what was started and raise."""
    existing = read_state(state_dir)
    if existing is not None and any(is_running(e) for e in existing["processes"].values()):
        raise ValueError(f"dtr ui is already up (state in {state_dir / 'ui.json'}); run `dtr ui down` first")
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    root = project_dir()
    prefect_url, mlflow_url = f"http://{HOST}:{prefect_port}", f"http://{HOST}:{mlflow_port}"
    api_url = f"{prefect_url}/api"
    base_env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    prefect_env = {**base_env, "PREFECT_HOME": str(state_dir / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   "PREFECT_UI_API_URL": api_url}  # else the UI calls the default port, whatever --prefect-port says
    work_dir = Path.cwd().resolve()
    from dtr.cli import QUIET_LIBRARIES

    client_env = {**QUIET_LIBRARIES, **QUIET_WORKER, **prefect_env, "PREFECT_API_URL": api_url,
                  "MLFLOW_TRACKING_URI": mlflow_url, "DTR_WORK_DIR": str(work_dir)}
    state: dict[str, Any] = {"urls": {"prefect": prefect_url, "mlflow": mlflow_url, "prefect_api": api_url},
                             "project_dir": str(root), "work_dir": str(work_dir),
                             "started_at": time.strftime("%Y-%m-%d %H:%M:%S"), "processes": {}}
    try:
        server = _spawn("prefect-server", [_executable("prefect"), "server", "start", "--host", HOST, "--port",
                                           str(prefect_port), "--analytics-off"], prefect_env, state_dir, root)
        state["processes"]["prefect-server"] = server
        write_state(state_dir, state)
        mlflow = _spawn("mlflow-server", [_executable("mlflow"), "server", "--host", HOST, "--port", str(mlflow_port),
                                          "--workers", "1", "--backend-store-uri",
                                          mlflow_store_uri(), "--artifacts-destination",
                                          str(state_dir / "mlartifacts")],
                        {**base_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, state_dir, root)
        state["processes"]["mlflow-server"] = mlflow
        write_state(state_dir, state)
        _wait_healthy(f"{api_url}/health", server, 90)
        _wait_healthy(f"{mlflow_url}/health", mlflow, 90)
        prefect = _executable("prefect")
        _run([prefect, "work-pool", "create", POOL, "--type", "process", "--overwrite"], client_env, root,
             "creating the work pool")
        if deploy:
            deploy_flows(api_url, client_env, root)
        if worker:
            state["processes"]["worker"] = _spawn("worker", [prefect, "worker", "start", "--pool", POOL, "--type",
                                                             "process"], client_env, state_dir, work_dir)
            write_state(state_dir, state)
            time.sleep(1.0)
            if not is_running(state["processes"]["worker"]):
                raise RuntimeError(f"the worker exited at start; see {state['processes']['worker']['log']}")
    except BaseException:
        for entry in reversed(list(state["processes"].values())):
            stop_entry(entry)
        (state_dir / "ui.json").unlink(missing_ok=True)
        raise
    return state


def down(state_dir: Path) -> dict[str, str]:
    """Stop the processes recorded by `up` (worker first); returns {name: what happened}."""
    state = read_state(state_dir)
    if state is None:
        return {}
    order = ["worker", "mlflow-server", "prefect-server"]
    entries = sorted(state["processes"].values(), key=lambda e: order.index(e["name"]) if e["name"] in order else -1)
    outcome = {entry["name"]: stop_entry(entry) for entry in entries}
    (state_dir / "ui.json").unlink(missing_ok=True)
    return outcome


def status(state_dir: Path) -> dict[str, dict[str, Any]]:
    state = read_state(state_dir)
    if state is None:
        return {}
    health = {"prefect-server": state["urls"]["prefect_api"] + "/health", "mlflow-server": state["urls"]["mlflow"] + "/health"}
    report = {}
    for name, entry in state["processes"].items():
        running = is_running(entry)
        url = health.get(name)
        report[name] = {"pid": entry["pid"], "running": running,
                        "healthy": (running and _healthy(url)) if url else running, "log": entry["log"]}
    return report


STATE_DIR = typer.Option(Path(".dtr"), "--state-dir", help="Where ui.json, logs and the servers' stores live")


@ui_app.command("up")
def up_command(
    state_dir: Path = STATE_DIR,
    prefect_port: int = typer.Option(4200, "--prefect-port", help="Prefect server port (127.0.0.1)"),
    mlflow_port: int = typer.Option(5000, "--mlflow-port", help="MLflow server port (127.0.0.1)"),
    deploy: bool = typer.Option(True, "--deploy/--no-deploy", help="Deploy the flows of deployments/prefect.yaml"),
    worker: bool = typer.Option(True, "--worker/--no-worker", help="Start a process worker on the dtr-process pool"),
) -> None:
    """Start a local Prefect server, work pool and worker, and an MLflow server; deploy the flows."""
    typer.echo("starting Prefect and MLflow servers on 127.0.0.1 (about 20 s)...")
    state = up(state_dir, prefect_port, mlflow_port, deploy, worker)
    urls = state["urls"]
    typer.echo(f"Prefect UI:  {urls['prefect']}   (deployments: convert, distill, replace, evaluate, benchmark, "
               f"benchmarks; work pool {POOL})")
    typer.echo(f"MLflow UI:   {urls['mlflow']}")
    typer.echo(f"use them from a shell:  export PREFECT_API_URL={urls['prefect_api']} MLFLOW_TRACKING_URI={urls['mlflow']}")
    typer.echo("run a conversion:       prefect deployment run convert/convert   (or click Run in the Prefect UI)")
    typer.echo(f"run folders:            {Path(state['work_dir']) / 'runs'}   (flow runs work in {state['work_dir']})")
    typer.echo(f"stop:                   dtr ui down   (state in {state_dir / 'ui.json'})")


@ui_app.command("down")
def down_command(state_dir: Path = STATE_DIR) -> None:
    """Stop exactly the processes `dtr ui up` started."""
    outcome = down(state_dir)
    if not outcome:
        typer.echo(f"nothing to stop (no {state_dir / 'ui.json'})")
    for name, what in outcome.items():
        typer.echo(f"{name}: {what}")


@ui_app.command("status")
def status_command(state_dir: Path = STATE_DIR) -> None:
    """Report whether the processes of `dtr ui up` run and answer their health checks."""
    report = status(state_dir)
    if not report:
        typer.echo(f"dtr ui is down (no {state_dir / 'ui.json'})")
        raise typer.Exit(1)
    state = read_state(state_dir)
    for name, info in report.items():
        word = "healthy" if info["healthy"] else ("running" if info["running"] else "NOT RUNNING")
        typer.echo(f"{name:<15} pid {info['pid']:<8} {word:<12} log {info['log']}")
    typer.echo(f"Prefect UI: {state['urls']['prefect']}   MLflow UI: {state['urls']['mlflow']}")
    if not all(info["healthy"] for info in report.values()):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(ui_app, name="ui")
