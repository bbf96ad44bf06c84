"""Build and save a hybrid from a model and a layer set (what `dtr hybridize` runs).

Students come from a distillation output folder when one is given (`runs/<id>/students`), else they
are freshly initialised from the teacher's attention (copied q/k/v/o; see `dtr_core/mixers/base.py`).
Everything is validated before anything is written, and the folder appears complete or not at all.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dtr_core.artifacts import atomic_dir
from dtr_core.hybrid.model import make_hybrid
from dtr_core.mixers import MixerConfig, build_student, get_mixer_class
from dtr_core.hybrid.surgery import attention_module, check_layer_index, verify_family

logger = logging.getLogger(__name__)


def build_hybrid(
    model: PreTrainedModel,
    layers: list[int],
    mixer: str,
    students_dir: str | os.PathLike | None = None,
    mixer_config: MixerConfig | None = None,
) -> PreTrainedModel:
    """The hybrid of `model` with `layers` linear (distilled students if `students_dir`, else fresh)."""
    get_mixer_class(mixer)
    verify_family(model)  # a family outside the table: surgery must be exact before a hybrid is built on it
    for layer_idx in layers:
        check_layer_index(model, layer_idx)
    if students_dir is not None:
        from dtr_core.distill.training import load_students

        if not Path(students_dir).is_dir():
            raise FileNotFoundError(f"students folder {students_dir} does not exist; pass the `students` folder of a run")
        students = load_students(students_dir, model, mixer_name=mixer, layers=layers)
        missing = sorted(set(layers) - set(students))
        if missing:
            raise ValueError(f"no successfully distilled student for layers {missing} in {students_dir}")
    else:
        students = {
            layer_idx: build_student(mixer, model.config, layer_idx, mixer_config, attention_module(model, layer_idx))
            for layer_idx in layers
        }
    return make_hybrid(model, students, mixer_config)


def save_hybrid(
    hybrid: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out_dir: str | os.PathLike,
    overwrite: bool = False,
) -> Path:
    """`save_pretrained` (safetensors) of model and tokenizer into `out_dir`, atomically.

    An existing `out_dir` is replaced only if it is empty or a dtr artifact, or with `overwrite`
    (`dtr_core.artifacts.atomic_dir`).
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite, kind="hybrid") as staging:
        hybrid.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    logger.info("saved hybrid (%s) to %s", ",".join(hybrid.config.dtr_layer_mixers), out_dir)
    return out_dir
