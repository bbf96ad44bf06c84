"""Students for the benchmarks that need distilled ones (placements, recall) and the budget they share.

`ensure_students` distils the asked layers (one block: the teacher streams the BBC corpus once for all of them)
into `work_dir/<model>-<mixer>-t<tokens>-s<seq_len>-n<steps>/students`: one folder per budget (a quick run never
overwrites the students of a full one), finished layers reused by their key (then the teacher does not run).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.harness import REPO_ROOT
from dtr_core.distill.config import RANDOM_TEACHER_MAX_NORMALIZED_LOSS, SEQ_LEN, TOKENS, DistillConfig
from dtr_core.models import RANDOM_CONFIGS

logger = logging.getLogger("benchmarks.students")

# the pipeline's default distillation budget (`dtr_core.distill.config`, which `DistillBudget` takes its
# defaults from), so the students are the same
DISTILL = dict(distill_tokens=TOKENS, distill_seq_len=SEQ_LEN, distill_steps=DistillConfig.steps)
DISTILL_BATCH = DistillConfig.batch_size
QUICK_DISTILL = dict(distill_tokens=1024, distill_seq_len=128, distill_steps=4)  # the --quick budget
WORK_DIR = str(REPO_ROOT / "runs" / "bench")  # students distilled by the benchmarks (reused)


def distill_config(steps: int | None, seed: int = 0, tokens: int = TOKENS, seq_len: int = SEQ_LEN) -> DistillConfig:
    """The DistillConfig of the pipeline's `DistillBudget` with these steps (None: from the tokens)."""
    return DistillConfig.for_tokens(tokens, steps, seq_lens=(seq_len,), seed=seed)


def ensure_students(model, tokenizer, model_name: str, mixer: str, work_dir: str | os.PathLike,
                    layers: Sequence[int], tokens: int, seq_len: int, steps: int | None) -> dict:
    """Distil `layers`, reusing finished ones; {"dir", "seconds", "distilled", "reused", "failed", "teacher_ran", ...}.

    `tokens` training tokens per layer in sequences of `seq_len` (`steps`, when given, overrides them)."""
    from dtr_core.distill.block import distill_block
    from dtr_core.distill.corpus import Corpus
    from dtr_core.run_layout import slug

    root = Path(work_dir) / f"{slug(model_name)}-{mixer}-t{tokens}-s{seq_len}-n{steps}"
    started = time.perf_counter()
    config = distill_config(steps, tokens=tokens, seq_len=seq_len)
    if model_name in RANDOM_CONFIGS:  # a teacher with random weights: its students cannot beat the mean
        config = dataclasses.replace(config, max_normalized_loss=RANDOM_TEACHER_MAX_NORMALIZED_LOSS)
    results = distill_block(model, list(layers), mixer, config, Corpus("bbc", tokenizer), root / "students")
    distilled, reused, failed = [], [], []
    for result in results:
        (reused if result.reused else distilled if result.ok else failed).append(result.layer)
        logger.info("students: layer %d %s (normalised loss %s)", result.layer,
                    "reused" if result.reused else result.status, result.normalized_loss)
    return {"dir": str(root / "students"), "seconds": time.perf_counter() - started, "distilled": distilled,
            "reused": reused, "failed": failed, "teacher_ran": not all(r.reused for r in results),
            "config": config.to_dict(), "tokens": config.steps * config.tokens_per_step, "seq_len": seq_len}
