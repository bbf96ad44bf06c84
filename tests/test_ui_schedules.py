"""`dtr ui up` redeploys deployments/prefect.yaml without switching off (or replacing) a schedule the user
switched on: checked against a real Prefect API (the session's test server) with `prefect deploy`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _env(tmp_path: Path, api_url: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(tmp_path / "prefect"),
            "DTR_WORK_DIR": str(tmp_path)}


def _nightly(api_url: str) -> dict:
    from dtr.commands.ui import _api

    deployment = _api(api_url, "GET", "/deployments/name/convert/convert")
    (schedule,) = [s for s in deployment["schedules"] if s["slug"] == "nightly"]
    return {"deployment": deployment["id"], "id": schedule["id"], "active": schedule["active"]}


def test_redeploy_keeps_the_schedule_state_and_id(tmp_path):
    from prefect.settings import PREFECT_API_URL

    from dtr.commands.ui import POOL, _api, deploy_flows

    api_url = PREFECT_API_URL.value().rstrip("/")
    env = _env(tmp_path, api_url)
    subprocess.run([str(Path(sys.executable).parent / "prefect"), "work-pool", "create", POOL, "--type", "process",
                    "--overwrite"], env=env, check=True, capture_output=True, timeout=300)
    deploy_flows(api_url, env, ROOT, ["convert"])
    first = _nightly(api_url)
    assert first["active"] is False, "a new schedule starts as prefect.yaml says: off"

    # the user switches it on (the UI's toggle is this call); the next `dtr ui up` redeploys
    _api(api_url, "PATCH", f"/deployments/{first['deployment']}/schedules/{first['id']}", {"active": True})
    deploy_flows(api_url, env, ROOT, ["convert"])
    assert _nightly(api_url) == {**first, "active": True}

    # and off again: it stays off
    _api(api_url, "PATCH", f"/deployments/{first['deployment']}/schedules/{first['id']}", {"active": False})
    deploy_flows(api_url, env, ROOT, ["convert"])
    assert _nightly(api_url) == first
