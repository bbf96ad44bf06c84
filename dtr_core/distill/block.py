"""Blockwise local distillation (BLD) on the streamed teacher: `distill_block` (DtR phase 1).

For layer l the student starts from the teacher attention's q/k/v/o (see `dtr_core/mixers/base.py`)
and is trained, alone, to reproduce the teacher attention's output from the teacher's own input hidden
states (teacher forcing). Nothing is stored: the teacher runs forward batch by batch under `no_grad`,
hooks on the attention modules of a block of consecutive layers take what each receives and returns, the
forward stops after the block's last layer, and every student of the block takes one optimiser step on
that batch. Disk holds only the students and the block's checkpoint, whatever the token budget.

Decisions the paper leaves open, taken here:
- target: the attention module's output *before* the residual add, loss = plain MSE over all
  elements (the paper's MSE(O_full, O_linear));
- optimiser: AdamW on the student's parameters only (betas 0.9/0.95, decay on matrices only),
  linear warm-up then cosine decay to `min_lr_ratio * lr`, gradient-norm clipping; fp32 weights
  (bf16 autocast for the forwards on CUDA);
- batches: step i takes the next `DistillConfig.sequences_at(i)` rows of the corpus stream
  (`dtr_core.distill.corpus.Corpus`), each an independent sequence at positions 0..T-1 (RoPE from
  `model.model.rotary_emb`, no mask: linear attention is causal by construction). Every layer sees the
  same batches in the same order whatever the block, and each student is initialised from
  `DistillConfig.seed`, so the weights do not depend on how layers are grouped into blocks;
- evaluation: the first `eval_sequences` sequences of the stream are held out and never trained on; the
  teacher runs over them again (batch by batch) before and after training. The normalised loss is
  MSE / Var(teacher output), the variance taken per hidden channel over all held-out tokens and
  averaged: 1.0 is as good as predicting each channel's mean, 0.0 is exact (it is 1 - R^2);
- saved weights are those after the last step; a non-finite loss or gradient norm stops that layer
  (failed, no weights) while the rest of the block trains on; the verdict is `training.judge`.

Cost: a block of layers a..b runs the teacher's layers 0..b once per step for all its students, so the
teacher layer-forwards per training token and layer trained are sum over blocks of (b + 1), divided by the
layers trained (`teacher_layer_forwards`): one block of all L layers needs 1, L blocks of one layer (L + 1) / 2.

Resume: every `checkpoint_every_steps` steps or `checkpoint_every_minutes` minutes the block writes
`students/block_<a>-<b>/checkpoint/` (`dtr_core.distill.checkpoint`); a rerun with the same settings
continues from it bit for bit and the folder goes once every layer's `layer_XXX/` is written.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from dtr_core.artifacts import hash_json, reuse_or_compute
from dtr_core.distill.checkpoint import (Checkpoint, block_dir, read_checkpoint, remove_checkpoint, restore_rng,
                                         rng_state, write_checkpoint)
from dtr_core.distill.config import DistillConfig, check_seq_lens
from dtr_core.distill.corpus import Corpus, TokenRows
from dtr_core.distill.teacher_tap import TeacherTap, autocast_for
from dtr_core.distill.training import (DISTILL_FORMAT, META, LayerResult, calibrate_output_scale, expand_rope,
                                       judge, layer_dir, log_result, read_meta, rejudge, rope_for, save_layer,
                                       weights_problem)

logger = logging.getLogger(__name__)

# torch's RNG is one per process: blocks starting in parallel threads seed and draw their students' initial
# weights one at a time, so each student starts from `DistillConfig.seed` alone
_SEEDED_INIT = threading.Lock()

# progress(step, total_steps, mean training loss of the block's live students, training tokens so far)
ProgressCallback = Callable[[int, int, float, int], None]


def split_into_blocks(num_layers: int, layers_per_block: int) -> list[list[int]]:
    """Layers 0..num_layers-1 as blocks of `layers_per_block` consecutive layers (the last may be shorter)."""
    if num_layers < 1 or layers_per_block < 1:
        raise ValueError(f"need num_layers >= 1 and layers_per_block >= 1, got {num_layers} and {layers_per_block}")
    return [list(range(start, min(start + layers_per_block, num_layers)))
            for start in range(0, num_layers, layers_per_block)]


def teacher_layer_forwards(blocks: list[list[int]]) -> float:
    """Teacher layer-forwards per training token and per layer trained: a block of layers a..b runs the teacher's
    layers 0..b once per token for its b - a + 1 students, so sum over blocks of (b + 1) / layers trained."""
    return sum(max(block) + 1 for block in blocks) / sum(len(block) for block in blocks)


def layer_key(model_fingerprint: str, attention_fingerprint: str, corpus: Corpus, mixer_name: str,
              mixer_config: Any, config: DistillConfig, layer: int) -> str:
    """Hash of everything that decides a layer's trained weights (the reuse key of `layer_XXX/`)."""
    return hash_json({"format": DISTILL_FORMAT, "model": model_fingerprint, "attention": attention_fingerprint,
                      "corpus": corpus.identity, "tokens": config.steps * config.tokens_per_step,
                      "seq_lens": list(config.seq_lens), "mixer": mixer_name,
                      "mixer_config": mixer_config.defining_dict(), "config": config.defining_dict(), "layer": layer})


