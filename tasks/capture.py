"""Task: capture the teacher's attention inputs/outputs for distillation (one `dtr_core.distill.capture` call)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import runtime
from tasks.context import RunContext
from tasks.params import DistillBudget


@task(name="capture-activations", cache_policy=NO_CACHE)
def capture_task(ctx: RunContext, budget: DistillBudget) -> dict[str, Any]:
    """Teacher activations of every layer on `budget.tokens` corpus tokens -> `activations/` (reused when complete).

    Returns a small summary of the manifest (layers, sequences, seconds, reused).
    """
    from dtr_core.distill.capture import capture_activations
    from dtr_core.distill.corpus import load_corpus, token_chunks

    with runtime.torch_threads(ctx.threads):
        teacher, tokenizer = runtime.teacher(ctx.model)
        token_ids = token_chunks(load_corpus(budget.corpus), tokenizer, budget.seq_len, budget.tokens)
        manifest = capture_activations(teacher, token_ids, ctx.layout.activations,
                                       metadata={"corpus": budget.corpus, "token_budget": budget.tokens,
                                                 "seq_len": budget.seq_len})
    return {"layers": manifest["layers"], "num_sequences": manifest["num_sequences"], "seq_len": manifest["seq_len"],
            "num_tokens": manifest["num_tokens"], "seconds": manifest["seconds"],
            "reused": bool(manifest.get("reused", False)), "content_hash": manifest["content_hash"]}
