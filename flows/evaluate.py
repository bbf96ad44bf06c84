"""Sub-flow `evaluate`: score models (teacher names or exported hybrid folders) on task splits."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.run_names import run_name
from tasks.params import ConvertParams, TaskParams
from tasks.evaluate import evaluate_task
from tasks.runtime import serial_threads


@flow(name="evaluate", task_runner=ThreadPoolTaskRunner(max_workers=1),
      flow_run_name=run_name("evaluate"),
      description="Score models on a task's validation and/or test split")
def evaluate(
    models: list[str] = [ConvertParams.model_fields["model"].default],  # noqa: B006 - Prefect needs a literal default for the UI form
    task: TaskParams = TaskParams(),
    splits: list[str] = ["validation", "test"],  # noqa: B006
) -> dict[str, dict[str, Any]]:
    """{model: {split: EvalResult dict}} (limits from `task.validation_limit` / `task.test_limit`)."""
    logger = get_run_logger()
    limits = {"validation": task.validation_limit, "test": task.test_limit, "train": None}
    results = {}
    for model in models:
        results[model] = evaluate_task(model, task, {split: limits[split] for split in splits}, "model", None,
                                       serial_threads())
        for split, result in results[model].items():
            logger.info("%s %s/%s: %s %.4f (n=%d)", model, result["task"], split, result["metric"],
                        result["score"], result["n"])
    return results
