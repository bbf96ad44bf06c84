"""Task: export M_best / M_opt as a save_pretrained hybrid folder (one `dtr_core.hybrid.export` call)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import runtime
from tasks.context import RunContext


@task(name="export-hybrid", cache_policy=NO_CACHE, task_run_name="export-{role}")
def export_task(ctx: RunContext, layers: list[int], role: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """Build and save the hybrid with `layers` linear into `hybrids/<role>`; returns its `dtr_export.json`
    contents (+ path)."""
    from dtr_core.hybrid.export import export_hybrid

    out_dir = ctx.layout.hybrid(role)
    with runtime.torch_threads(ctx.threads):
        teacher, tokenizer = runtime.teacher(ctx.model)
        info = export_hybrid(teacher, tokenizer, ctx.layout.students, layers, ctx.mixer, out_dir,
                             {"role": role, **metadata})
    return {**info, "path": str(out_dir)}
