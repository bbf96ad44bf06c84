"""Task: score a model (teacher, or an exported hybrid folder) on task splits (one `evaluate` call per split).

Results are stored as JSON next to the run (`reports/eval_<label>.json`) with a key over the model, the task
and the limits (`dtr_core.artifacts.reuse_or_compute`), so a resumed run does not evaluate the same model twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import runtime
from tasks.params import TaskParams


def _model_key(model: str) -> str:
    """What identifies the model's weights: the export key of a hybrid folder, else the source string
    (built-in names are fixed), plus a content fingerprint for other folders and hub ids."""
    from dtr_core.hybrid.export import read_export_info
    from dtr_core.models import BUILTIN_MODELS, model_fingerprint

    info = read_export_info(model) if Path(model).is_dir() else None
    if info is not None:
        return f"export:{info['key']}"
    if model in BUILTIN_MODELS:
        return f"builtin:{model}"
    return f"weights:{model_fingerprint(runtime.teacher(model)[0])}"


@task(name="evaluate", cache_policy=NO_CACHE, task_run_name="evaluate-{label}")
def evaluate_task(model: str, task_params: TaskParams, splits: dict[str, int | None], label: str,
                  out_file: str | None, threads: int, per_example: bool = False) -> dict[str, dict[str, Any]]:
    """{split: EvalResult.to_dict()} for each split (first `limit` examples; None = all)."""
    from dtr_core.artifacts import hash_json, reuse_or_compute

    def score() -> dict[str, Any]:  # stored with per-example values, so every caller can reuse it
        return {"model": model, "results": _evaluate(model, task_params, splits, threads)}

    if out_file is None:
        results = score()["results"]
    else:
        key = hash_json({"model": _model_key(model), "task": task_params.model_dump(mode="json"), "splits": splits})
        results = reuse_or_compute(out_file, key, score, label=f"evaluate {label}")[0]["results"]
    if per_example:
        return results
    drop = ("per_example", "weights", "predictions", "label_logprobs")
    return {split: {k: v for k, v in result.items() if k not in drop} for split, result in results.items()}


def _evaluate(model: str, task_params: TaskParams, splits: dict[str, int | None], threads: int) -> dict[str, Any]:
    from dtr_core.evaluation import evaluate
    from dtr_core.models import load_model

    with runtime.torch_threads(threads):
        if Path(model).is_dir() and (Path(model) / "dtr_export.json").is_file():
            loaded, tokenizer = load_model(model)  # an exported hybrid: used once, not cached
        else:
            loaded, tokenizer = runtime.teacher(model)
        task_obj = runtime.task(task_params)
        return {split: evaluate(loaded, tokenizer, task_obj, split, limit=limit).to_dict(per_example=True)
                for split, limit in splits.items()}