def distill_block(
    model: PreTrainedModel,
    layers: list[int],
    mixer_name: str,
    config: DistillConfig,
    corpus: Corpus,
    students_dir: str | Path,
    mixer_config: Any | None = None,
    progress: ProgressCallback | None = None,
) -> list[LayerResult]:
    """Distil the attention of each of `layers` (consecutive or not; sorted) into a `mixer_name` student,
    writing `students_dir/layer_XXX/`; returns their results in layer order.

    `model` is the teacher (not modified); `corpus` streams its tokens. Completed layers with the same key
    are reused (re-judged against `config.max_normalized_loss`); a block whose layers are all complete does
    not run the teacher. `progress` is called every `log_every` steps and at the end. Bad inputs raise
    ValueError before anything is written.
    """
    from dtr_core.hybrid.surgery import attention_module, check_layer_index, verify_family
    from dtr_core.mixers import MixerConfig, get_mixer_class
    from dtr_core.models import model_fingerprint

    verify_family(model)  # a family outside dtr_core/families.py: surgery must be exact before any training
    if not isinstance(config, DistillConfig):
        raise ValueError(f"config must be a DistillConfig, got {type(config).__name__}")
    get_mixer_class(mixer_name)  # unknown names raise listing the valid ones
    layers = sorted(set(int(layer) for layer in layers))
    if not layers:
        raise ValueError("layers is empty: nothing to distil")
    for layer in layers:
        check_layer_index(model, layer)
    check_seq_lens(config.seq_lens, getattr(model.config, "max_position_embeddings", None))
    mixer_config = mixer_config if mixer_config is not None else MixerConfig()
    fingerprint = model_fingerprint(model)
    keys = {layer: layer_key(fingerprint, model_fingerprint(attention_module(model, layer)), corpus, mixer_name,
                             mixer_config, config, layer) for layer in layers}
    results = {layer: result for layer in layers
               if (result := _completed(layer_dir(students_dir, layer), layer, keys[layer], config)) is not None}
    todo = [layer for layer in layers if layer not in results]
    if todo:
        block = _Block(model, todo, keys, mixer_name, mixer_config, config, corpus, Path(students_dir),
                       block_dir(students_dir, layers), progress)
        results.update(block.run(fingerprint))
    return [results[layer] for layer in layers]


def _completed(directory: Path, layer: int, key: str, config: DistillConfig) -> LayerResult | None:
    """The reused result of a completed layer with `key` whose weights match its meta.json (judged against
    `config`'s threshold); None when the layer is to be trained (the one reuse rule,
    `dtr_core.artifacts.reuse_or_compute`, which warns about damaged weights)."""
    meta, reused = reuse_or_compute(directory / META, key, dict, problem=lambda stored: weights_problem(directory,
                                                                                                       stored),
                                    read=lambda path: read_meta(path.parent), write=False,
                                    label=f"distill layer {layer}", log=logger)
    return rejudge(directory, meta, config) if reused else None


