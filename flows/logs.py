"""One traceback per failure in the flow logs.

Prefect logs a failing task's exception with its traceback, then again for every flow run it passes through
(the task's flow, each parent flow, the engine), so a worker log shows the same traceback two to four times.
`OnceFilter` sits on Prefect's run loggers: a record that carries an exception already shown keeps its
message (`... ValueError('...')`, then "(traceback above)") and loses the repeated traceback.
"""

from __future__ import annotations

import collections
import logging

_TRACEBACK_SHOWN = " (traceback above)"


class OnceFilter(logging.Filter):
    """Drops the traceback of an exception already shown: the same type and message (Prefect re-raises a
    failed task's exception in its flow as a copy, so identity cannot tell)."""

    def __init__(self, remember: int = 256) -> None:
        super().__init__("")
        self._shown: collections.deque[tuple[str, str]] = collections.deque(maxlen=remember)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return True
        key = (type(error).__qualname__, str(error))
        if key not in self._shown:
            self._shown.append(key)
            return True
        record.exc_info, record.exc_text = None, None
        record.msg = f"{record.msg}{_TRACEBACK_SHOWN}"
        return True


# The loggers of Prefect's run engines (task runs, flow runs); a filter on a logger stays when Prefect
# reconfigures its handlers. One filter for all of them: an exception is shown by the first that logs it.
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")
_FILTER = OnceFilter()


def show_each_traceback_once() -> None:
    """Put the shared `OnceFilter` on Prefect's run loggers (idempotent)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
