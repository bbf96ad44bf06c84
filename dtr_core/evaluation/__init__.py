"""Task evaluation for DtR: task registry, deterministic splits, label-likelihood and perplexity scoring.

Files: `tasks.py` (Example, Task kinds), `splits.py` (stratified splits), `datasets_builtin.py` (data
shipped in registry packages), `user_tasks.py` (csv/jsonl/parquet via `TaskSpec`), `registry.py`
(`TASKS`, `get_task`), `scoring.py` (encode -> logits -> score, reusable by the fast search),
`metrics.py` (accuracy, macro-F1, perplexity, score transforms, early-rejection bound),
`results.py` (`evaluate`, `EvalResult`).

The task registry and task data import no torch, so argument checks stay fast; the scoring names
(from `results.py` and `scoring.py`) are imported on first use.
"""

import importlib

from dtr_core.evaluation.metrics import accuracy, aggregate_score, macro_f1, perplexity, score_upper_bound
from dtr_core.evaluation.registry import TASKS, get_task
from dtr_core.evaluation.splits import SPLIT_NAMES, stratified_split
from dtr_core.evaluation.tasks import ClassificationTask, Example, LanguageModelingTask, Task
from dtr_core.evaluation.user_tasks import TaskSpec

__all__ = [
    "TASKS", "SPLIT_NAMES", "BatchScores", "ClassificationTask", "EncodedBatch", "EvalResult", "Example",
    "LanguageModelingTask", "Task", "TaskSpec", "accuracy", "aggregate_score", "encode", "evaluate",
    "get_task", "macro_f1", "model_logits", "perplexity", "score_logits", "score_upper_bound",
    "stratified_split", "summarize",
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
