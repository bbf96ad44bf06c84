"""Task: log M_best and M_opt as MLflow pyfunc models on the parent run and register them.

Registered as `dtr-<model>-<task>` (one version per distinct model: when M_opt is M_best, one version carries
both aliases), with aliases `best` and `opt` pointing at them
(`latest` and `v<digits>` are reserved by MLflow). This is the flow's last step: only a run that got here
registers anything. Both models are logged before either is registered; if registering fails half way,
the versions already created (and the registered model, if this run created it) are deleted again.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.tracking import Tracking, retry

logger = logging.getLogger(__name__)

ROLES = ("best", "opt")
RESERVED_ALIASES = ("latest",)
PIP_REQUIREMENTS = ["torch==2.13.0", "transformers==5.24.0", "tokenizers==0.23.3", "safetensors==0.8.0",
                    "pandas==3.1.1", "einops==0.8.2"]


def _code_paths() -> list[str]:
    import dtr_core

    import tasks.pyfunc_model as pyfunc_module

    return [str(Path(dtr_core.__file__).parent), str(Path(pyfunc_module.__file__).parent)]


def input_example(task_card: dict[str, Any]):
    import pandas as pd

    text = "A gripping, beautifully shot film." if task_card["kind"] == "classification" else "The economy"
    return pd.DataFrame({"text": [text]})


@task(name="register-models", cache_policy=NO_CACHE)
def register_task(tracking: Tracking, model_name: str, hybrids: dict[str, str], card: dict[str, Any],
                  descriptions: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Log `hybrids` ({role: folder}) as pyfunc models and register them; returns {role: {version, uri}}."""
    import mlflow
    import mlflow.pyfunc

    from dtr_core.artifacts import write_json
    import tasks.pyfunc_model as pyfunc_module
    from tasks.pyfunc_model import signature_for

    for role in hybrids:
        if role in RESERVED_ALIASES or (role.startswith("v") and role[1:].isdigit()):
            raise ValueError(f"alias '{role}' is reserved by MLflow")
    mlflow.set_tracking_uri(tracking.uri)
    mlflow.set_registry_uri(tracking.uri)
    client = tracking.client()
    roles_of: dict[str, list[str]] = {}  # folder -> its roles: M_opt = M_best is logged and registered once
    for role, folder in hybrids.items():
        roles_of.setdefault(os.path.realpath(folder), []).append(role)
    logged: dict[str, tuple[str, str]] = {}  # folder -> (model uri, model id)
    with tempfile.TemporaryDirectory(prefix="dtr-card-") as tmp:
        card_path = os.path.join(tmp, "task.json")
        write_json(card_path, card)
        # The fluent API needs an active run; it is per thread, and this task's thread owns it until the end.
        with mlflow.start_run(run_id=tracking.parent_run_id):
            for folder, roles in roles_of.items():
                info = mlflow.pyfunc.log_model(
                    name="m_" + "_".join(roles),
                    python_model=pyfunc_module.__file__,  # a model from code: nothing pickled
                    artifacts={"hybrid": folder, "task": card_path},
                    code_paths=_code_paths(),
                    signature=signature_for(card["kind"]),
                    input_example=input_example(card),
                    pip_requirements=PIP_REQUIREMENTS,
                )
                logged[folder] = (info.model_uri, info.model_id)
    created: list[tuple[str, str]] = []
    new_model = not _exists(client, model_name)
    try:
        if new_model:
            retry(lambda: client.create_registered_model(model_name, description="dtr hybrids: best = highest "
                                                         "validation score, opt = most linear layers within tolerance"))
        results: dict[str, dict[str, Any]] = {}
        for folder, (uri, model_id) in logged.items():
            roles = roles_of[folder]
            version = retry(lambda uri=uri, model_id=model_id, roles=roles: client.create_model_version(
                model_name, uri, run_id=tracking.parent_run_id, description=descriptions.get(roles[0], ""),
                tags={"dtr.role": ",".join(roles)}, model_id=model_id))
            created.append((model_name, version.version))
            for role in roles:
                results[role] = {"version": version.version, "model_uri": uri,
                                 "registered_uri": f"models:/{model_name}@{role}"}
        for role, result in results.items():
            retry(lambda role=role, result=result: client.set_registered_model_alias(model_name, role,
                                                                                     result["version"]))
    except Exception:
        for name, version in created:
            try:
                client.delete_model_version(name, version)
            except Exception:  # noqa: BLE001 - best effort clean-up, the original error is raised
                logger.warning("could not delete model version %s v%s after a failed registration", name, version)
        if new_model:
            try:
                client.delete_registered_model(model_name)
            except Exception:  # noqa: BLE001
                logger.warning("could not delete registered model %s after a failed registration", model_name)
        raise
    return results


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False
