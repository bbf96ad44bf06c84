"""`dtr eval`: score a model (teacher or saved hybrid) on a task split.

    dtr eval --model smollm2-135m --task sentiment --split validation --limit 200
    dtr eval --model runs/x/hybrids/best --task my_task.json --split test --json
    dtr eval --model smollm2-135m --task sentiment --metric recall:negative --verbaliser-scoring per_token
"""

from __future__ import annotations

import json

import typer

from dtr_core.evaluation import CLASSIFICATION_METRICS, VERBALISER_SCORINGS, task_list
from dtr_core.evaluation.text_metrics import GENERATIVE_METRICS


def eval_command(
    model: str = typer.Option(..., "--model", "-m", help="built-in name (smollm2-135m, tiny-llama, ...), "
                              "a save_pretrained folder (teacher or hybrid) or a hub id"),
    task: str = typer.Option(..., "--task", "-t", help=f"{task_list()}, or a task spec .json file"),
    split: str = typer.Option("validation", "--split", "-s", help="validation or test (or train)"),
    limit: int | None = typer.Option(None, "--limit", "-n", help="score only the first N examples of the split"),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="sequences per forward pass"),
    metric: str | None = typer.Option(None, "--metric", help="the score to report: "
                                      f"{', '.join(CLASSIFICATION_METRICS)} (classification), perplexity, or "
                                      f"{', '.join(GENERATIVE_METRICS)} (generative); "
                                      "default: the task's own (shown with --task)"),
    verbaliser_scoring: str | None = typer.Option(None, "--verbaliser-scoring", help="how label continuations "
                                                  f"are compared: {', '.join(VERBALISER_SCORINGS)}; default: sum, "
                                                  "or per_token when the verbalisers differ in token length"),
    as_json: bool = typer.Option(False, "--json", help="print the result as one JSON object"),
    per_example: bool = typer.Option(False, "--per-example", help="with --json: include per-example results"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="on failure, also print the traceback"),
) -> None:
    """Print a task metric for a model (label likelihood: the task's metric; or perplexity)."""
    from dtr.cli import start_work
    from dtr_core.evaluation import ClassificationTask, evaluate, get_task, with_options
    from dtr_core.models import load_model
    from dtr_core.preflight import check_model_source

    task_obj = with_options(get_task(task), metric, verbaliser_scoring)  # a bad task or metric: before the model
    examples = task_obj.split(split)
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    if isinstance(task_obj, ClassificationTask):
        task_obj.check_metric_defined(examples[:limit], f"the first {len(examples[:limit])} {split} examples")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    check_model_source(model)  # a missing or damaged model: one line, exit 2
    start_work()
    loaded_model, tokenizer = load_model(model)
    result = evaluate(loaded_model, tokenizer, task_obj, split=split, limit=limit, batch_size=batch_size)
    if as_json:
        typer.echo(json.dumps({"model": model, **result.to_dict(per_example=per_example)}, indent=None))
        return
    others = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if k != result.metric)
    scoring = f"; verbalisers compared {result.verbaliser_scoring}" if result.verbaliser_scoring else ""
    typer.echo(f"{result.task}/{result.split} (n={result.n}, {result.seconds:.1f} s): "
               f"{result.metric} {result.metrics[result.metric]:.4f}  [{others}{scoring}]")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
