"""Sub-flow `benchmark`: prefill latency, decode rate and cache size of models at one context length.

Models are measured in one task, their repeats interleaved (round r measures every model once), so a drift
in the machine's speed reaches all of them alike (timings of different runs do not compare); speedups are
relative to the first model. The models are all in memory at once (for `dtr convert`: the teacher, M_best
and, when it differs, M_opt).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from dtr_core.speed import speedup
from flows.run_names import run_name
from tasks.params import ConvertParams, SpeedParams
from tasks.runtime import serial_threads
from tasks.speed import speed_task


@flow(name="benchmark", task_runner=ThreadPoolTaskRunner(max_workers=1),
      flow_run_name=run_name("benchmark"),
      description="Prefill/decode speed and cache size of models at a long context")
def benchmark(
    models: list[str] = [ConvertParams.model_fields["model"].default],  # noqa: B006 - Prefect needs a literal default for the UI form
    labels: list[str] | None = None,
    speed: SpeedParams = SpeedParams(),
) -> list[dict[str, Any]]:
    """One `SpeedResult` dict per model (+ speedups vs the first model)."""
    logger = get_run_logger()
    labels = labels or list(models)
    if len(labels) != len(models):
        raise ValueError(f"{len(labels)} labels for {len(models)} models")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels}")
    results = speed_task(models, labels, speed.context_len, speed.decode_tokens, speed.repeats, serial_threads(),
                         speed.long_context_len)
    for result in results[1:]:
        result.update(speedup(results[0], result))
    for result in results:
        logger.info("%s at %d tokens: prefill %.2fs, decode %.1f tok/s, cache %.1f MB", result["label"],
                    speed.context_len, result["prefill_seconds"], result["decode_tokens_per_second"],
                    result["cache_bytes"] / 2**20)
        if result["long_context_len"] is not None:
            logger.info("%s at %d tokens (synthetic cache): decode %.1f tok/s, cache %.1f MB", result["label"],
                        result["long_context_len"], result["long_decode_tokens_per_second"],
                        result["long_cache_bytes"] / 2**20)
    return results
