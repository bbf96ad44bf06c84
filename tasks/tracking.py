"""MLflow tracking for dtr runs, always with explicit run ids (never the fluent, per-thread active run).

- Tracking URI: the `tracking_uri` parameter, else `$MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the
  working directory, made absolute so worker processes with another working directory write the same store
  (MLflow's own default, set explicitly: a leftover ./mlruns file store would otherwise break it).
- An http(s) URI is checked once before any work (`check_tracking_uri`): unreachable -> one-line ValueError.
- One parent run per conversion (`Tracking.start_parent`); child runs per distilled layer and per greedy
  candidate are created with `MlflowClient.create_run(tags={"mlflow.parentRunId": parent})`, so they work
  from any thread, process or Dask worker. `Tracking` is a small picklable value passed to tasks.
- Writes to a sqlite store from parallel tasks can meet "database is locked": every write is retried.
"""

from __future__ import annotations

import logging
import math
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
T = TypeVar("T")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use (see the module docstring); relative sqlite paths become absolute."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///"):]).expanduser()
        uri = "sqlite:///" + str(path.resolve())
    return uri


def check_tracking_uri(uri: str, timeout: float = 3.0) -> None:
    """Fail fast, with one line, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
                if response.status != 200:
                    raise OSError(f"HTTP {response.status}")
        except (OSError, urllib.error.URLError) as error:
            reason = getattr(error, "reason", error)
            raise ValueError(f"MLflow tracking server {uri} is unreachable ({reason}); start it with `dtr ui up` "
                             "or unset MLFLOW_TRACKING_URI to use the local sqlite store") from None
        return
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ValueError(f"MLflow store {uri}: folder {folder} does not exist or is not writable")
        return
    if uri.startswith(("file:", "/", ".")) or "://" not in uri:
        raise ValueError(f"MLflow tracking URI {uri!r} is a file store, which MLflow 3 refuses here; use "
                         "sqlite:///mlflow.db or an http://127.0.0.1:<port> server")


def retry(call: Callable[[], T], attempts: int = 6, delay: float = 0.2) -> T:
    """Run an MLflow write, retrying when a sqlite store is locked by a concurrent writer."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - MLflow wraps sqlalchemy errors in several types
            if "locked" not in str(error).lower() or attempt == attempts - 1:
                raise
            time.sleep(delay * (attempt + 1))
    raise AssertionError("unreachable")


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = str(value)[:6000]  # MLflow's param value limit
    return flat


def _finite(metrics: Mapping[str, float | int | None]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


@dataclass(frozen=True)
class Tracking:
    """Where a run logs: tracking URI, experiment and the parent run (picklable; passed to tasks)."""

    uri: str
    experiment_id: str
    parent_run_id: str

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    @classmethod
    def start_parent(cls, uri: str, experiment: str, run_name: str, params: Mapping[str, Any],
                     tags: Mapping[str, str] | None = None) -> Tracking:
        """Create the parent run of a conversion and log the full config as params."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = retry(lambda: client.get_experiment_by_name(experiment))
        experiment_id = found.experiment_id if found is not None \
            else retry(lambda: client.create_experiment(experiment))
        run = retry(lambda: client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {})))
        flat = _flatten(params)
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for start in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            retry(lambda chunk=items[start:start + 100]: client.log_batch(run.info.run_id, params=chunk))
        return cls(uri=uri, experiment_id=experiment_id, parent_run_id=run.info.run_id)

    def log_metrics(self, metrics: Mapping[str, float | int | None], step: int | None = None,
                    run_id: str | None = None) -> None:
        """Several metrics in one call (one round trip to a server)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, v, stamp, step or 0) for k, v in _finite(metrics).items()]
        if items:
            retry(lambda: self.client().log_batch(run_id or self.parent_run_id, metrics=items))

    def log_series(self, name: str, points: Iterable[tuple[int, float]], run_id: str | None = None) -> None:
        """A metric curve (step, value), e.g. a loss curve, in one call."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(name, float(v), stamp, int(s)) for s, v in points if v is not None and math.isfinite(v)]
        for start in range(0, len(items), 1000):
            retry(lambda chunk=items[start:start + 1000]: self.client().log_batch(run_id or self.parent_run_id,
                                                                                   metrics=chunk))

    def set_tags(self, tags: Mapping[str, Any], run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        retry(lambda: self.client().log_batch(run_id or self.parent_run_id, tags=items))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
        path = Path(path)
        client = self.client()
        if path.is_dir():
            retry(lambda: client.log_artifacts(run_id or self.parent_run_id, str(path), artifact_path))
        else:
            retry(lambda: client.log_artifact(run_id or self.parent_run_id, str(path), artifact_path))

    def child_run(self, name: str, params: Mapping[str, Any], metrics: Mapping[str, float | int | None],
                  tags: Mapping[str, Any] | None = None, series: Mapping[str, Iterable[tuple[int, float]]] | None = None,
                  status: str = "FINISHED") -> str:
        """Create, fill and close a child run of the parent in a few calls; returns its run id."""
        from mlflow.entities import Metric, Param

        client = self.client()
        all_tags = {"mlflow.parentRunId": self.parent_run_id, **{k: str(v) for k, v in (tags or {}).items()}}
        run = retry(lambda: client.create_run(self.experiment_id, run_name=name, tags=all_tags))
        run_id = run.info.run_id
        stamp = int(time.time() * 1000)
        metric_items = [Metric(k, v, stamp, 0) for k, v in _finite(metrics).items()]
        for metric, points in (series or {}).items():
            metric_items += [Metric(metric, float(v), stamp, int(s)) for s, v in points
                             if v is not None and math.isfinite(v)]
        param_items = [Param(k, v) for k, v in _flatten(params).items()]
        for start in range(0, max(len(metric_items), 1), 1000):  # log_batch takes at most 1000 metrics
            retry(lambda chunk=metric_items[start:start + 1000], first=start == 0: client.log_batch(
                run_id, metrics=chunk, params=param_items if first else []))
        retry(lambda: client.set_terminated(run_id, status))
        return run_id

    def finish(self, status: str = "FINISHED") -> None:
        retry(lambda: self.client().set_terminated(self.parent_run_id, status))

    def run_url(self) -> str:
        """A link to the parent run (server URI) or how to open it (sqlite store)."""
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.parent_run_id}"
        return f"mlflow ui --backend-store-uri {self.uri}  (run {self.parent_run_id})"
