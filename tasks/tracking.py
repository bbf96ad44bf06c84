"""MLflow tracking for dtr runs, always with explicit run ids (never the fluent, per-thread active run).

- Tracking URI: the `tracking_uri` parameter, else `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the
  working directory, made absolute so worker processes with another working directory write the same store
  (MLflow's own default, set explicitly: a leftover ./mlruns file store would otherwise break it).
- The URI is checked once before any work (`tasks/checks.py`): unreachable or not MLflow -> one-line ValueError.
- A new sqlite store is created (schema + migrations) by one process at a time: `ensure_store` holds a
  `filelock` on `<db>.lock` around the first client call of each process, so conversions started together in
  an empty folder all succeed instead of racing alembic.
- One parent run per conversion (`Tracking.start_parent`); child runs per distilled layer and per greedy
  candidate are created with `MlflowClient.create_run(tags={"mlflow.parentRunId": parent})`, so they work
  from any thread, process or Dask worker. `Tracking` is a small picklable value passed to tasks.
- Resume: the parent run id is kept in the run folder (`mlflow_run.json`, URI redacted). A conversion that
  finds it, for the same store and experiment, reattaches to that run (status back to RUNNING, tag
  `dtr.resumed=<times>`) and repairs what a killed process left: child runs still RUNNING become KILLED,
  logged models still PENDING become FAILED. A resumed child run replaces its namesake from the earlier
  attempt (the old one is deleted), so the parent keeps one child per layer and per candidate.
- Credentials: every param and tag value goes through `dtr_core.redaction.redact` (tracking URI, Dask
  address, paths), and so do the URIs in the summary.
- Bounded waits. MLflow's HTTP client retries 7 times with backoff factor 2 and a 120 s timeout by
  default: about 4 minutes of silence per call when the server is gone. `BOUNDED_HTTP` sets, with
  `os.environ.setdefault` (yours win), `MLFLOW_HTTP_REQUEST_MAX_RETRIES=2`,
  `MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1` and `MLFLOW_HTTP_REQUEST_TIMEOUT=15`: a dead server fails a call
  in ~3 s, a hung one in under 50 s. It is applied when this module is imported, which every dtr process
  that logs does (the flow's, pool processes, Dask workers: tasks import it), and inherited by child processes.
  `retry` re-runs a call only on sqlite's "database is locked" (6 attempts, < 3.5 s of sleeps); a failure of
  the store itself (server gone, disk full) becomes one `TrackingStoreError` line, and marking the parent
  FAILED after it is best effort with a short bound (`Tracking.finish(wait=...)`); the next start repairs it.
- Writes to a sqlite store from parallel tasks can meet "database is locked": every write is retried.
- Experiments open in the MLflow UI's model-training view: `start_parent` tags them
  `mlflow.experimentKind=custom_model_development` (MLflow 3.17 opens an untagged experiment as GenAI, a
  traces page), unless the experiment already has a kind (a user's choice is kept).
- Child runs are timed by their work: a child run logged with a `seconds` metric spans those seconds up to
  the moment it is logged (it is created once the work is done, which alone would show a few milliseconds).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from dtr_core.redaction import redact

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
RUN_RECORD = "mlflow_run.json"  # in the run folder: which MLflow run this folder logs to
STORE_CREATION_WAIT = 300.0  # seconds a process waits for another one creating the same sqlite store
BOUNDED_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
# Words in an error that say the store itself failed, not the request (server gone, disk full, broken db).
_STORE_FAILURES = ("max retries exceeded", "connection refused", "connectionerror", "failed to establish",
                   "read timed out", "remotedisconnected", "connection aborted", "connection broken",
                   "incompleteread", "database or disk is full",
                   "disk i/o error", "readonly database", "unable to open database", "no space left")
T = TypeVar("T")


def bound_waits() -> None:
    """Bounded MLflow HTTP retries and timeout for this process and its children (see the module docstring)."""
    for name, value in BOUNDED_HTTP.items():
        os.environ.setdefault(name, value)


bound_waits()


class TrackingStoreError(ValueError):
    """The MLflow store itself failed (server gone, disk full): one line; the run folder keeps the work."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use (see the module docstring); relative sqlite paths become absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).expanduser()
        uri = "sqlite:///" + str(path.resolve())
    return uri