@dataclass
class _Student:
    """One layer's student while its block trains."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    result: LayerResult
    curve: list[list[float]] = field(default_factory=list)  # [step, train loss, lr]
    variance: float = 1.0  # mean per-channel variance of the teacher's held-out output
    live: bool = True  # still training (False once failed)

    def fail(self, reason: str) -> None:
        self.live = False
        self.result.status, self.result.reason = "failed", reason
        for name in ("initial_loss", "initial_normalized_loss", "final_loss", "normalized_loss"):
            value = getattr(self.result, name)
            if value is not None and not math.isfinite(value):
                setattr(self.result, name, None)  # meta.json stays valid JSON


class _Block:
    """The training of one block's students on the streamed teacher (module docstring)."""

    def __init__(self, model, layers, keys, mixer_name, mixer_config, config, corpus, students_dir, folder,
                 progress):
        self.model, self.layers, self.keys = model, layers, keys
        self.mixer_name, self.mixer_config, self.config, self.corpus = mixer_name, mixer_config, config, corpus
        self.students_dir, self.folder, self.progress = students_dir, folder, progress
        self.device = next(model.parameters()).device
        self.key = hash_json({"keys": {str(layer): keys[layer] for layer in layers}})
        self._ropes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor] | None] = {}

    def run(self, fingerprint: str) -> dict[int, LayerResult]:
        started = time.perf_counter()
        config = self.config
        students = {layer: self._new_student(layer) for layer in self.layers}
        eval_ids = self.corpus.rows().take(config.eval_sequences, config.seq_lens[0])
        checkpoint = read_checkpoint(self.folder, self.key)
        with TeacherTap(self.model, self.layers, self.device) as tap:
            if checkpoint is None:
                first_step, rows = 0, self.corpus.rows(eval_ids.numel())
            else:
                first_step, rows = checkpoint.step, self.corpus.rows(checkpoint.position)
                self._restore(students, checkpoint)
                logger.info("distill layers %s: resuming from the checkpoint at step %d/%d", self.layers,
                            first_step, config.steps)
            self._train(students, tap, rows, eval_ids, first_step)
            self._finish(students, tap, eval_ids)
        elapsed = time.perf_counter() - started
        for layer, student in students.items():
            self._save(layer, student, fingerprint, elapsed)
        remove_checkpoint(self.folder)
        return {layer: student.result for layer, student in students.items()}

    def _new_student(self, layer: int) -> _Student:
        from dtr_core.hybrid.surgery import attention_module
        from dtr_core.mixers import build_student

        with _SEEDED_INIT, torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.config.seed)
            module = build_student(self.mixer_name, self.model.config, layer, self.mixer_config,
                                   teacher_attention=attention_module(self.model, layer))
        module = module.to(device=self.device, dtype=torch.float32).train()
        decay = [p for p in module.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in module.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.config.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=self.config.lr, betas=(0.9, 0.95))
        result = LayerResult(layer=layer, mixer=self.mixer_name, status="ok", key=self.keys[layer],
                             eval_sequences=self.config.eval_sequences)
        return _Student(module, optimizer, decay + no_decay, result)

    def _rope(self, seq_len: int, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(cos, sin) of positions 0..seq_len-1 as decoder layer `layer` gets them, each (1, T, rotary dim),
        computed once per length and layer (Gemma 3's local and global layers rotate differently)."""
        if (seq_len, layer) not in self._ropes:
            self._ropes[seq_len, layer] = rope_for(self.model, seq_len, self.device, layer)
        return self._ropes[seq_len, layer]

    def _predict(self, student: _Student, x: torch.Tensor) -> torch.Tensor:
        """The student's output for x (B, T, hidden), fp32."""
        with autocast_for(self.device):
            rope = self._rope(x.shape[1], student.module.layer_idx)
            prediction, _ = student.module(hidden_states=x, position_embeddings=expand_rope(rope, len(x)))
        return prediction.float()

    def _train(self, students: dict[int, _Student], tap: TeacherTap, rows: TokenRows, eval_ids: torch.Tensor,
               first_step: int) -> None:
        config = self.config
        last_checkpoint = time.perf_counter()
        for step in range(first_step, config.steps):
            taken = tap.run(rows.take(*config.sequences_at(step)))
            if step == 0:
                self._start(students, tap, taken, eval_ids)
            lr_now = config.lr * config.lr_factor(step)
            losses = [loss for layer, student in students.items() if student.live
                      and (loss := self._step(student, *taken[layer], step, lr_now)) is not None]
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                for student in students.values():
                    if student.live:
                        student.curve.append([step + 1, student.result.final_train_loss, lr_now])
                if self.progress is not None:
                    self.progress(step + 1, config.steps, sum(losses) / max(1, len(losses)),
                                  (step + 1) * config.tokens_per_step)
            due = (step + 1) % config.checkpoint_every_steps == 0 or \
                time.perf_counter() - last_checkpoint >= 60 * config.checkpoint_every_minutes
            if due and step + 1 < config.steps:
                self._checkpoint(students, step + 1, rows.position)
                last_checkpoint = time.perf_counter()

    def _start(self, students: dict[int, _Student], tap: TeacherTap, first_batch, eval_ids: torch.Tensor) -> None:
        """Before the first step: calibrate each student's output scale on the first batch, then measure the
        held-out loss of the untrained students and the teacher output's variance."""
        if self.config.calibrate_output:
            for layer, student in students.items():
                x, y = first_batch[layer]
                with autocast_for(self.device):
                    student.result.output_scale = calibrate_output_scale(student.module, x, y,
                                                                         self._rope(x.shape[1], student.module.layer_idx))
        losses, variances = self._held_out(students, tap, eval_ids)
        for layer, student in students.items():
            student.variance = variances[layer]
            student.result.initial_loss = losses[layer]
            if not math.isfinite(losses[layer]):
                student.fail(f"non-finite held-out loss of the untrained student: {losses[layer]}")
            else:
                student.result.initial_normalized_loss = losses[layer] / student.variance

    def _step(self, student: _Student, x: torch.Tensor, y: torch.Tensor, step: int, lr_now: float) -> float | None:
        """One AdamW step of one student on (x, y); None (and the student failed) when it diverges."""
        for group in student.optimizer.param_groups:
            group["lr"] = lr_now
        loss = F.mse_loss(self._predict(student, x), y)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            student.fail(f"non-finite training loss {loss_value} at step {step + 1}")
            return None
        student.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.params, self.config.grad_clip).item()
        if not math.isfinite(grad_norm):
            student.fail(f"non-finite gradient norm {grad_norm} at step {step + 1}")
            return None
        student.optimizer.step()
        result = student.result
        result.best_train_loss = loss_value if result.best_train_loss is None else min(result.best_train_loss,
                                                                                         loss_value)
        result.steps, result.final_train_loss = step + 1, loss_value
        result.tokens = result.steps * self.config.tokens_per_step
        return loss_value

    @torch.no_grad()
    def _held_out(self, students: dict[int, _Student], tap: TeacherTap, eval_ids: torch.Tensor
                  ) -> tuple[dict[int, float], dict[int, float]]:
        """Held-out MSE of each live student and the mean per-channel variance of the teacher's output, the
        teacher re-run over `eval_ids` batch by batch."""
        errors = {layer: 0.0 for layer in students}
        sums: dict[int, torch.Tensor] = {}
        squares: dict[int, torch.Tensor] = {}
        for student in students.values():
            student.module.eval()
        for start in range(0, len(eval_ids), self.config.batch_size):
            taken = tap.run(eval_ids[start:start + self.config.batch_size])
            for layer, student in students.items():
                x, y = taken[layer]
                flat = y.reshape(-1, y.shape[-1]).double()
                sums[layer] = sums.get(layer, 0) + flat.sum(dim=0)
                squares[layer] = squares.get(layer, 0) + (flat * flat).sum(dim=0)
                if student.live:
                    errors[layer] += F.mse_loss(self._predict(student, x), y, reduction="sum").item()
        for student in students.values():
            student.module.train()
        count = eval_ids.numel()
        variances = {layer: max(((squares[layer] / count) - (sums[layer] / count) ** 2).mean().item(), 1e-30)
                     for layer in students}
        dims = eval_ids.numel() * self.model.config.hidden_size
        return {layer: error / dims for layer, error in errors.items()}, variances

    def _finish(self, students: dict[int, _Student], tap: TeacherTap, eval_ids: torch.Tensor) -> None:
        """After the last step: the held-out loss of the trained students and their verdict."""
        for student in students.values():
            if student.live and not all(torch.isfinite(p).all() for p in student.module.parameters()):
                student.fail("non-finite student parameters after training")
        if not any(student.live for student in students.values()):
            return
        losses, _ = self._held_out(students, tap, eval_ids)
        for layer, student in students.items():
            if not student.live:
                continue
            student.result.final_loss = losses[layer]
            if not math.isfinite(losses[layer]):
                student.fail(f"non-finite held-out loss after training: {losses[layer]}")
                continue
            student.result.normalized_loss = losses[layer] / student.variance
            judge(student.result, self.config.max_normalized_loss)

    def _save(self, layer: int, student: _Student, fingerprint: str, seconds: float) -> None:
        from dtr_core.hybrid.surgery import attention_module, num_layers
        from dtr_core.models import model_fingerprint

        result = student.result
        result.seconds = round(seconds, 3)
        meta = {**result.to_dict(), "format": DISTILL_FORMAT, "loss_curve": student.curve,
                "config": self.config.to_dict(), "mixer_config": self.mixer_config.to_dict(),
                "corpus": self.corpus.identity, "model_fingerprint": fingerprint,
                "attention_fingerprint": model_fingerprint(attention_module(self.model, layer)),
                "num_model_layers": num_layers(self.model), "seq_lens": list(self.config.seq_lens),
                "eval_split": f"first {self.config.eval_sequences} sequences of the corpus stream",
                "block": self.layers}
        save_layer(layer_dir(self.students_dir, layer), meta,
                   student.module if result.normalized_loss is not None else None, self.mixer_name)
        log_result(result)

    def _checkpoint(self, students: dict[int, _Student], step: int, position: int) -> None:
        live = {layer: student for layer, student in students.items() if student.live}
        optimizers = {}
        for layer, student in live.items():
            state = student.optimizer.state_dict()["state"]
            optimizers[layer] = {index: dict(values) for index, values in state.items()}
        write_checkpoint(self.folder, Checkpoint(
            key=self.key, step=step, position=position,
            layers={str(layer): {"result": student.result.to_dict(), "curve": student.curve,
                                 "variance": student.variance, "live": student.live}
                    for layer, student in students.items()},
            students={layer: student.module.state_dict() for layer, student in live.items()},
            optimizers=optimizers, rng=rng_state(self.device)))
        logger.debug("distill layers %s: checkpoint at step %d", self.layers, step)

    def _restore(self, students: dict[int, _Student], checkpoint: Checkpoint) -> None:
        for layer, student in students.items():
            saved = checkpoint.layers[str(layer)]
            student.result = LayerResult.from_dict(saved["result"])
            student.curve, student.variance, student.live = saved["curve"], saved["variance"], saved["live"]
            if not student.live:
                continue
            student.module.load_state_dict(checkpoint.students[layer], strict=True)
            state = student.optimizer.state_dict()
            state["state"] = {index: dict(values) for index, values in checkpoint.optimizers[layer].items()}
            student.optimizer.load_state_dict(state)
        restore_rng(checkpoint.rng, self.device)
