"""Blockwise local distillation (BLD): train one linear-attention student per layer (DtR phase 1).

For layer l the student starts from the teacher attention's q/k/v/o (see `dtr_core/mixers/base.py`)
and is trained, alone, to reproduce the teacher attention's output from the teacher's own input
hidden states (teacher forcing, read from a capture made by `dtr_core.distill.capture`). Layers never
depend on each other, so they can run in any order, in parallel, or be retried one at a time.

Decisions the paper leaves open, taken here:
- target: the attention module's output *before* the residual add, loss = plain MSE over all
  elements (the paper's MSE(O_full, O_linear));
- optimiser: AdamW on the student's parameters only (betas 0.9/0.95, decay on matrices only),
  linear warm-up then cosine decay to `min_lr_ratio * lr`, gradient-norm clipping; fp32 training;
- batches: whole captured sequences (positions 0..T-1, RoPE from `model.model.rotary_emb`), drawn
  by seeded epoch-wise permutations of the training sequences;
- evaluation: the *last* `eval_fraction` of the captured sequences (at most `max_eval_sequences`)
  are held out from training; losses reported as "eval" are measured there. The normalised loss is
  MSE / Var(teacher output), the variance taken per hidden channel over all held-out tokens and
  averaged: 1.0 is as good as predicting each channel's mean, 0.0 is exact (it is 1 - R^2);
- saved weights are those after the last step (no early stopping, which would need the held-out
  set during training);
- a non-finite loss or gradient norm stops the layer: `meta.json` says `status: "failed"` with the
  reason and no weights file is written;
- a student that trains to finite weights but whose held-out normalised loss is at or above
  `DistillConfig.max_normalized_loss` (default 1.0: no better than predicting the mean) is failed too,
  with a reason naming the loss and the threshold. Its weights are kept, so a later run with another
  threshold re-judges it without training. `load_students` never loads a failed layer, so the search
  never offers one.

Artifacts (`out_dir/layer_007/`): `weights.safetensors` (student state dict) then `meta.json`
(the completion marker), both inside one atomically renamed folder. `meta.json` carries `key`, a
hash of everything that determines the trained weights (activations content hash, the teacher
attention's fingerprint, mixer, mixer config, DistillConfig without the verdict threshold, layer) and
`weights_sha256`. A completed layer with the same key whose weights still match that hash is returned
without training, judged against the current threshold (`meta.json` is rewritten when the verdict
changes). Weights that are missing, unreadable or changed on disk are not reused: the layer is trained
again with a warning, and the same seed gives the same weights bit for bit.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from dtr_core.artifacts import atomic_dir, hash_json, read_json, reuse_or_compute, sha256_file, write_json
from dtr_core.distill.capture import layer_manifest, open_layer_activations
from dtr_core.distill.config import DistillConfig

logger = logging.getLogger(__name__)

DISTILL_FORMAT = 2  # bump when training semantics change, so old students are not reused
WEIGHTS = "weights.safetensors"
META = "meta.json"

ProgressCallback = Callable[[int, int, float], None]


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
    tokens: int = 0  # training tokens seen (steps x batch x seq_len)
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


def distill_layer(
    model: PreTrainedModel,
    layer_idx: int,
    activations_dir: str | os.PathLike,
    mixer_name: str,
    config: DistillConfig,
    out_dir: str | os.PathLike,
    mixer_config: Any | None = None,
    progress: ProgressCallback | None = None,
) -> LayerResult:
    """Distil layer `layer_idx`'s attention into a `mixer_name` student; write `out_dir/layer_XXX/`.

    `model` is the teacher the activations in `activations_dir` were captured from (only its
    layer-`layer_idx` attention, for the weight copy, and its rotary embedding are used; it is not
    modified). `progress(step, total_steps, train_loss)` is called every `log_every` steps and at
    the end. Bad inputs raise ValueError before anything is written.
    """
    from dtr_core.mixers import MixerConfig, build_student, get_mixer_class
    from dtr_core.models import model_fingerprint
    from dtr_core.hybrid.surgery import attention_module, check_layer_index

    if not isinstance(config, DistillConfig):
        raise ValueError(f"config must be a DistillConfig, got {type(config).__name__}")
    get_mixer_class(mixer_name)  # unknown names raise listing the valid ones
    mixer_config = mixer_config if mixer_config is not None else MixerConfig()
    check_layer_index(model, layer_idx)
    manifest = layer_manifest(activations_dir, layer_idx)
    teacher_attention = attention_module(model, layer_idx)
    attention_fp = model_fingerprint(teacher_attention)
    if attention_fp != manifest["attention_fingerprints"][str(layer_idx)]:
        raise ValueError(f"layer {layer_idx}'s attention weights differ from those the activations in "
                         f"{activations_dir} were captured with: pass the same teacher model")
    n_seq, seq_len = manifest["num_sequences"], manifest["seq_len"]
    n_eval = min(config.max_eval_sequences, max(1, round(n_seq * config.eval_fraction)))
    if n_seq - n_eval < 1:
        raise ValueError(f"need at least 2 captured sequences (1 to train, 1 held out), got {n_seq}")

    key = hash_json({"format": DISTILL_FORMAT, "activations": manifest["content_hash"],
                     "attention": attention_fp, "mixer": mixer_name, "mixer_config": mixer_config.defining_dict(),
                     "config": config.defining_dict(), "layer": layer_idx})
    target_dir = layer_dir(out_dir, layer_idx)

    def train() -> dict[str, Any]:
        result, student, curve = _train(model, teacher_attention, layer_idx, activations_dir, mixer_name,
                                        mixer_config, config, n_eval, key, build_student, progress)
        result.tokens = result.steps * config.batch_size * seq_len
        meta = {**result.to_dict(), "format": DISTILL_FORMAT, "loss_curve": curve,
                "config": config.to_dict(), "mixer_config": mixer_config.to_dict(),
                "activations_content_hash": manifest["content_hash"], "activations_dir": str(activations_dir),
                "model_fingerprint": manifest["model_fingerprint"], "attention_fingerprint": attention_fp,
                "seq_len": seq_len, "eval_split": f"last {n_eval} of {n_seq} captured sequences"}
        _save_layer(target_dir, meta, student if result.normalized_loss is not None else None, mixer_name)
        _log_result(result)
        return meta

    meta, reused = reuse_or_compute(target_dir / META, key, train,
                                    problem=lambda stored: _weights_problem(target_dir, stored),
                                    read=lambda path: _read_meta(path.parent), write=False,
                                    label=f"distill layer {layer_idx}", log=logger)
    return _rejudge(target_dir, meta, config) if reused else LayerResult.from_dict(meta)


def _save_layer(target_dir: Path, meta: dict[str, Any], student: nn.Module | None, mixer_name: str) -> None:
    """The layer's folder, atomically: the weights (when training finished with finite ones, kept even if judged
    failed) and their sha256 in `meta.json`, written last (the completion marker)."""
    with atomic_dir(target_dir) as tmp:
        if student is not None:
            state = {name: t.detach().to("cpu").contiguous() for name, t in student.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS), metadata={"mixer": mixer_name, "layer": str(meta["layer"])})
            meta["weights_sha256"] = sha256_file(tmp / WEIGHTS)
        write_json(tmp / META, meta)


def _log_result(result: LayerResult) -> None:
    if result.ok:
        logger.info("distill layer %d (%s): eval mse %.4g -> %.4g, normalised %.3f -> %.3f, %d steps, %.1fs",
                    result.layer, result.mixer, result.initial_loss, result.final_loss,
                    result.initial_normalized_loss, result.normalized_loss, result.steps, result.seconds)
    else:
        logger.warning("distill layer %d (%s) failed: %s", result.layer, result.mixer, result.reason)


def _train(model, teacher_attention, layer_idx, activations_dir, mixer_name, mixer_config, config,
           n_eval, key, build_student, progress) -> tuple[LayerResult, nn.Module, list[list[float]]]:
    started = time.perf_counter()
    device = next(teacher_attention.parameters()).device
    inputs, outputs = open_layer_activations(activations_dir, layer_idx)  # memory-mapped [N, T, hidden]
    n_train = inputs.shape[0] - n_eval
    seq_len = inputs.shape[1]
    eval_x = inputs[n_train:].to(device, torch.float32)
    eval_y = outputs[n_train:].to(device, torch.float32)
    variance = _channel_variance(eval_y)
    rope = _rope(model, seq_len, device)

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        student = build_student(mixer_name, model.config, layer_idx, mixer_config,
                                teacher_attention=teacher_attention)
    student = student.to(device=device, dtype=torch.float32).train()
    result = LayerResult(layer=layer_idx, mixer=mixer_name, status="ok", key=key, eval_sequences=n_eval)

    def fail(reason: str) -> tuple[LayerResult, nn.Module, list[list[float]]]:
        result.status, result.reason = "failed", reason
        for name in ("initial_loss", "initial_normalized_loss", "final_loss"):  # keep meta.json valid JSON
            value = getattr(result, name)
            if value is not None and not math.isfinite(value):
                setattr(result, name, None)
        result.seconds = round(time.perf_counter() - started, 3)
        return result, student, curve

    curve: list[list[float]] = []  # [step, train loss, lr]
    if config.calibrate_output:
        first = slice(0, min(config.batch_size, n_train))
        result.output_scale = _calibrate_output_scale(student, inputs[first].to(device, torch.float32),
                                                      outputs[first].to(device, torch.float32), rope)
    result.initial_loss = _eval_mse(student, eval_x, eval_y, rope, config.batch_size)
    if not math.isfinite(result.initial_loss):
        return fail(f"non-finite held-out loss of the untrained student: {result.initial_loss}")
    result.initial_normalized_loss = result.initial_loss / variance

    decay = [p for p in student.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    params = decay + no_decay
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.empty(0, dtype=torch.long)
    best = math.inf
    for step in range(config.steps):
        if len(order) < config.batch_size:  # next epoch: a fresh seeded permutation
            order = torch.cat([order, torch.randperm(n_train, generator=generator)])
        batch, order = order[: config.batch_size], order[config.batch_size:]
        x = inputs[batch].to(device, torch.float32)  # (B, T, hidden)
        y = outputs[batch].to(device, torch.float32)
        prediction, _ = student(hidden_states=x, position_embeddings=_expand(rope, len(batch)))
        loss = F.mse_loss(prediction, y)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            return fail(f"non-finite training loss {loss_value} at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip).item()
        if not math.isfinite(grad_norm):
            return fail(f"non-finite gradient norm {grad_norm} at step {step + 1}")
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        best = min(best, loss_value)
        result.steps = step + 1
        result.final_train_loss = loss_value
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            curve.append([step + 1, loss_value, lr_now])
            logger.debug("distill layer %d step %d/%d loss %.4g lr %.3g",
                         layer_idx, step + 1, config.steps, loss_value, lr_now)
            if progress is not None:
                progress(step + 1, config.steps, loss_value)
    result.best_train_loss = best
    if not all(torch.isfinite(p).all() for p in student.parameters()):
        return fail("non-finite student parameters after training")
    result.final_loss = _eval_mse(student, eval_x, eval_y, rope, config.batch_size)
    if not math.isfinite(result.final_loss):
        return fail(f"non-finite held-out loss after training: {result.final_loss}")
    result.normalized_loss = result.final_loss / variance
    _judge(result, config.max_normalized_loss)
    result.seconds = round(time.perf_counter() - started, 3)
    return result, student, curve


def _judge(result: LayerResult, max_normalized_loss: float) -> None:
    """Set the status of a trained student (finite `normalized_loss`) from its held-out normalised loss."""
    result.max_normalized_loss = max_normalized_loss
    if result.normalized_loss >= max_normalized_loss:
        result.status = "failed"
        result.reason = (f"held-out normalised loss {result.normalized_loss:.4g} is at or above max_normalized_loss "
                         f"{max_normalized_loss} (1.0: no better than predicting the mean)")
    else:
        result.status, result.reason = "ok", None


def _rejudge(directory: Path, meta: dict[str, Any], config: DistillConfig) -> LayerResult:
    """A reused student judged against `config`'s threshold; `meta.json` is rewritten if the verdict changed."""
    result = LayerResult.from_dict(meta)
    before = (result.status, result.reason, result.max_normalized_loss)
    _judge(result, config.max_normalized_loss)
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


