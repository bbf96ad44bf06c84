"""`RunContext`: what every task of one conversion shares, passed as one argument instead of five.

Small and picklable (paths and names, never models or tensors), so the process and Dask task runners ship
it to their workers; each worker loads what the names point to once (`tasks/runtime.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dtr_core.run_layout import RunLayout

if TYPE_CHECKING:
    from tasks.tracking import Tracking


@dataclass(frozen=True)
class RunContext:
    """The teacher, the run folder, the student type, the MLflow parent run and the torch threads of a task."""

    model: str  # the teacher's source: a built-in name, a save_pretrained folder or a hub id
    run_dir: str  # runs/<run_id> (`dtr_core.run_layout.RunLayout`)
    mixer: str  # the linear-attention student type (`dtr_core.mixers.MIXERS`)
    tracking: Tracking | None = None  # the MLflow parent run; None: no tracking
    threads: int = 1  # torch intra-op threads of the task (1 when tasks run in parallel)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run_dir)

    def with_threads(self, threads: int) -> RunContext:
        return dataclasses.replace(self, threads=threads)
