"""Quiet flow logs: one traceback per failure (task -> sub-flow -> flow), and the worker's environment turns
off progress bars and MLflow's per-run links."""

from __future__ import annotations

import logging

import pytest
from prefect import flow, task

pytestmark = pytest.mark.usefixtures("prefect_harness")

@task
def _fails() -> None:
    raise ValueError("the data file has no label column")


@flow
def _child() -> None:
    _fails()


@flow
def _parent() -> None:
    _child()


def _tracebacks(caplog) -> tuple[int, list[str]]:
    """How many log records of a failing task in a sub-flow carry a traceback; the messages."""
    caplog.clear()
    with caplog.at_level(logging.INFO), pytest.raises(ValueError, match="no label column"):
        _parent()
    records = [r for r in caplog.records if r.name.startswith("prefect.")]
    return sum(r.exc_info is not None for r in records), [r.getMessage() for r in records]


def test_a_failure_shows_its_traceback_once(caplog):
    from flows.logs import RUN_LOGGERS, show_each_traceback_once

    show_each_traceback_once()
    count, messages = _tracebacks(caplog)
    assert count == 1, messages
    assert sum("no label column" in m for m in messages) >= 3  # each level still says what failed
    assert sum(m.endswith("(traceback above)") for m in messages) == 2, messages
    assert all(logging.getLogger(name).filters for name in RUN_LOGGERS)


def test_without_the_filter_prefect_repeats_it(caplog):
    """What the filter removes: Prefect logs the same traceback at every level."""
    from flows.logs import _FILTER, RUN_LOGGERS, show_each_traceback_once

    for name in RUN_LOGGERS:
        logging.getLogger(name).removeFilter(_FILTER)
    try:
        count, messages = _tracebacks(caplog)
    finally:
        show_each_traceback_once()
    assert count == 3, messages


def test_the_worker_environment_names_real_switches():
    import mlflow.environment_variables as mlflow_env

    from dtr.cli import QUIET_LIBRARIES
    from dtr.commands.ui import QUIET_WORKER

    for name in QUIET_WORKER:
        if name.startswith("MLFLOW_"):
            assert hasattr(mlflow_env, name), name
    assert QUIET_WORKER["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"
    assert QUIET_LIBRARIES["HF_HUB_DISABLE_PROGRESS_BARS"] == "1" and QUIET_WORKER["TQDM_DISABLE"] == "1"
