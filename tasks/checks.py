"""Preflight checks of the services a run talks to: the MLflow tracking store and a Dask scheduler.

Each check raises `ValueError` with one line (credentials redacted with `dtr_core.redaction.redact`),
writes nothing and takes at most a few seconds (`TIMEOUT_S` per connection). No mlflow or dask import:
plain sockets and urllib answer the same questions faster.

- tracking URI: http(s) must answer as an MLflow server (`GET /health` is 200 and
  `GET /api/2.0/mlflow/experiments/search?max_results=1` answers JSON); a database URI (postgresql, mysql,
  mssql) must have its SQLAlchemy driver installed (`create_engine` without connecting); sqlite needs a
  writable folder for its file; file stores are refused (MLflow 3 does not take them here).
- Dask address: a TCP connection to host:port opens.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from dtr_core.redaction import redact

TIMEOUT_S = 3.0
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
# The pip package that provides a missing DB-API module (the name in ModuleNotFoundError).
DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "psycopg": "psycopg[binary]", "pg8000": "pg8000",
                   "asyncpg": "asyncpg", "MySQLdb": "mysqlclient", "pymysql": "pymysql",
                   "mysql": "mysql-connector-python", "pyodbc": "pyodbc", "pymssql": "pymssql"}
DASK_DEFAULT_PORT = 8786


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read(65536)
    except urllib.error.HTTPError as error:
        return error.code, error.read(65536) if error.fp else b""


def check_tracking_uri(uri: str, timeout: float = TIMEOUT_S) -> None:
    """Fail fast, with one line, when the tracking store cannot be used (see the module docstring)."""
    shown = redact(uri)
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_mlflow_server(uri, shown, timeout)
        return
    if scheme.split("+")[0] in DATABASE_SCHEMES:
        _check_database_driver(uri, shown)
        return
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).expanduser().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"MLflow store {shown}: folder {folder} does not exist or is not writable; use a "
                             "writable folder (--tracking-uri sqlite:///<folder>/mlflow.db)")
        return
    if uri.startswith(("file:", "/", ".")) or "://" not in uri:
        raise ValueError(f"MLflow tracking URI {shown!r} is a file store, which MLflow 3 refuses here; use "
                         "sqlite:///mlflow.db or an http://127.0.0.1:<port> server")
    raise ValueError(f"MLflow tracking URI {shown!r} has a scheme dtr does not use ({scheme}); use an "
                     "http(s):// MLflow server, sqlite:///<folder>/mlflow.db or a database URI "
                     f"({', '.join(sorted(DATABASE_SCHEMES))})")


def _check_mlflow_server(uri: str, shown: str, timeout: float) -> None:
    base = uri.rstrip("/")
    fix = "start it with `dtr ui up` or unset MLFLOW_TRACKING_URI to use the local sqlite store"
    status, _ = _get_from_server(base + "/health", shown, timeout, fix)
    if status != 200:
        raise ValueError(f"{shown} is not an MLflow tracking server (GET /health: HTTP {status}); check the "
                         f"address and port, or {fix}")
    status, body = _get_from_server(base + "/api/2.0/mlflow/experiments/search?max_results=1", shown, timeout, fix)
    try:
        answer = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        answer = None
    if status != 200 or not isinstance(answer, dict):
        raise ValueError(f"{shown} is not an MLflow tracking server (its experiments API answered HTTP {status} "
                         f"{'with JSON' if isinstance(answer, dict) else 'without JSON'}); check the address "
                         f"and port, or {fix}")


def _get_from_server(url: str, shown: str, timeout: float, fix: str) -> tuple[int, bytes]:
    """`_get` on the tracking server `shown`: one line when it is unreachable or refuses the credentials."""
    try:
        status, body = _get(url, timeout)
    except (OSError, urllib.error.URLError) as error:
        reason = redact(str(getattr(error, "reason", error)))
        raise ValueError(f"MLflow tracking server {shown} is unreachable ({reason}); {fix}") from None
    if status in (401, 403):
        raise ValueError(f"MLflow tracking server {shown} refused the credentials (HTTP {status}); set "
                         "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    return status, body


def _check_database_driver(uri: str, shown: str) -> None:
    import sqlalchemy
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        sqlalchemy.create_engine(uri).dispose()  # loads the dialect and its DB-API module; does not connect
    except ModuleNotFoundError as error:
        package = DRIVER_PACKAGES.get((error.name or "").split(".")[0], error.name)
        raise ValueError(f"MLflow store {shown} needs the database driver '{error.name}', which is not installed; "
                         f"run `pip install {package}`") from None
    except NoSuchModuleError as error:
        raise ValueError(f"MLflow store {shown}: SQLAlchemy has no dialect for it ({redact(str(error))}); check "
                         "the scheme (postgresql://, mysql://, mssql://)") from None
    except ArgumentError as error:
        raise ValueError(f"MLflow store {shown} is not a valid database URL ({redact(str(error))})") from None


def parse_dask_address(address: str) -> tuple[str, int]:
    """(host, port) of a scheduler address `tcp://host:port`, `tls://host:port` or `host:port`."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme not in ("tcp", "tls") or not parsed.hostname:
        raise ValueError(f"runner.dask_address {redact(address)!r} is not a scheduler address; use "
                         "tcp://<host>:<port> (e.g. tcp://127.0.0.1:8786)")
    try:
        port = parsed.port or DASK_DEFAULT_PORT
    except ValueError:
        raise ValueError(f"runner.dask_address {redact(address)!r} has an invalid port; use "
                         "tcp://<host>:<port>") from None
    return parsed.hostname, port


def check_dask_address(address: str, timeout: float = TIMEOUT_S) -> None:
    """A TCP connection to the scheduler opens within `timeout` seconds; one line otherwise."""
    host, port = parse_dask_address(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        raise ValueError(f"Dask scheduler {redact(address)} is unreachable ({reason}); start it (`dask scheduler`) "
                         "or leave --dask-address out to start a local cluster") from None
