"""The UIs in a real browser, as a user meets them (several minutes): `dtr ui up` from a work folder, the
convert deployment's form with its field descriptions, a smoke conversion triggered through the Prefect API
and run by the worker, the flow run's task list, and the MLflow registry page with its aliases.

Runs where a system chromium and playwright are installed (`apt-get install chromium`,
`pip install -e '.[browser]'`); skipped with the reason elsewhere. Everything it starts is stopped again
(`dtr ui down`), and everything it writes lies in pytest's temporary folder.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.request

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    import playwright.sync_api  # noqa: F401
    PLAYWRIGHT = True
except ImportError:
    PLAYWRIGHT = False

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no system chromium: apt-get install chromium"),
    pytest.mark.skipif(not PLAYWRIGHT, reason="playwright is not installed: pip install -e '.[browser]'"),
]

PAGE_WAIT_MS = 120_000  # the Prefect UI's bundle on a busy 2-core machine
RUN_WAIT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, method: str = "GET", body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read() or b"null")


def _smoke_parameters() -> dict:
    from tasks.params import build_params

    params = build_params("smoke", task={"validation_limit": 16, "test_limit": 16},
                          distill={"tokens": 512, "seq_len": 32, "steps": 48},
                          speed={"context_len": 64, "decode_tokens": 4})
    return params.model_dump(mode="json", exclude={"runner", "output_dir", "run_id"})


@pytest.fixture(scope="module")
def ui_up(tmp_path_factory):
    import os

    from dtr.commands import ui

    work = tmp_path_factory.mktemp("work")
    cwd = os.getcwd()
    os.chdir(work)
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        state = ui.up(work / ".dtr", _free_port(), _free_port())
    finally:
        os.chdir(cwd)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    try:
        yield state, work
    finally:
        ui.down(work / ".dtr")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def test_form_run_task_list_and_registry_in_the_browser(ui_up, browser):
    from dtr.commands.ui import _api as prefect_api
    from tasks.params import ConvertParams

    state, work = ui_up
    urls = state["urls"]
    deployment = prefect_api(urls["prefect_api"], "GET", "/deployments/name/convert/convert")
    page = browser.new_page()

    # 1. the form: every top-level field's description is on the page, brackets and all
    page.goto(f"{urls['prefect']}/deployments/deployment/{deployment['id']}/run", timeout=PAGE_WAIT_MS)
    for name in ("model", "seed", "output_dir", "run_id"):
        text = " ".join(ConvertParams.model_fields[name].description.split())
        page.get_by_text(text[:60], exact=False).first.wait_for(timeout=PAGE_WAIT_MS)

    # 2. a smoke conversion through the API, run by the worker in the work folder
    run = prefect_api(urls["prefect_api"], "POST", f"/deployments/{deployment['id']}/create_flow_run",
                      {"parameters": _smoke_parameters()})
    deadline = time.monotonic() + RUN_WAIT_S
    while time.monotonic() < deadline:
        flow_run = prefect_api(urls["prefect_api"], "GET", f"/flow_runs/{run['id']}")
        if flow_run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(5)
    assert flow_run["state"]["type"] == "COMPLETED", (flow_run["state"],
                                                      (work / ".dtr/logs/worker.log").read_text()[-3000:])
    assert flow_run["name"] == "convert-tiny-llama-sentiment"
    summaries = list((work / "runs").glob("*/summary.json"))
    assert len(summaries) == 1, "the run folder lands in the work folder's runs/"
    worker_log = (work / ".dtr" / "logs" / "worker.log").read_text()
    assert "View run" not in worker_log and "it/s]" not in worker_log, "the worker log stays quiet"

    # 3. the flow run's Task Runs tab lists its tasks (not "No task runs")
    page.goto(f"{urls['prefect']}/runs/flow-run/{run['id']}?tab=Task%20Runs", timeout=PAGE_WAIT_MS)
    page.get_by_text("publish-summary", exact=False).first.wait_for(timeout=PAGE_WAIT_MS)
    page.get_by_text("register-models", exact=False).first.wait_for(timeout=PAGE_WAIT_MS)
    assert page.get_by_text("No task runs").count() == 0

    # 4. the MLflow registry page: the model with its aliases
    summary = json.loads(summaries[0].read_text())
    name = summary["registered"]["best"]["registered_uri"].split("/")[1].split("@")[0]
    page.goto(f"{urls['mlflow']}/#/models/{name}", timeout=PAGE_WAIT_MS)
    page.get_by_text(name, exact=False).first.wait_for(timeout=PAGE_WAIT_MS)
    for alias in ("best", "opt"):
        page.get_by_text(f"@ {alias}", exact=False).or_(page.get_by_text(f"@{alias}", exact=False)).first.wait_for(
            timeout=PAGE_WAIT_MS)
    page.close()
