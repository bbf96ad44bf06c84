"""Students for the benchmarks that need distilled ones (placements, recall) and the budget they share.

`ensure_students` captures the teacher's activations and distils the asked layers into
`work_dir/<model>-<mixer>-t<tokens>-s<seq_len>-n<steps>/{activations,students}`: one folder per budget (a quick
run never overwrites the students of a full one), finished layers reused by distillation's content hash.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness import REPO_ROOT
from dtr_core.distill.config import (CAPTURE_SEQ_LEN, CAPTURE_TOKENS, RANDOM_TEACHER_MAX_NORMALIZED_LOSS,
                                     DistillConfig)
from dtr_core.models import RANDOM_CONFIGS

logger = logging.getLogger("benchmarks.students")

# the pipeline's default distillation budget (`dtr_core.distill.config`, which `DistillBudget` takes its
# defaults from), so the students are the same
DISTILL = dict(distill_tokens=CAPTURE_TOKENS, distill_seq_len=CAPTURE_SEQ_LEN, distill_steps=DistillConfig.steps)
DISTILL_BATCH = DistillConfig.batch_size
QUICK_DISTILL = dict(distill_tokens=1024, distill_seq_len=128, distill_steps=4)  # the --quick budget
WORK_DIR = str(REPO_ROOT / "runs" / "bench")  # students and activations distilled by the benchmarks (reused)


def distill_config(steps: int, seed: int = 0) -> DistillConfig:
    """The DistillConfig of the pipeline's `DistillBudget` with these steps."""
    return DistillConfig.for_steps(steps, seed=seed)


def ensure_students(model, tokenizer, model_name: str, mixer: str, work_dir: str | os.PathLike,
                    layers: Sequence[int], tokens: int, seq_len: int, steps: int) -> dict:
    """Capture + distil `layers`, reusing finished work; {"dir", "seconds", "distilled", "reused", "failed", ...}."""
    from dtr_core.distill.capture import capture_activations
    from dtr_core.run_layout import slug
    from dtr_core.distill.corpus import load_corpus, token_chunks
    from dtr_core.distill.training import distill_layer

    root = Path(work_dir) / f"{slug(model_name)}-{mixer}-t{tokens}-s{seq_len}-n{steps}"
    started = time.perf_counter()
    token_ids = token_chunks(load_corpus("bbc"), tokenizer, seq_len, tokens)
    # every layer is captured (whatever `layers` is), so a later call for other layers reuses the capture
    manifest = capture_activations(model, token_ids, root / "activations",
                                   metadata={"corpus": "bbc", "token_budget": tokens, "seq_len": seq_len})
    config = distill_config(steps)
    if model_name in RANDOM_CONFIGS:  # a teacher with random weights: its students cannot beat the mean
        config = dataclasses.replace(config, max_normalized_loss=RANDOM_TEACHER_MAX_NORMALIZED_LOSS)
    distilled, reused, failed = [], [], []
    for layer in layers:
        result = distill_layer(model, layer, root / "activations", mixer, config, root / "students")
        (reused if result.reused else distilled if result.ok else failed).append(layer)
        logger.info("students: layer %d %s (normalised loss %s)", layer,
                    "reused" if result.reused else result.status, result.normalized_loss)
    return {"dir": str(root / "students"), "seconds": time.perf_counter() - started, "distilled": distilled,
            "reused": reused, "failed": failed, "capture_reused": bool(manifest.get("reused", False)),
            "config": config.to_dict(), "tokens": manifest["num_tokens"], "seq_len": seq_len}
