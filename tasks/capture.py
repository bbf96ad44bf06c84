"""Task: capture the teacher's attention inputs/outputs for distillation (one `dtr_core.distill.capture` call)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks import runtime


@task(name="capture-activations", cache_policy=NO_CACHE)
def capture_task(model: str, corpus: str, tokens: int, seq_len: int, out_dir: str, threads: int) -> dict[str, Any]:
    """Teacher activations of every layer on `tokens` corpus tokens -> `out_dir` (reused when complete).

    Returns a small summary of the manifest (layers, sequences, seconds, reused).
    """
    from dtr_core.distill.capture import capture_activations
    from dtr_core.distill.corpus import load_corpus, token_chunks

    with runtime.torch_threads(threads):
        teacher, tokenizer = runtime.teacher(model)
        token_ids = token_chunks(load_corpus(corpus), tokenizer, seq_len, tokens)
        manifest = capture_activations(teacher, token_ids, out_dir,
                                       metadata={"corpus": corpus, "token_budget": tokens, "seq_len": seq_len})
    return {"layers": manifest["layers"], "num_sequences": manifest["num_sequences"], "seq_len": manifest["seq_len"],
            "num_tokens": manifest["num_tokens"], "seconds": manifest["seconds"],
            "reused": bool(manifest.get("reused", False)), "content_hash": manifest["content_hash"]}
