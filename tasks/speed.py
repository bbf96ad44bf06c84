"""Task: measure prefill latency, decode rate and cache size of a model (one `dtr_core.speed` call)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import runtime


@task(name="measure-speed", cache_policy=NO_CACHE, task_run_name="speed-{label}")
def speed_task(model: str, label: str, context_len: int, decode_tokens: int, repeats: int,
               threads: int) -> dict[str, Any]:
    """`SpeedResult.to_dict()` of `model` (a source name or an exported hybrid folder)."""
    from dtr_core.models import load_model
    from dtr_core.speed import measure_speed

    with runtime.torch_threads(threads):
        if Path(model).is_dir() and (Path(model) / "dtr_export.json").is_file():
            loaded, _ = load_model(model)
        else:
            loaded, _ = runtime.teacher(model)
        return {"label": label, **measure_speed(loaded, context_len, decode_tokens, repeats=repeats).to_dict()}