def _weights_problem(directory: Path, meta: dict[str, Any]) -> str | None:
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
def _calibrate_output_scale(student: nn.Module, x: torch.Tensor, y: torch.Tensor, rope) -> float:
    """Rescale the untrained student's output by the least-squares factor onto the teacher's, on one batch.

    The copied-weights student's output norm has weight 1, which is far from the teacher's scale (held-out
    normalised losses of 3-3000 on smollm2-135m); one scalar fixes most of that before the first step. The
    factor is floored at a tenth of the norm ratio, so an anti-correlated start cannot switch the output off.
    """
    prediction, _ = student(hidden_states=x, position_embeddings=_expand(rope, len(x)))
    prediction, target = prediction.double().flatten(), y.double().flatten()
    fit = float(prediction @ target / (prediction @ prediction))
    floor = 0.1 * float(target.norm() / prediction.norm())
    if not (math.isfinite(fit) and math.isfinite(floor) and floor > 0):
        return 1.0  # nothing to fit: a non-finite start is reported by the held-out evaluation
    factor = max(fit, floor)
    student.scale_output(factor)
    return factor


@torch.no_grad()
def _eval_mse(student: nn.Module, x: torch.Tensor, y: torch.Tensor, rope, batch_size: int) -> float:
    """Mean squared error over all elements of the held-out set."""
    was_training = student.training
    student.eval()
    total = 0.0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        prediction, _ = student(hidden_states=xb, position_embeddings=_expand(rope, len(xb)))
        total += F.mse_loss(prediction, yb, reduction="sum").item()
    student.train(was_training)
    return total / y.numel()


