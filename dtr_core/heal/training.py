"""The healing loop: train a hybrid end to end towards its teacher's next-token distribution.

Per step, the teacher (frozen, under `no_grad`) and the hybrid run on the same token batch; the loss is the
KL divergence KL(teacher || hybrid) of their next-token distributions, per token, at `config.temperature`
(scaled by T^2 so the gradient size does not depend on it). Only the students (the linear-attention layers)
train; every other weight of the hybrid stays bit-identical. With `config.lora_rank` > 0, LoRA adapters on
the frozen projections (`adapters.py`) train too and are merged into those weights when the heal succeeds
(the base weights themselves never change during training). With `config.task_lm_weight` w > 0 the loss
adds w x the hybrid's next-token cross-entropy on a batch of the task's train text (`task_text.py`), a second
stream checkpointed with the first. The first `config.eval_batches` batches of the
corpus stream are held out (the KL before and after); training reads the stream after them.

Optimiser: AdamW per student layer (the same update as one AdamW over all of them: Adam is per parameter),
gradients clipped by their global norm, learning rate `config.lr * config.lr_factor(step)`.

Checkpoints: with a `state_dir`, every `checkpoint_every_steps` steps or `checkpoint_every_minutes` minutes
the students, their optimiser state, the stream position and the RNG state go to `state_dir/checkpoint/`
(`dtr_core.distill.checkpoint`: safetensors and JSON, atomic); a rerun with the same key continues from it
and gives the same weights bit for bit as an uninterrupted heal.

A heal that diverges (a non-finite loss, gradient or held-out KL) puts the students back exactly as they
were and reports `status: "failed"` with the reason: the unhealed hybrid is what remains.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from dtr_core.distill.checkpoint import (Checkpoint, read_checkpoint, remove_checkpoint, restore_rng, rng_state,
                                         write_checkpoint)
from dtr_core.distill.corpus import Corpus
from dtr_core.heal.adapters import add_adapters, adapter_modules, merge_adapters, remove_adapters
from dtr_core.heal.config import HealConfig
from dtr_core.hybrid.model import layer_map
from dtr_core.hybrid.surgery import attention_module, attention_prefix
from dtr_core.mixers.state_cache import FULL

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, float], None]
ADAPTERS = -1  # the LoRA adapters' key among the trained parts (students are keyed by their layer index)


@dataclass
class HealResult:
    """What healing did (JSON-able)."""

    status: str  # "ok" | "failed"
    linear_layers: list[int]
    reason: str | None = None
    initial_kl: float | None = None  # held-out KL(teacher || hybrid) per token, before
    final_kl: float | None = None  # and after
    steps: int = 0
    tokens: int = 0
    trainable_parameters: int = 0
    seconds: float = 0.0
    resumed_from_step: int = 0  # the checkpoint's step when a killed heal was continued
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, training KL, lr]

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def progress_line(step: int, steps: int, loss: float, seconds: float, config: HealConfig) -> str:
    """`heal: step 20/100, KL 0.0118, 1234 tokens/s, ETA 1m05s` (console and Prefect logs)."""
    eta = seconds / max(step, 1) * (steps - step)
    rate = step * config.batch_size * config.seq_len / max(seconds, 1e-9)
    return f"heal: step {step}/{steps}, KL {loss:.4f}, {rate:.0f} tokens/s, ETA {int(eta // 60)}m{int(eta % 60):02d}s"


def linear_layers(hybrid: PreTrainedModel) -> list[int]:
    return [index for index, kind in enumerate(layer_map(hybrid)) if kind != FULL]


def student_parameters(hybrid: PreTrainedModel) -> dict[str, torch.nn.Parameter]:
    """The students' parameters by name (what healing trains)."""
    return {attention_prefix(hybrid, index) + name: parameter
            for index in linear_layers(hybrid) for name, parameter in attention_module(hybrid, index).named_parameters()}


