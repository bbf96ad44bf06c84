"""Flow run names a user can read in the Prefect UI: the stage, the model and the task (`convert-smollm2-135m-
sentiment`, `replace-smollm2-135m-sentiment`) instead of Prefect's random two-word names.

`run_name(stage)` is a flow's `flow_run_name=`: Prefect calls it with no arguments while the run's context
holds its parameters (pydantic models when called from Python, plain dicts when started from a deployment).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dtr_core.run_layout import slug


def _task_label(task: Any) -> str:
    from tasks.params import TaskParams

    if task is None:
        return TaskParams().label
    return (task if isinstance(task, TaskParams) else TaskParams.model_validate(task)).label


def describe(stage: str, parameters: dict[str, Any]) -> str:
    """`<stage>-<model>[-<task>]` from a flow's parameters; models: their short names joined by '+'."""
    from tasks.params import ConvertParams

    parts = [stage]
    if "models" in parameters:
        labels = parameters.get("labels") or parameters["models"] or []
        parts.append("+".join(slug(str(label), 24) for label in labels))
    else:
        parts.append(slug(str(parameters.get("model") or ConvertParams.model_fields["model"].default), 40))
    if "task" in parameters:
        parts.append(slug(_task_label(parameters["task"]), 40))
    return "-".join(part for part in parts if part)


def run_name(stage: str) -> Callable[[], str]:
    """A `flow_run_name` callable naming a run of `stage` after its model and task."""

    def name() -> str:
        from prefect.context import FlowRunContext

        context = FlowRunContext.get()
        try:
            return describe(stage, dict(context.parameters or {}) if context else {})
        except (ValueError, TypeError):  # parameters the flow will reject itself: name the stage only
            return stage

    name.__name__ = f"{stage}_run_name"
    return name
