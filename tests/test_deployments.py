"""deployments/prefect.yaml loads (every entrypoint is an importable flow that accepts its parameters), the
Prefect UI form is typed, and `dtr ui` stops exactly what it started."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())


def _load(entrypoint: str):
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(entrypoint)  # a module path: loads from any working folder


@pytest.mark.parametrize("deployment", SPEC["deployments"], ids=lambda d: d["name"])
def test_entrypoint_loads_and_accepts_its_parameters(deployment):
    from prefect import Flow

    module, function = deployment["entrypoint"].rsplit(".", 1)
    assert module.startswith("flows.") and (ROOT / f"{module.replace('.', '/')}.py").is_file()
    flow = _load(deployment["entrypoint"])
    assert isinstance(flow, Flow) and flow.fn.__name__ == function
    validated = flow.validate_parameters(deployment.get("parameters", {}))
    assert set(deployment.get("parameters", {})) <= set(validated)
    assert deployment["work_pool"]["name"] == "dtr-process"


def test_flow_runs_work_in_the_folder_dtr_ui_up_was_started_in(tmp_path):
    """The pull step moves a flow run into DTR_WORK_DIR; the entrypoints load from there (not the repository)."""
    assert SPEC["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $DTR_WORK_DIR }}"}}]
    script = ("from prefect.flows import load_flow_from_entrypoint as load; "
              f"print(*[load(e).name for e in {[d['entrypoint'] for d in SPEC['deployments']]!r}])")
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.stdout.split() == [d["entrypoint"].rsplit(".", 1)[1] for d in SPEC["deployments"]], out.stderr[-2000:]


def test_convert_deployment_has_an_inactive_nightly_schedule_and_runs_what_the_cli_runs():
    from tasks.params import ConvertParams, build_params

    convert = next(d for d in SPEC["deployments"] if d["name"] == "convert")
    assert convert["schedules"] and all(s["active"] is False and s["slug"] for s in convert["schedules"])
    assert convert["schedules"][0]["cron"] == "0 2 * * *"
    flow = _load(convert["entrypoint"])
    validated = flow.validate_parameters(convert["parameters"])  # the deployment's parameters on the defaults
    assert ConvertParams(**validated) == build_params("default"), "the convert deployment drifted from dtr convert"


@pytest.mark.parametrize("deployment", SPEC["deployments"], ids=lambda d: d["name"])
def test_deployments_list_only_what_differs_from_the_defaults(deployment):
    flow = _load(deployment["entrypoint"])
    defaults = flow.validate_parameters({})
    explicit = flow.validate_parameters(deployment.get("parameters", {}))
    same = [name for name in deployment.get("parameters", {}) if explicit[name] == defaults.get(name)]
    assert same == [], f"{deployment['name']}: {same} repeat the flow's defaults; leave them out"


def test_the_default_profile_is_the_parameter_models_defaults():
    from tasks.params import PROFILES, ConvertParams, build_params

    assert PROFILES["default"] == {}
    assert build_params("default") == ConvertParams()
    defaults = ConvertParams()
    assert (defaults.distill.steps, defaults.distill.lr, defaults.distill.tokens, defaults.distill.seq_len) == (
        None, 3e-3, 40 * 4 * 256, 256)
    assert defaults.distill.distill_config(seed=0).steps == 40
    assert (defaults.task.validation_limit, defaults.task.test_limit, defaults.max_layers,
            defaults.speed.repeats) == (100, 300, 4, 3)


def test_smoke_profile_lists_only_what_differs():
    from tasks.params import PROFILES, ConvertParams

    defaults = ConvertParams().model_dump()

    def repeated(override, base, where=""):
        for key, value in override.items():
            if isinstance(value, dict):
                yield from repeated(value, base[key], f"{where}{key}.")
            elif base[key] == value:
                yield where + key

    assert list(repeated(PROFILES["smoke"], defaults)) == []


def test_distill_budget_and_benchmarks_share_the_core_distillation_defaults():
    from benchmarks.students import DISTILL, DISTILL_BATCH, distill_config
    from dtr_core.distill.config import DistillConfig
    from tasks.params import DistillBudget

    budget = DistillBudget()
    config = budget.distill_config(seed=0)
    assert (config.steps, budget.lr, budget.batch_size, budget.eval_sequences, budget.max_normalized_loss) == (
        DistillConfig.steps, DistillConfig.lr, DistillConfig.batch_size, DistillConfig.eval_sequences,
        DistillConfig.max_normalized_loss)
    assert (budget.checkpoint_every_steps, budget.checkpoint_every_minutes) == (
        DistillConfig.checkpoint_every_steps, DistillConfig.checkpoint_every_minutes)
    assert DISTILL == {"distill_tokens": budget.tokens, "distill_seq_len": budget.seq_len,
                       "distill_steps": config.steps} and DISTILL_BATCH == budget.batch_size
    assert distill_config(config.steps) == config == distill_config(None)


def test_no_secrets_or_absolute_paths_in_the_deployment_file():
    import re

    text = (ROOT / "deployments" / "prefect.yaml").read_text().lower()
    assert not re.search(r"\b(password|secret|api_key|access_key|auth|\w*_token)\s*:", text)
    for path in ("/home/", "/work/", "/users/", "/tmp/"):
        assert path not in text


def test_convert_parameters_render_as_a_typed_form():
    flow = _load("flows/convert.py:convert")
    schema = flow.parameters.model_dump()
    definitions = schema["definitions"]
    assert schema["properties"]["mixer"]["enum"] == ["gated_deltanet", "gla", "jetblock"]
    distill = definitions["DistillBudget"]["properties"]
    assert distill["tokens"]["description"] and distill["tokens"]["minimum"] == 1
    assert distill["steps"]["description"] and {"minimum": 1, "type": "integer"} in distill["steps"]["anyOf"]
    assert definitions["RunnerParams"]["properties"]["kind"]["enum"] == ["threads", "processes", "dask"]
    assert definitions["ToleranceParams"]["properties"]["mode"]["enum"] == ["relative", "absolute"]
    assert definitions["AcceptanceParams"]["properties"]["mode"]["enum"] == ["point", "bootstrap"]


def test_mixer_dropdown_matches_the_registry():
    from typing import get_args

    from dtr_core.mixers import MIXERS
    from tasks.params import MixerName

    assert list(get_args(MixerName)) == sorted(MIXERS)


# --- dtr ui: process bookkeeping -----------------------------------------------------------------------------

def _sleeper(state_dir: Path, name: str):
    from dtr.commands import ui

    return ui._spawn(name, [sys.executable, "-c", "import time; time.sleep(120)"], dict(os.environ), state_dir, ROOT)


def test_down_stops_exactly_the_recorded_processes(tmp_path):
    from dtr.commands import ui

    ours = _sleeper(tmp_path, "worker")
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        ui.write_state(tmp_path, {"urls": {"prefect": "", "mlflow": "", "prefect_api": ""},
                                  "processes": {"worker": ours}})
        assert ui.status(tmp_path)["worker"]["running"]
        assert ui.down(tmp_path) == {"worker": "stopped"}
        assert not ui.is_running(ours)
        assert bystander.poll() is None, "a process dtr ui did not start was signalled"
        assert not (tmp_path / "ui.json").exists()
        assert ui.down(tmp_path) == {}
    finally:
        bystander.kill()
        bystander.wait()


def test_a_reused_pid_is_never_signalled(tmp_path):
    from dtr.commands import ui

    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = {"name": "worker", "pid": bystander.pid, "pgid": bystander.pid, "start_time": 1, "command": [],
                 "log": ""}
        ui.write_state(tmp_path, {"urls": {}, "processes": {"worker": stale}})
        assert ui.down(tmp_path) == {"worker": "not running"}
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_up_status_down_with_real_servers(tmp_path, monkeypatch):
    """Prefect server + MLflow server + work pool + deployments + worker, all on loopback (~1 min), started
    from a folder outside the repository: the worker (and so every flow run) works there."""
    from dtr.commands import ui

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    state = ui.up(tmp_path, _free_port(), _free_port())
    try:
        assert state["work_dir"] == str(work.resolve())
        assert os.readlink(f"/proc/{state['processes']['worker']['pid']}/cwd") == str(work.resolve())
        assert (work / "mlflow.db").is_file()  # the server's store: where `dtr convert` here writes
        with urllib.request.urlopen(f"{state['urls']['prefect']}/ui-settings", timeout=30) as response:
            assert json.loads(response.read())["api_url"] == state["urls"]["prefect_api"]  # not the default port
        report = ui.status(tmp_path)
        assert set(report) == {"prefect-server", "mlflow-server", "worker"}
        assert all(info["healthy"] for info in report.values()), report
        env = {**os.environ, "PREFECT_API_URL": state["urls"]["prefect_api"],
               "PREFECT_HOME": str(tmp_path / "prefect")}
        out = subprocess.run([str(Path(sys.executable).parent / "prefect"), "deployment", "ls"], env=env,
                             capture_output=True, text=True, timeout=120)
        for name in ("convert", "distill", "replace", "evaluate", "benchmark", "benchmarks"):
            assert f"/{name}" in out.stdout, out.stdout + out.stderr
    finally:
        outcome = ui.down(tmp_path)
    assert set(outcome.values()) <= {"stopped", "killed"}
    time.sleep(0.5)
    assert not any(ui.is_running(entry) for entry in state["processes"].values())
    assert json.dumps(outcome)


def test_ui_mlflow_server_serves_the_store_convert_writes_to(tmp_path, monkeypatch):
    from dtr.commands.ui import mlflow_store_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert mlflow_store_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///other.db")
    assert mlflow_store_uri() == f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # a server is not a store to serve
    assert mlflow_store_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