def _store_failure(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return any(word in text for word in _STORE_FAILURES)


def retry(call: Callable[[], T], attempts: int = 6, delay: float = 0.2, uri: str | None = None) -> T:
    """Run an MLflow write, retrying when a sqlite store is locked by a concurrent writer.

    A failure of the store itself raises `TrackingStoreError` (one line, credentials masked)."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - MLflow wraps sqlalchemy errors in several types
            if "locked" in str(error).lower() and attempt < attempts - 1:
                time.sleep(delay * (attempt + 1))
                continue
            if _store_failure(error) and not isinstance(error, TrackingStoreError):
                reason = redact(" ".join(str(error).split()))[:300]
                raise TrackingStoreError(
                    f"MLflow store {redact(uri) if uri else ''} failed ({type(error).__name__}: {reason}); the work "
                    "done is kept in the run folder: fix the store, then run the same command again to resume"
                ) from error
            raise
    raise AssertionError("unreachable")


def best_effort(call: Callable[[], Any], seconds: float, what: str) -> bool:
    """Run `call` for at most `seconds` (in a daemon thread); a failure or a timeout is one warning line."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            call()
            outcome["ok"] = True
        except BaseException as error:  # noqa: BLE001 - reported below, never raised a second time
            outcome["error"] = error

    thread = threading.Thread(target=run, name="dtr-best-effort", daemon=True)
    thread.start()
    thread.join(seconds)
    if outcome.get("ok"):
        return True
    reason = f"no answer within {seconds:.0f}s" if thread.is_alive() else \
        redact(" ".join(str(outcome.get("error")).split()))[:200]
    logger.warning("could not %s: %s", what, reason)
    return False


def artifact_root(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a sqlite store (`<db folder>/mlartifacts/<name>`),
    so they do not land in whatever folder the process happened to start in (MLflow's default is
    `./mlruns`, relative to the working directory); a server decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    folder = Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)
    return folder.as_uri()


_ready: set[str] = set()
_ready_lock = threading.Lock()


def ensure_store(uri: str) -> None:
    """Create (and migrate) the store behind `uri` once per process; for sqlite, one process at a time."""
    if uri in _ready:
        return
    with _ready_lock:
        if uri in _ready:
            return
        if uri.startswith("sqlite:///"):
            from filelock import FileLock, Timeout
            from mlflow.tracking import MlflowClient

            database = uri[len("sqlite:///"):]
            try:
                # the client's constructor and first calls open both stores (tracking, registry), which create
                # and migrate their tables: all of it under the lock
                with FileLock(database + ".lock", timeout=STORE_CREATION_WAIT, thread_local=False):
                    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
                    retry(lambda: client.search_experiments(max_results=1), uri=uri)
                    retry(lambda: client.search_registered_models(max_results=1), uri=uri)
            except Timeout:
                raise TrackingStoreError(f"MLflow store {uri} is being created by another process for over "
                                         f"{STORE_CREATION_WAIT:.0f}s; is {database}.lock held by a stuck "
                                         "process?") from None
        _ready.add(uri)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as flat `a.b` keys; values redacted (a tracking URI or Dask address may hold a password)."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = redact(str(value))[:6000]  # MLflow's param value limit
    return flat


def _tag_values(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {k: redact(str(v))[:8000] for k, v in (tags or {}).items()}


def _finite(metrics: Mapping[str, float | int | None]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


@dataclass(frozen=True)
class Tracking:
    """Where a run logs: tracking URI, experiment and the parent run (picklable; passed to tasks).

    `resumed`: the parent run was reattached, so a child run replaces its namesake from an earlier attempt."""

    uri: str
    experiment_id: str
    parent_run_id: str
    resumed: bool = False

    def client(self):
        from mlflow.tracking import MlflowClient

        ensure_store(self.uri)
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def _retry(self, call: Callable[[], T]) -> T:
        return retry(call, uri=self.uri)

    @classmethod
    def start_parent(cls, uri: str, experiment: str, run_name: str, params: Mapping[str, Any],
                     tags: Mapping[str, str] | None = None, run_dir: str | Path | None = None) -> Tracking:
        """Create the parent run of a conversion and log the full config as params.

        With `run_dir`: reattach to the run recorded in `run_dir/mlflow_run.json` when it exists in this store
        and experiment (repairing what a killed attempt left, see the module docstring), and record the run there.
        """
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        ensure_store(uri)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = retry(lambda: client.get_experiment_by_name(experiment), uri=uri)
        experiment_id = found.experiment_id if found is not None \
            else retry(lambda: client.create_experiment(experiment, artifact_location=artifact_root(uri, experiment),
                                                        tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}), uri=uri)
        if found is not None and EXPERIMENT_KIND_TAG not in found.tags:  # made before dtr tagged its experiments
            retry(lambda: client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND), uri=uri)
        record = Path(run_dir) / RUN_RECORD if run_dir is not None else None
        run = _recorded_run(client, record, uri, experiment_id)
        flat, tag_values = _flatten(params), _tag_values(tags)
        if run is None:
            run = retry(lambda: client.create_run(experiment_id, run_name=run_name, tags=tag_values), uri=uri)
            new_params, resumed = flat, 0
        else:
            resumed = int(run.data.tags.get("dtr.resumed", "0")) + 1
            tracking = cls(uri=uri, experiment_id=experiment_id, parent_run_id=run.info.run_id, resumed=True)
            killed, failed_models = tracking.repair()
            retry(lambda: client.update_run(run.info.run_id, status="RUNNING"), uri=uri)
            logged = run.data.params
            new_params = {k: v for k, v in flat.items() if k not in logged}
            # MLflow params cannot change; values that differ from the first attempt (runner, speed) become tags
            changed = {f"dtr.rerun.{k}": v for k, v in flat.items() if k in logged and logged[k] != v}
            tracking.set_tags({**tag_values, **changed, "dtr.resumed": resumed})
            logger.info("reattached to MLflow run %s (resumed %d times; %d child runs marked KILLED, %d pending "
                        "logged models marked FAILED)", run.info.run_id, resumed, killed, failed_models)
        items = [Param(k, v) for k, v in sorted(new_params.items())]
        for start in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            retry(lambda chunk=items[start:start + 100]: client.log_batch(run.info.run_id, params=chunk), uri=uri)
        if record is not None:
            from dtr_core.artifacts import write_json

            write_json(record, {"tracking_uri": redact(uri), "experiment": experiment, "experiment_id": experiment_id,
                                "run_id": run.info.run_id})
        return cls(uri=uri, experiment_id=experiment_id, parent_run_id=run.info.run_id, resumed=resumed > 0)

    def repair(self) -> tuple[int, int]:
        """What a killed attempt left: child runs still RUNNING -> KILLED, the parent's PENDING logged models
        -> FAILED. Returns (child runs, logged models) repaired."""
        from mlflow.entities import LoggedModelStatus

        client = self.client()
        orphans = self._retry(lambda: client.search_runs(
            [self.experiment_id], max_results=50000,
            filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and attributes.status = 'RUNNING'"))
        for run in orphans:
            self._retry(lambda run_id=run.info.run_id: client.set_terminated(run_id, "KILLED"))
        logged = self._retry(lambda: client.search_logged_models(  # MLflow 3.17 cannot filter on status
            experiment_ids=[self.experiment_id], filter_string=f"source_run_id = '{self.parent_run_id}'"))
        pending = [model for model in logged if model.status == LoggedModelStatus.PENDING]
        for model in pending:
            self._retry(lambda model_id=model.model_id: client.finalize_logged_model(model_id,
                                                                                      LoggedModelStatus.FAILED))
        return len(orphans), len(pending)

    def log_metrics(self, metrics: Mapping[str, float | int | None], step: int | None = None,
                    run_id: str | None = None) -> None:
        """Several metrics in one call (one round trip to a server)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, v, stamp, step or 0) for k, v in _finite(metrics).items()]
        if items:
            self._retry(lambda: self.client().log_batch(run_id or self.parent_run_id, metrics=items))

    def log_series(self, name: str, points: Iterable[tuple[int, float]], run_id: str | None = None) -> None:
        """A metric curve (step, value), e.g. a loss curve, in one call."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(name, float(v), stamp, int(s)) for s, v in points if v is not None and math.isfinite(v)]
        for start in range(0, len(items), 1000):
            self._retry(lambda chunk=items[start:start + 1000]: self.client().log_batch(
                run_id or self.parent_run_id, metrics=chunk))

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in _tag_values(tags).items()]
        self._retry(lambda: self.client().log_batch(run_id or self.parent_run_id, tags=items))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
        path = Path(path)
        client = self.client()
        if path.is_dir():
            self._retry(lambda: client.log_artifacts(run_id or self.parent_run_id, str(path), artifact_path))
        else:
            self._retry(lambda: client.log_artifact(run_id or self.parent_run_id, str(path), artifact_path))

    def child_run(self, name: str, params: Mapping[str, Any], metrics: Mapping[str, float | int | None],
                  tags: Mapping[str, Any] | None = None, series: Mapping[str, Iterable[tuple[int, float]]] | None = None,
                  status: str = "FINISHED") -> str:
        """Create, fill and close a child run of the parent in a few calls; returns its run id.

        The run ends now and starts `metrics["seconds"]` earlier (when given): the time of its work.
        On a resumed parent, an earlier attempt's child of the same name is deleted first."""
        from mlflow.entities import Metric, Param

        client = self.client()
        if self.resumed:
            earlier = self._retry(lambda: client.search_runs(
                [self.experiment_id], max_results=1000,
                filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}' and attributes.run_name = '{name}'"))
            for run in earlier:
                self._retry(lambda run_id=run.info.run_id: client.delete_run(run_id))
        all_tags = {"mlflow.parentRunId": self.parent_run_id, **_tag_values(tags)}
        stamp = int(time.time() * 1000)
        work = max(0.0, _finite({"seconds": metrics.get("seconds")}).get("seconds", 0.0))
        run = self._retry(lambda: client.create_run(self.experiment_id, start_time=stamp - int(work * 1000),
                                                    run_name=name, tags=all_tags))
        run_id = run.info.run_id
        metric_items = [Metric(k, v, stamp, 0) for k, v in _finite(metrics).items()]
        for metric, points in (series or {}).items():
            metric_items += [Metric(metric, float(v), stamp, int(s)) for s, v in points
                             if v is not None and math.isfinite(v)]
        param_items = [Param(k, v) for k, v in _flatten(params).items()]
        for start in range(0, max(len(metric_items), 1), 1000):  # log_batch takes at most 1000 metrics
            self._retry(lambda chunk=metric_items[start:start + 1000], first=start == 0: client.log_batch(
                run_id, metrics=chunk, params=param_items if first else []))
        self._retry(lambda: client.set_terminated(run_id, status, end_time=stamp))
        return run_id

    def finish(self, status: str = "FINISHED", wait: float | None = None) -> bool:
        """Close the parent run. With `wait` (after a failure): best effort, at most `wait` seconds, never raises."""
        if wait is None:
            self._retry(lambda: self.client().set_terminated(self.parent_run_id, status))
            return True
        return best_effort(lambda: self.client().set_terminated(self.parent_run_id, status), wait,
                           f"mark MLflow run {self.parent_run_id} {status}")

    def model_version_url(self, name: str, version: str) -> str | None:
        """The registry page of a model version on a server; None for a sqlite store."""
        if not self.uri.startswith(("http://", "https://")):
            return None
        from urllib.parse import quote

        return redact(f"{self.uri.rstrip('/')}/#/models/{quote(name, safe='')}/versions/{version}")

    def run_url(self) -> str:
        """A link to the parent run (server URI) or how to open it (sqlite store); credentials masked."""
        if self.uri.startswith(("http://", "https://")):
            return redact(f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.parent_run_id}")
        return redact(f"mlflow ui --backend-store-uri {self.uri}  (run {self.parent_run_id})")


def _recorded_run(client, record: Path | None, uri: str, experiment_id: str):
    """The parent run recorded in `record` if it belongs to this store and experiment and still exists."""
    from mlflow.exceptions import MlflowException

    from dtr_core.artifacts import read_json

    if record is None or not record.is_file():
        return None
    try:
        stored = read_json(record)
    except ValueError:
        return None
    if stored.get("tracking_uri") != redact(uri) or stored.get("experiment_id") != experiment_id:
        return None
    try:
        run = retry(lambda: client.get_run(stored["run_id"]), uri=uri)
    except MlflowException:
        return None  # another store at the same address, or the run was removed
    if run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
        return None
    return run