def next_token_kl(teacher_logits: torch.Tensor, hybrid_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || hybrid) per token, averaged over every position of the batch."""
    vocab = teacher_logits.shape[-1]
    target = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    prediction = F.log_softmax(hybrid_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = F.kl_div(prediction, target, log_target=True, reduction="sum") / target.shape[0]
    return kl * temperature ** 2


def next_token_loss(model: PreTrainedModel, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on `tokens` (B, T): language modelling on the task's text."""
    logits = model(input_ids=tokens).logits[:, :-1]  # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def held_out_kl(teacher: PreTrainedModel, hybrid: PreTrainedModel, batches: list[torch.Tensor],
                temperature: float) -> float:
    """KL(teacher || hybrid) per token over `batches`."""
    total, count = 0.0, 0
    for tokens in batches:
        kl = next_token_kl(teacher(input_ids=tokens).logits, hybrid(input_ids=tokens).logits, temperature)
        total, count = total + kl.item() * tokens.numel(), count + tokens.numel()
    return total / count


def heal(teacher: PreTrainedModel, hybrid: PreTrainedModel, corpus: Corpus, config: HealConfig,
         progress: ProgressCallback | None = None, state_dir: str | Path | None = None,
         key: str = "", task_corpus: Corpus | None = None) -> HealResult:
    """Heal `hybrid` in place on `corpus` (and `task_corpus`, the task's train text, when
    `config.task_lm_weight` > 0); returns what happened (module docstring).

    With `state_dir`, checkpoints made for `key` are written there and a matching one is resumed from; the
    folder is removed when the heal ends. Raises ValueError before any work for a hybrid with no linear layer.
    """
    layers = linear_layers(hybrid)
    if not layers:
        raise ValueError("heal needs a hybrid with at least one linear-attention layer; this model has none "
                         "(heal the M_best or M_opt hybrid of a conversion)")
    if config.task_lm_weight and task_corpus is None:
        raise ValueError("task_lm_weight > 0 needs the task's train text (task_corpus)")
    adapters = add_adapters(hybrid, config.lora_rank, config.seed) if config.lora_rank else None
    try:
        loop = _HealLoop(teacher, hybrid, layers, config, progress, None if state_dir is None else Path(state_dir),
                         key)
        result = loop.run(corpus, task_corpus if config.task_lm_weight else None)
    except BaseException:
        if adapters is not None:
            remove_adapters(adapters)
        raise
    if adapters is not None:
        (merge_adapters if result.ok else remove_adapters)(adapters)
    return result