def _channel_variance(y: torch.Tensor) -> float:
    """Variance of each hidden channel over all tokens, averaged over channels. y: (N, T, hidden)."""
    flat = y.reshape(-1, y.shape[-1]).double()
    return max(flat.var(dim=0, unbiased=False).mean().item(), 1e-30)


@torch.no_grad()
def _rope(model: PreTrainedModel, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (1, T, head_dim) fp32, for positions 0..T-1 from the model's own rotary embedding."""
    positions = torch.arange(seq_len, device=device).unsqueeze(0)
    probe = torch.zeros(1, seq_len, 1, device=device, dtype=torch.float32)
    cos, sin = model.model.rotary_emb(probe, positions)
    return cos.float(), sin.float()


def _expand(rope: tuple[torch.Tensor, torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rope
    return cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)


def _read_meta(directory: Path) -> dict[str, Any] | None:
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

    A meta.json that cannot be read raises ValueError naming it and the fix (`distill_layer` rewrites it).
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
    loaded: ValueError naming the file and the fix (run the same conversion again: `distill_layer`
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
        problem = _weights_problem(directory, meta)
        if problem is not None:
            raise ValueError(f"layer {layer_idx}'s student cannot be loaded: {problem}; run the same conversion "
                             f"again (same options): it distils layer {layer_idx} again and replaces the file")
        student = build_student(result.mixer, model.config, layer_idx, MixerConfig.from_dict(meta["mixer_config"]))
        student.load_state_dict(load_file(str(weights_path)), strict=True)
        students[layer_idx] = student.to(device=parameter.device, dtype=parameter.dtype).eval()
    return students
