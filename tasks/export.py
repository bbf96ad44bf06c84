"""Task: export M_best / M_opt as a save_pretrained hybrid folder (one `dtr_core.hybrid.export` call)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import runtime


@task(name="export-hybrid", cache_policy=NO_CACHE, task_run_name="export-{role}")
def export_task(model: str, students_dir: str, layers: list[int], mixer: str, out_dir: str, role: str,
                metadata: dict[str, Any], threads: int) -> dict[str, Any]:
    """Build and save the hybrid with `layers` linear; returns its `dtr_export.json` contents (+ path)."""
    from dtr_core.hybrid.export import export_hybrid

    with runtime.torch_threads(threads):
        teacher, tokenizer = runtime.teacher(model)
        info = export_hybrid(teacher, tokenizer, students_dir, layers, mixer, out_dir, {"role": role, **metadata})
    return {**info, "path": out_dir}
