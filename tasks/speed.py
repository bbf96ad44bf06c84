"""Task: measure prefill latency, decode rate and cache size of models, their repeats interleaved
(one `dtr_core.speed.measure_speeds` call)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import runtime


@task(name="measure-speed", cache_policy=NO_CACHE, task_run_name="speed-{context_len}")
def speed_task(models: list[str], labels: list[str], context_len: int, decode_tokens: int, repeats: int,
               threads: int, long_context_len: int | None = None) -> list[dict[str, Any]]:
    """`SpeedResult.to_dict()` plus `label` per model (a source name or an exported hybrid folder), in order."""
    from dtr_core.models import load_model
    from dtr_core.speed import measure_speeds

    def load(model: str):
        if Path(model).is_dir() and (Path(model) / "dtr_export.json").is_file():
            return load_model(model)[0]
        return runtime.teacher(model)[0]

    with runtime.torch_threads(threads):
        loaded = {label: load(model) for model, label in zip(models, labels, strict=True)}
        results = measure_speeds(loaded, context_len, decode_tokens, repeats=repeats, long_context_len=long_context_len)
    return [{"label": label, **result.to_dict()} for label, result in results.items()]
