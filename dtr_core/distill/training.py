"""What distilling one layer leaves: its `LayerResult`, its artefacts, and the student's own numerics.

The training loop is `dtr_core.distill.block.distill_block`; this module holds what it shares with the
readers of its output (the search, the hybrid builder, the benchmarks):

- `LayerResult`: losses, status and reason of one layer (stored in `meta.json`);
- artefacts (`students_dir/layer_007/`): `weights.safetensors` (student state dict) then `meta.json`
  (the completion marker), both inside one atomically renamed folder (`save_layer`). `meta.json` carries
  `key` (`dtr_core.distill.block.layer_key`: everything that determines the trained weights) and
  `weights_sha256`. A completed layer with the same key whose weights still match that hash is reused
  without training, judged against the current threshold (`rejudge` rewrites `meta.json` when the verdict
  changes). Weights that are missing, unreadable or changed on disk are not reused (`weights_problem`):
  the layer is trained again with a warning, and the same seed gives the same weights bit for bit;
- the verdict (`judge`): a student that trains to finite weights but whose held-out normalised loss is
  at or above `DistillConfig.max_normalized_loss` (default 1.0: no better than predicting each channel's
  mean) is failed, with a reason naming the loss and the threshold. Its weights are kept, so a later run
  with another threshold re-judges it without training. A non-finite loss or gradient norm fails a layer
  without weights. `load_students` never loads a failed layer, so the search never offers one;
- `calibrate_output_scale`: the least-squares rescaling of an untrained student's output on one batch;
  `rope_for`: RoPE (cos, sin) of positions 0..T-1 from the model's own rotary embedding.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from dtr_core.artifacts import atomic_dir, read_json, sha256_file, write_json
from dtr_core.distill.config import DistillConfig

logger = logging.getLogger(__name__)

DISTILL_FORMAT = 3  # bump when training semantics change, so old students are not reused
WEIGHTS = "weights.safetensors"
META = "meta.json"

@dataclass
class LayerResult:
    """What distilling one layer produced (JSON-able; stored in `meta.json`)."""

    layer: int
    mixer: str
    status: str  # "ok" | "failed"
    key: str
    reason: str | None = None  # why it failed
    output_scale: float | None = None  # factor the untrained student's output was rescaled by (calibrate_output)
    initial_loss: float | None = None  # held-out MSE of the student before training (after output rescaling)
    final_loss: float | None = None  # held-out MSE after training
    initial_normalized_loss: float | None = None  # initial_loss / Var(teacher output), held out
    normalized_loss: float | None = None  # final_loss / Var(teacher output), held out
    max_normalized_loss: float | None = None  # the threshold the status was judged against
    best_train_loss: float | None = None  # lowest training-batch MSE seen
    final_train_loss: float | None = None  # training-batch MSE of the last step
    steps: int = 0  # optimiser steps completed
    tokens: int = 0  # training tokens seen (steps x tokens per step)
    eval_sequences: int = 0
    seconds: float = 0.0
    reused: bool = False  # returned from an earlier completed run, no training

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LayerResult:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def layer_dir(students_dir: str | os.PathLike, layer_idx: int) -> Path:
    return Path(students_dir) / f"layer_{layer_idx:03d}"


def save_layer(target_dir: Path, meta: dict[str, Any], student: nn.Module | None, mixer_name: str) -> None:
    """The layer's folder, atomically: the weights (when training finished with finite ones, kept even if judged
    failed) and their sha256 in `meta.json`, written last (the completion marker)."""
    with atomic_dir(target_dir) as tmp:
        if student is not None:
            state = {name: t.detach().to("cpu").contiguous() for name, t in student.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS), metadata={"mixer": mixer_name, "layer": str(meta["layer"])})
            meta["weights_sha256"] = sha256_file(tmp / WEIGHTS)
        write_json(tmp / META, meta)


def log_result(result: LayerResult) -> None:
    if result.ok:
        logger.info("distill layer %d (%s): eval mse %.4g -> %.4g, normalised %.3f -> %.3f, %d steps, %.1fs",
                    result.layer, result.mixer, result.initial_loss, result.final_loss,
                    result.initial_normalized_loss, result.normalized_loss, result.steps, result.seconds)
    else:
        logger.warning("distill layer %d (%s) failed: %s", result.layer, result.mixer, result.reason)


def judge(result: LayerResult, max_normalized_loss: float) -> None:
    """Set the status of a trained student (finite `normalized_loss`) from its held-out normalised loss."""
    result.max_normalized_loss = max_normalized_loss
    if result.normalized_loss >= max_normalized_loss:
        result.status = "failed"
        result.reason = (f"held-out normalised loss {result.normalized_loss:.4g} is at or above max_normalized_loss "
                         f"{max_normalized_loss} (1.0: no better than predicting the mean)")
    else:
        result.status, result.reason = "ok", None


def rejudge(directory: Path, meta: dict[str, Any], config: DistillConfig) -> LayerResult:
    """A reused student judged against `config`'s threshold; `meta.json` is rewritten if the verdict changed."""
    result = LayerResult.from_dict(meta)
    before = (result.status, result.reason, result.max_normalized_loss)
    judge(result, config.max_normalized_loss)
    if (result.status, result.reason, result.max_normalized_loss) != before:
        if result.status != before[0]:
            logger.warning("distill layer %d: reused student is now %s against max_normalized_loss %s "
                           "(normalised loss %.4g)", result.layer, result.status, config.max_normalized_loss,
                           result.normalized_loss)
        write_json(directory / META, {**meta, "status": result.status, "reason": result.reason,
                                      "max_normalized_loss": result.max_normalized_loss,
                                      "config": config.to_dict()})
    result.reused = True
    return result


