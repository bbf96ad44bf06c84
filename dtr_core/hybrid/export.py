"""Export a searched hybrid (M_best or M_opt) as a self-contained `save_pretrained` folder.

    runs/<run_id>/hybrids/best/   config.json (model_type dtr_<family>, dtr_layer_mixers), model.safetensors,
                                  tokenizer files, dtr_export.json (what this hybrid is and where it came from)

`dtr_export.json` is written inside the same atomically renamed folder, so a folder that has it is complete;
like every folder `atomic_dir` writes, it also carries the `.dtr-artifact` marker, and a non-dtr folder at
`out_dir` is never replaced (`dtr_core.artifacts`).
Its `key` hashes what determines the weights (teacher fingerprint, students' keys, layers, mixer): a folder
with the same key is reused, not rewritten. Loading needs only `import dtr_core.hybrid` and
`AutoModelForCausalLM.from_pretrained(folder)` (or `dtr_core.models.load_model(folder)`).
MLflow packaging of these folders lives in `tasks/` (dtr_core never imports MLflow).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dtr_core.artifacts import atomic_dir, hash_json, read_json, reuse_or_compute, write_json
from dtr_core.hybrid.build import build_hybrid
from dtr_core.hybrid.model import layer_map

logger = logging.getLogger(__name__)

EXPORT_FORMAT = 1
EXPORT_INFO = "dtr_export.json"

__all__ = ["EXPORT_INFO", "export_hybrid", "export_key", "read_export_info", "save_export"]


def read_export_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The `dtr_export.json` of a complete exported hybrid folder, else None."""
    path = Path(folder) / EXPORT_INFO
    return read_json(path) if path.is_file() else None


def _students_keys(students_dir: Path, layers: list[int]) -> dict[str, str]:
    keys = {}
    for layer in layers:
        meta_path = students_dir / f"layer_{layer:03d}" / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"no distilled student for layer {layer} in {students_dir}")
        keys[str(layer)] = read_json(meta_path)["key"]
    return keys


def export_key(teacher: PreTrainedModel, students_dir: str | os.PathLike, layers: list[int], mixer: str) -> str:
    """What determines an exported hybrid's weights: the teacher, the layers, the mixer and the students' keys."""
    from dtr_core.models import model_fingerprint

    layers = sorted(int(layer) for layer in layers)
    return hash_json({"format": EXPORT_FORMAT, "teacher": model_fingerprint(teacher), "layers": layers,
                      "mixer": mixer, "students": _students_keys(Path(students_dir), layers)})


def export_hybrid(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    students_dir: str | os.PathLike,
    layers: list[int] | tuple[int, ...],
    mixer: str,
    out_dir: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the hybrid of `teacher` with `layers` linear (students from `students_dir`) and save it.

    `metadata` (JSON-able: role, scores, run id...) is stored in `dtr_export.json`. Returns that dict,
    with `"reused": True` when a complete folder with the same key already existed.
    """
    students_dir, out_dir = Path(students_dir), Path(out_dir)
    layers = sorted(int(layer) for layer in layers)
    key = export_key(teacher, students_dir, layers, mixer)
    info, reused = reuse_or_compute(
        out_dir / EXPORT_INFO, key, lambda: _export(teacher, tokenizer, students_dir, layers, mixer, out_dir, key,
                                                    metadata),
        read=lambda path: read_export_info(path.parent), write=False, label="export", log=logger)
    return {**info, "reused": reused}


def _export(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, students_dir: Path, layers: list[int],
            mixer: str, out_dir: Path, key: str, metadata: dict[str, Any] | None) -> dict[str, Any]:
    hybrid = build_hybrid(teacher, layers, mixer, students_dir=students_dir)
    return save_export(hybrid, tokenizer, out_dir, key, mixer, metadata)


def save_export(hybrid: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike, key: str,
                mixer: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """Save `hybrid` into `out_dir` atomically, `dtr_export.json` (under `key`) last; returns that record."""
    kinds = layer_map(hybrid)
    linear = [index for index, kind in enumerate(kinds) if kind != "full"]
    info = {
        "format": EXPORT_FORMAT,
        "key": key,
        "linear_layers": linear,
        "num_layers": len(kinds),
        "layer_map": kinds,
        "mixer": mixer,
        "model_type": hybrid.config.model_type,
        "parameters": sum(p.numel() for p in hybrid.parameters()),
        "metadata": metadata or {},
    }
    with atomic_dir(out_dir, kind="hybrid-export") as staging:
        hybrid.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json(staging / EXPORT_INFO, info)  # last: the completion marker
    logger.info("export: %d linear layers %s -> %s", len(linear), linear, out_dir)
    return info
