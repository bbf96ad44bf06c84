"""Task evaluation for DtR: task registry, deterministic splits, label-likelihood and perplexity scoring.

Files: `tasks.py` (Example, Task kinds), `splits.py` (stratified splits), `datasets_builtin.py` (data
shipped in registry packages), `user_tasks.py` (csv/jsonl/parquet via `TaskSpec`), `registry.py`
(`TASKS`, `get_task`), `scoring.py` (encode -> logits -> score, reusable by the fast search),
`generation.py` (batched greedy generation, left-padded, with the hybrid cache), `text_metrics.py` (exact
match, token F1, ROUGE-L, regex answers), `metrics.py` (accuracy, macro-F1, balanced accuracy, per-class
recall, perplexity; the early-rejection bounds),
`results.py` (`evaluate`, `EvalResult`).

The task registry and task data import no torch, so argument checks stay fast; the scoring names
(from `results.py` and `scoring.py`) are imported on first use.
"""

import importlib

from dtr_core.evaluation.metrics import (
    CLASSIFICATION_METRICS, Confusion, accuracy, aggregate_score, balanced_accuracy, macro_f1, perplexity,
    score_upper_bound,
)
from dtr_core.evaluation.registry import TASKS, get_task, task_list
from dtr_core.evaluation.splits import SPLIT_NAMES, stratified_split
from dtr_core.evaluation.tasks import (
    VERBALISER_SCORINGS, ClassificationTask, Example, GenerativeTask, LanguageModelingTask, Task, with_options,
)
from dtr_core.evaluation.user_tasks import TaskSpec

__all__ = [
    "CLASSIFICATION_METRICS", "TASKS", "SPLIT_NAMES", "VERBALISER_SCORINGS", "BatchScores", "ClassificationTask",
    "Confusion", "EncodedBatch", "EvalResult", "Example", "GenerativeTask", "LanguageModelingTask", "Task", "TaskSpec",
    "accuracy",
    "aggregate_score", "balanced_accuracy", "encode", "evaluate", "get_task", "macro_f1", "model_logits",
    "perplexity", "score_logits", "score_upper_bound", "stratified_split", "summarize", "task_list", "with_options",
]

_TORCH_NAMES = {
    "EvalResult": "results", "evaluate": "results", "summarize": "results",
    "BatchScores": "scoring", "EncodedBatch": "scoring", "encode": "scoring", "model_logits": "scoring",
    "score_logits": "scoring",
}


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        return getattr(importlib.import_module(f"dtr_core.evaluation.{_TORCH_NAMES[name]}"), name)
    raise AttributeError(f"module 'dtr_core.evaluation' has no attribute {name!r}")