class _HealLoop:
    """One heal: the students, their optimisers, the result so far and the checkpoints."""

    def __init__(self, teacher, hybrid, layers, config: HealConfig, progress, state_dir: Path | None, key: str):
        self.teacher, self.hybrid, self.layers, self.config = teacher, hybrid, layers, config
        self.progress, self.state_dir, self.key = progress, state_dir, key
        self.students = {layer: attention_module(hybrid, layer) for layer in layers}
        if config.lora_rank:  # the adapters train as one more part, under the key ADAPTERS
            self.students[ADAPTERS] = adapter_modules(hybrid)
        self.optimizers = {layer: torch.optim.AdamW(module.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                                    weight_decay=0.0)
                           for layer, module in self.students.items()}
        self.parameters = [p for module in self.students.values() for p in module.parameters()]
        self.result = HealResult(status="ok", linear_layers=layers,
                                 trainable_parameters=sum(p.numel() for p in self.parameters))
        self.device = next(hybrid.parameters()).device

    def run(self, corpus: Corpus, task_corpus: Corpus | None = None) -> HealResult:
        started = time.perf_counter()
        unhealed = {layer: {n: t.detach().clone() for n, t in m.state_dict().items()} for layer, m in self.students.items()}
        config = self.config
        stream = corpus.rows()
        held_out = [stream.take(config.batch_size, config.seq_len) for _ in range(config.eval_batches)]
        frozen = _freeze_all_but(self.hybrid, self.parameters)
        try:
            first_step, rows = 0, stream
            task_rows = task_corpus.rows() if task_corpus is not None else None
            checkpoint = read_checkpoint(self.state_dir, self.key) if self.state_dir is not None else None
            if checkpoint is not None:
                first_step, rows = checkpoint.step, corpus.rows(checkpoint.position)
                if task_corpus is not None:
                    task_rows = task_corpus.rows(checkpoint.layers["heal"]["task_position"])
                self._restore(checkpoint)
                logger.info("heal: resuming from the checkpoint at step %d/%d", first_step, config.steps)
            else:
                self.result.initial_kl = held_out_kl(self.teacher, self.hybrid, held_out, config.temperature)
            failure = self._train(rows, task_rows, first_step, started)
            if failure is None:
                self.result.final_kl = held_out_kl(self.teacher, self.hybrid, held_out, config.temperature)
                if not math.isfinite(self.result.final_kl):
                    failure = f"non-finite held-out KL after healing: {self.result.final_kl}"
            if failure is not None:
                self._put_back(unhealed)
                self.result.status, self.result.reason, self.result.final_kl = "failed", failure, None
                logger.warning("heal failed (%s); the students are back as they were before healing", failure)
            if self.state_dir is not None:
                remove_checkpoint(self.state_dir)
        finally:
            for parameter, requires_grad in frozen:
                parameter.requires_grad_(requires_grad)
            self.hybrid.eval()
        self.result.seconds = round(self.result.seconds + time.perf_counter() - started, 3)
        return self.result

    def _train(self, rows, task_rows, first_step: int, started: float) -> str | None:
        """The optimiser steps from `first_step`; returns why training failed, or None."""
        config, result = self.config, self.result
        last_checkpoint = time.perf_counter()
        for step in range(first_step, config.steps):
            tokens = rows.take(config.batch_size, config.seq_len)
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=tokens).logits
            loss = next_token_kl(teacher_logits, self.hybrid(input_ids=tokens).logits, config.temperature)
            if task_rows is not None:
                loss = loss + config.task_lm_weight * next_token_loss(
                    self.hybrid, task_rows.take(config.batch_size, config.seq_len))
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                return f"non-finite training loss {loss_value} at step {step + 1}"
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, config.grad_clip).item()
            if not math.isfinite(grad_norm):
                return f"non-finite gradient norm {grad_norm} at step {step + 1}"
            lr_now = config.lr * config.lr_factor(step)
            for optimizer in self.optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = lr_now
                optimizer.step()
            result.steps, result.tokens = step + 1, result.tokens + tokens.numel()
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                result.loss_curve.append([step + 1, loss_value, lr_now])
                if self.progress is not None:
                    self.progress(step + 1, config.steps, loss_value)
            due = (step + 1) % config.checkpoint_every_steps == 0 or \
                time.perf_counter() - last_checkpoint >= 60 * config.checkpoint_every_minutes
            if self.state_dir is not None and due and step + 1 < config.steps:
                result.seconds = round(result.seconds + time.perf_counter() - started, 3)
                started = time.perf_counter()
                self._checkpoint(step + 1, rows.position, task_rows.position if task_rows is not None else 0)
                last_checkpoint = time.perf_counter()
        if not all(torch.isfinite(parameter).all() for parameter in self.parameters):
            return "non-finite student parameters after healing"
        return None

    def _checkpoint(self, step: int, position: int, task_position: int) -> None:
        write_checkpoint(self.state_dir, Checkpoint(
            key=self.key, step=step, position=position,
            layers={"heal": {"result": self.result.to_dict(), "task_position": task_position}},
            students={layer: module.state_dict() for layer, module in self.students.items()},
            optimizers={layer: {index: dict(values) for index, values in optimizer.state_dict()["state"].items()}
                        for layer, optimizer in self.optimizers.items()},
            rng=rng_state(self.device)))

    def _restore(self, checkpoint: Checkpoint) -> None:
        self.result = HealResult(**checkpoint.layers["heal"]["result"])
        self.result.resumed_from_step = checkpoint.step
        for layer, module in self.students.items():
            module.load_state_dict(checkpoint.students[layer], strict=True)
            state = self.optimizers[layer].state_dict()
            state["state"] = {index: dict(values) for index, values in checkpoint.optimizers[layer].items()}
            self.optimizers[layer].load_state_dict(state)
        restore_rng(checkpoint.rng, self.device)

    @torch.no_grad()
    def _put_back(self, unhealed: dict[int, dict[str, torch.Tensor]]) -> None:
        for layer, module in self.students.items():
            module.load_state_dict(unhealed[layer], strict=True)


def _freeze_all_but(model: PreTrainedModel, trainable: list[torch.nn.Parameter]):
    """Freeze every parameter except `trainable`; returns (parameter, previous requires_grad) to restore."""
    keep = {id(parameter) for parameter in trainable}
    before = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in before:
        parameter.requires_grad_(id(parameter) in keep)
    return before
