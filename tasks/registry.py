"""Task: log M_best and M_opt as MLflow pyfunc models on the parent run and register them.

Registered as `dtr-<model>-<task>` (one version per distinct model: when M_opt is M_best, one version carries
both aliases), with aliases `best` and `opt` (and `healed`, M_opt healed end to end, when healing ran) pointing at them
(`latest` and `v<digits>` are reserved by MLflow). This is the flow's last step: only a run that got here
registers anything. Both models are logged before either is registered; if registering fails half way,
the versions already created (and the registered model, if this run created it) are deleted again.

Each version carries `dtr.weights_sha256`, a hash of the hybrid's `model*.safetensors` files. A hybrid whose
hash already has a version under that name (a finished conversion run again, or the same weights from
another run) is not logged or registered again: the aliases move to the existing version. After the aliases
are set, every version's `dtr.role` tag lists exactly the aliases it holds (cleared when it holds none).

What a version is shows on the registry page: its description and `dtr.*` tags (`version_facts`) give the
linear layers, the validation and test scores, the test set they were measured on (`describe_test_set`: task,
split, limit and a hash of the task's definition) and the measured speed-ups.

Promotion (`promote`): `latest` (default) moves each alias to this conversion's version, so `@best` is the
newest conversion under that name; `if-better` moves it only when this version's test score beats the one
the alias holds on the same test set, and otherwise keeps the alias and says why (`promotion`): a lower or
equal score, or scores measured on different test sets, which do not compare.
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

ROLES = ("best", "opt", "healed")
HASH_TAG = "dtr.weights_sha256"
TEST_TAG, TEST_SET_TAG = "dtr.test", "dtr.test_set"
PROMOTE_CHOICES = ("latest", "if-better")
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


def describe_test_set(task_params) -> str:
    """What a test score was measured on: `<task> test[:<limit>] #<hash of the task's definition>` (a
    `TaskParams`; the validation limit does not change the test set)."""
    from dtr_core.artifacts import hash_json

    definition = task_params.model_dump(mode="json", exclude={"validation_limit", "test_limit"})
    return f"{task_params.label} test[:{task_params.test_limit or 'all'}] #{hash_json(definition)[:8]}"


def version_facts(row: dict[str, Any], teacher: dict[str, Any], summary: dict[str, Any],
                  test_set: str) -> tuple[dict[str, str], str]:
    """(tags, description) of the version of one summary row (`tasks.report.summary_rows`)."""
    layers = ",".join(map(str, row["linear_layers"]))
    tags = {"dtr.model": summary["model"], "dtr.task": summary["task"], "dtr.mixer": summary["mixer"],
            "dtr.run_id": summary["run_id"], "dtr.linear_layers": layers or "none",
            "dtr.num_linear": f"{row['num_linear']} of {summary['num_layers']}", "dtr.metric": summary["metric"],
            "dtr.validation": f"{row['validation']:.4f}", TEST_TAG: f"{row['test']:.4f}", TEST_SET_TAG: test_set,
            "dtr.decode_speedup": f"{row['decode_speedup']:.2f}",
            "dtr.prefill_speedup": f"{row['prefill_speedup']:.2f}", "dtr.kv_cache_mb": f"{row['cache_bytes'] / 2**20:.1f}",
            "dtr.speed_context": str(summary["speed"]["context_len"])}
    description = (
        f"{summary['model']} for {summary['task']}: {row['num_linear']} of {summary['num_layers']} layers linear "
        f"({summary['mixer']}: {layers or 'none'}). Test {summary['metric']} {row['test']:.4f} (teacher "
        f"{teacher['test']:.4f}) on {test_set}; validation {row['validation']:.4f}. At "
        f"{summary['speed']['context_len']} tokens: decode {row['decode_speedup']:.2f}x, prefill "
        f"{row['prefill_speedup']:.2f}x, KV cache {row['cache_bytes'] / 2**20:.1f} MB. Run {summary['run_id']}.")
    return tags, description


def promotion(promote: str, role: str, version: str, tags: dict[str, str], current: str | None,
              current_tags: dict[str, str]) -> tuple[bool, str]:
    """Whether alias `role` moves to `version` (tagged `tags`) from `current` (tagged `current_tags`), and why."""
    if promote == "latest" or current is None or current == version:
        return True, ""
    where = f"@{role} stays on version {current}"
    if current_tags.get(TEST_SET_TAG) != tags.get(TEST_SET_TAG) or TEST_TAG not in current_tags:
        return False, (f"{where}: it was scored on {current_tags.get(TEST_SET_TAG) or 'an unrecorded test set'}, "
                       f"version {version} on {tags.get(TEST_SET_TAG)}; scores on different test sets do not compare")
    old, new = float(current_tags[TEST_TAG]), float(tags[TEST_TAG])
    if new <= old:
        return False, f"{where}: its test score {old:.4f} is not beaten by version {version}'s {new:.4f} on " \
                      f"{tags[TEST_SET_TAG]}"
    return True, (f"@{role} moves from version {current} to {version}: test {new:.4f} > {old:.4f} on "
                  f"{tags[TEST_SET_TAG]}")


@task(name="register-models", cache_policy=NO_CACHE)
def register_task(tracking: Tracking, model_name: str, hybrids: dict[str, str], card: dict[str, Any],
                  descriptions: dict[str, str], tags: dict[str, dict[str, str]] | None = None,
                  promote: str = "latest") -> dict[str, dict[str, Any]]:
    """Log `hybrids` ({role: folder}) as pyfunc models and register them (a new version only for new weights,
    with `tags[role]`), then point the aliases per `promote`. Returns {role: {version, model_uri,
    registered_uri, url, promoted, reason}}."""
    if promote not in PROMOTE_CHOICES:
        raise ValueError(f"promote must be one of {', '.join(PROMOTE_CHOICES)}, got {promote!r}")
    tags = tags or {}
    for role in hybrids:
        if role in RESERVED_ALIASES or (role.startswith("v") and role[1:].isdigit()):
            raise ValueError(f"alias '{role}' is reserved by MLflow")
    client = tracking.client()
    roles_of: dict[str, list[str]] = {}  # folder -> its roles: M_opt = M_best is logged and registered once
    for role, folder in hybrids.items():
        roles_of.setdefault(os.path.realpath(folder), []).append(role)
    hashes = {folder: weights_sha256(folder) for folder in roles_of}
    existing = {folder: _version_with_hash(tracking, client, model_name, digest) for folder, digest in hashes.items()}
    logged = _log_models(tracking, {folder: roles for folder, roles in roles_of.items() if existing[folder] is None},
                         card)
    created: list[tuple[str, str]] = []
    new_model = not _exists(client, model_name)
    try:
        if new_model:
            tracking._retry(lambda: client.create_registered_model(
                model_name, description="dtr hybrids: best = highest validation score, opt = most linear layers "
                "within tolerance"))
        results: dict[str, dict[str, Any]] = {}
        for folder, roles in roles_of.items():
            version = existing[folder]
            if version is None:
                uri, model_id = logged[folder]
                version = tracking._retry(lambda uri=uri, model_id=model_id, roles=roles, folder=folder:
                                          client.create_model_version(
                                              model_name, uri, run_id=tracking.parent_run_id,
                                              description=descriptions.get(roles[0], ""),
                                              tags={**tags.get(roles[0], {}), HASH_TAG: hashes[folder]},
                                              model_id=model_id))
                created.append((model_name, version.version))
            else:
                uri = version.source
                logger.info("%s: version %s already holds these weights (%s); not registered again", model_name,
                            version.version, hashes[folder][:12])
            for role in roles:
                results[role] = {"version": version.version, "model_uri": uri,
                                 "registered_uri": f"models:/{model_name}@{role}",
                                 "url": tracking.model_version_url(model_name, version.version),
                                 "tags": dict(version.tags)}
        for role, result in results.items():
            current = _alias_version(tracking, client, model_name, role)
            move, reason = promotion(promote, role, result["version"], result.pop("tags"),
                                     None if current is None else current.version,
                                     {} if current is None else dict(current.tags))
            if move:
                tracking._retry(lambda role=role, result=result: client.set_registered_model_alias(
                    model_name, role, result["version"]))
            else:
                result["registered_uri"] = f"models:/{model_name}/{result['version']}"
            result.update(promoted=move, reason=reason)
            if reason:
                logger.info("%s: %s", model_name, reason)
        _sync_role_tags(tracking, client, model_name)
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


def weights_sha256(folder: str | os.PathLike) -> str:
    """Content hash of a hybrid folder's weights: sha256 over its `model*.safetensors` files (names and bytes)."""
    from dtr_core.artifacts import hash_json, sha256_file

    files = sorted(Path(folder).glob("model*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no model*.safetensors file; is it an exported hybrid?")
    return hash_json({path.name: sha256_file(path) for path in files})


def _version_with_hash(tracking: Tracking, client, model_name: str, digest: str):
    """The newest version of `model_name` tagged with weights hash `digest`, else None."""
    found = tracking._retry(lambda: client.search_model_versions(
        f"name = '{model_name}' and tags.`{HASH_TAG}` = '{digest}'"))
    return max(found, key=lambda v: int(v.version)) if found else None


def _log_models(tracking: Tracking, roles_of: dict[str, list[str]], card: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Log each folder as a pyfunc model on the parent run; returns {folder: (model uri, model id)}."""
    if not roles_of:
        return {}
    import mlflow
    import mlflow.pyfunc

    from dtr_core.artifacts import write_json
    import tasks.pyfunc_model as pyfunc_module
    from tasks.pyfunc_model import signature_for

    mlflow.set_tracking_uri(tracking.uri)
    mlflow.set_registry_uri(tracking.uri)
    logged: dict[str, tuple[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="dtr-card-") as tmp:
        card_path = os.path.join(tmp, "task.json")
        write_json(card_path, card)
        # The fluent API needs an active run; it is per thread, and this task's thread owns it until the end.
        with mlflow.start_run(run_id=tracking.parent_run_id):
            for folder, roles in roles_of.items():
                info = retry(lambda folder=folder, roles=roles: mlflow.pyfunc.log_model(
                    name="m_" + "_".join(roles),
                    python_model=pyfunc_module.__file__,  # a model from code: nothing pickled
                    artifacts={"hybrid": folder, "task": card_path},
                    code_paths=_code_paths(),
                    signature=signature_for(card["kind"]),
                    input_example=input_example(card),
                    pip_requirements=PIP_REQUIREMENTS,
                ), attempts=1, uri=tracking.uri)  # not repeated: a second attempt would log a second model
                logged[folder] = (info.model_uri, info.model_id)
    # leaving `start_run` ended the parent run FINISHED; the conversion is not finished until its summary is
    # written, so a run killed from here on must not look complete
    client = tracking.client()
    tracking._retry(lambda: client.update_run(tracking.parent_run_id, status="RUNNING"))
    return logged


def _sync_role_tags(tracking: Tracking, client, model_name: str) -> None:
    """Every version's `dtr.role` tag = the roles whose alias points at it; cleared where none does."""
    aliases = tracking._retry(lambda: client.get_registered_model(model_name)).aliases
    for version in tracking._retry(lambda: client.search_model_versions(f"name = '{model_name}'")):
        roles = ",".join(role for role in ROLES if aliases.get(role) == version.version)
        if version.tags.get("dtr.role", "") == roles:
            continue
        if roles:
            tracking._retry(lambda v=version.version, roles=roles: client.set_model_version_tag(
                model_name, v, "dtr.role", roles))
        else:
            tracking._retry(lambda v=version.version: client.delete_model_version_tag(model_name, v, "dtr.role"))


def _alias_version(tracking: Tracking, client, model_name: str, alias: str):
    """The version alias `alias` points at, else None."""
    from mlflow.exceptions import MlflowException

    try:
        return tracking._retry(lambda: client.get_model_version_by_alias(model_name, alias))
    except MlflowException:
        return None


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False
