"""The heal stage of a conversion: build a searched hybrid from its students, heal it, save it as an export.

`runs/<id>/hybrids/healed/` is an ordinary exported hybrid folder (`dtr_core.hybrid.export`), whose
`dtr_export.json` also holds the `HealResult`. Its key hashes the unhealed hybrid's export key, the heal
config and the corpus (its source and tokenizer), so a rerun with the same settings reuses it. A heal that fails (it diverged) writes
nothing: the unhealed hybrids are what the run keeps.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dtr_core.artifacts import hash_json, reuse_or_compute
from dtr_core.distill.corpus import Corpus
from dtr_core.heal.config import HealConfig
from dtr_core.heal.task_text import TaskTextCorpus
from dtr_core.heal.training import ProgressCallback, heal
from dtr_core.hybrid.build import build_hybrid
from dtr_core.hybrid.export import EXPORT_INFO, export_key, read_export_info, save_export

logger = logging.getLogger(__name__)

HEAL_FORMAT = 1


def heal_export(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, students_dir: str | os.PathLike,
                layers: list[int], mixer: str, out_dir: str | os.PathLike, config: HealConfig, corpus: str,
                state_dir: str | os.PathLike, metadata: dict[str, Any] | None = None,
                progress: ProgressCallback | None = None, task_texts: list[str] | None = None) -> dict[str, Any]:
    """Heal the hybrid of `teacher` with `layers` linear on `corpus` and save it into `out_dir`.

    `state_dir` holds the heal's checkpoint while it runs (a killed heal continues from it). Returns
    {"heal": HealResult dict, "reused": bool} plus the export record when the heal succeeded (then `out_dir`
    holds the healed hybrid); nothing is written to `out_dir` when it failed. `task_texts`: the task's train
    text (`task_text.task_lm_texts`), needed when `config.task_lm_weight` > 0 (then its hash is in the key).
    """
    if not layers:
        raise ValueError("heal needs a hybrid with at least one linear-attention layer; the search committed none")
    out_dir = Path(out_dir)
    text = Corpus(corpus, tokenizer)
    task_corpus = None
    if config.task_lm_weight:
        if task_texts is None:
            raise ValueError("task_lm_weight > 0 needs the task's train text (task_texts)")
        task_corpus = TaskTextCorpus(task_texts, tokenizer)
    key = hash_json({"format": HEAL_FORMAT, "export": export_key(teacher, students_dir, layers, mixer),
                     "heal": config.defining_dict(), "corpus": text.identity,
                     **({"task_text": task_corpus.identity} if task_corpus is not None else {})})

    def compute() -> dict[str, Any]:
        hybrid = build_hybrid(teacher, layers, mixer, students_dir=students_dir)
        result = heal(teacher, hybrid, text, config, progress, state_dir=state_dir, key=key, task_corpus=task_corpus)
        if not result.ok:
            return {"key": key, "heal": result.to_dict()}  # not a completion record: nothing is saved
        return save_export(hybrid, tokenizer, out_dir, key, mixer,
                           {**(metadata or {}), "role": "healed", "heal": result.to_dict()})

    info, reused = reuse_or_compute(out_dir / EXPORT_INFO, key, compute,
                                    read=lambda path: read_export_info(path.parent), write=False,
                                    label="heal", log=logger)
    heal_record = info.get("heal") or info["metadata"]["heal"]
    return {**info, "heal": heal_record, "reused": reused}