def weights_problem(directory: Path, meta: dict[str, Any]) -> str | None:
    """Why the weights file of a completed layer cannot be trusted, or None if it matches its meta.json."""
    path = directory / WEIGHTS
    if not meta.get("weights_sha256"):
        return f"{directory / META} records no weights (its training failed)"
    if not path.is_file():
        return f"{path} is missing"
    try:
        digest = sha256_file(path)
    except OSError as error:
        return f"{path} cannot be read ({error})"
    if digest != meta.get("weights_sha256"):
        return f"{path} does not match the sha256 recorded in its meta.json (the file changed after it was written)"
    return None


@torch.no_grad()
def calibrate_output_scale(student: nn.Module, x: torch.Tensor, y: torch.Tensor, rope) -> float:
    """Rescale the untrained student's output by the least-squares factor onto the teacher's, on one batch.

    The copied-weights student's output norm has weight 1, which is far from the teacher's scale (held-out
    normalised losses of 3-3000 on smollm2-135m); one scalar fixes most of that before the first step. The
    factor is floored at a tenth of the norm ratio, so an anti-correlated start cannot switch the output off.
    """
    prediction, _ = student(hidden_states=x, position_embeddings=expand_rope(rope, len(x)))
    prediction, target = prediction.double().flatten(), y.double().flatten()
    fit = float(prediction @ target / (prediction @ prediction))
    floor = 0.1 * float(target.norm() / prediction.norm())
    if not (math.isfinite(fit) and math.isfinite(floor) and floor > 0):
        return 1.0  # nothing to fit: a non-finite start is reported by the held-out evaluation
    factor = max(fit, floor)
    student.scale_output(factor)
    return factor


@torch.no_grad()
def rope_for(model: PreTrainedModel, seq_len: int, device: torch.device, layer: int = 0
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(cos, sin), each (1, T, rotary dim) fp32, for positions 0..T-1 from the model's own rotary embedding, as
    decoder layer `layer` receives them (None for a family without RoPE; `dtr_core.families`)."""
    from dtr_core.families import rotary_embeddings

    return rotary_embeddings(model, torch.arange(seq_len, device=device).unsqueeze(0), layer)


def expand_rope(rope: tuple[torch.Tensor, torch.Tensor] | None, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if rope is None:
        return None
    cos, sin = rope
    return cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)


def read_meta(directory: Path) -> dict[str, Any] | None:
    """The layer's meta.json, or None if there is none or it cannot be read (the layer is then trained again)."""
    path = directory / META
    if not path.is_file():
        return None
    try:
        meta = read_json(path)
    except (OSError, ValueError) as error:
        logger.warning("distill: %s cannot be read (%s); the layer is distilled again", path, error)
        return None
    return meta if isinstance(meta, dict) else None


def read_layer_results(students_dir: str | os.PathLike) -> dict[int, LayerResult]:
    """Results of every completed layer folder (ok or failed) under `students_dir`, by layer.

    A meta.json that cannot be read raises ValueError naming it and the fix (`distill_block` rewrites it).
    """
    results: dict[int, LayerResult] = {}
    for meta_path in sorted(Path(students_dir).glob("layer_*/" + META)):
        try:
            meta = read_json(meta_path)
            result = LayerResult.from_dict(meta)
        except (OSError, ValueError, TypeError, AttributeError) as error:
            raise ValueError(f"{meta_path} cannot be read ({error}): run the same conversion again (same options) "
                             f"to distil that layer again") from None
        results[result.layer] = result
    return results


def load_students(
    students_dir: str | os.PathLike,
    model: PreTrainedModel,
    mixer_name: str | None = None,
    layers: list[int] | None = None,
) -> dict[int, nn.Module]:
    """Freshly built students with their distilled weights, for every ok layer (failed ones excluded).

    `layers` restricts to those layers (missing or failed ones are skipped with a warning);
    `mixer_name`, if given, must match what each layer was distilled with (else ValueError).
    A weights file that is missing, unreadable or does not match the sha256 in its meta.json is never
    loaded: ValueError naming the file and the fix (run the same conversion again: `distill_block`
    trains such a layer again). Students get the model's device and dtype, in eval mode.
    """
    from dtr_core.mixers import MixerConfig, build_student

    results = read_layer_results(students_dir)
    wanted = sorted(results) if layers is None else sorted(set(layers))
    parameter = next(model.parameters())
    students: dict[int, nn.Module] = {}
    for layer_idx in wanted:
        result = results.get(layer_idx)
        if result is None or not result.ok:
            logger.warning("load_students: layer %d skipped (%s)", layer_idx,
                           "not distilled" if result is None else f"failed: {result.reason}")
            continue
        if mixer_name is not None and result.mixer != mixer_name:
            raise ValueError(f"layer {layer_idx} in {students_dir} was distilled with mixer "
                             f"'{result.mixer}', not '{mixer_name}'")
        directory = layer_dir(students_dir, layer_idx)
        meta = read_json(directory / META)
        weights_path = directory / WEIGHTS
        problem = weights_problem(directory, meta)
        if problem is not None:
            raise ValueError(f"layer {layer_idx}'s student cannot be loaded: {problem}; run the same conversion "
                             f"again (same options): it distils layer {layer_idx} again and replaces the file")
        student = build_student(result.mixer, model.config, layer_idx, MixerConfig.from_dict(meta["mixer_config"]))
        student.load_state_dict(load_file(str(weights_path)), strict=True)
        students[layer_idx] = student.to(device=parameter.device, dtype=parameter.dtype).eval()
    return students
