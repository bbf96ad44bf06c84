"""The healing loop: train a hybrid end to end towards its teacher's next-token distribution.

Per step, the teacher (frozen, under `no_grad`) and the hybrid run on the same token batch; the loss is the
KL divergence KL(teacher || hybrid) of their next-token distributions, per token, at `config.temperature`
(scaled by T^2 so the gradient size does not depend on it). Only the students (the linear-attention layers)
train; every other weight of the hybrid stays bit-identical.

A heal that diverges (a non-finite loss, gradient or held-out KL) puts the students back exactly as they
were and reports `status: "failed"` with the reason: the unhealed hybrid is what remains.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from dtr_core.heal.config import HealConfig
from dtr_core.hybrid.model import layer_map
from dtr_core.hybrid.surgery import decoder_layers
from dtr_core.mixers.state_cache import FULL

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, float], None]


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
    layers = decoder_layers(hybrid)
    return {f"model.layers.{index}.self_attn.{name}": parameter
            for index in linear_layers(hybrid) for name, parameter in layers[index].self_attn.named_parameters()}


def next_token_kl(teacher_logits: torch.Tensor, hybrid_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || hybrid) per token, averaged over every position of the batch."""
    vocab = teacher_logits.shape[-1]
    target = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    prediction = F.log_softmax(hybrid_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    kl = F.kl_div(prediction, target, log_target=True, reduction="sum") / target.shape[0]
    return kl * temperature ** 2


def heal(teacher: PreTrainedModel, hybrid: PreTrainedModel, batches: Iterator[torch.Tensor], config: HealConfig,
         progress: ProgressCallback | None = None) -> HealResult:
    """Heal `hybrid` in place on token batches ((B, T) LongTensors) from `batches`; returns what happened.

    The first `config.eval_batches` batches are held out (the KL before and after); training takes the next
    `config.steps`. Raises ValueError before any work for a hybrid with no linear layer.
    """
    layers = linear_layers(hybrid)
    if not layers:
        raise ValueError("heal needs a hybrid with at least one linear-attention layer; this model has none "
                         "(heal the M_best or M_opt hybrid of a conversion)")
    started = time.perf_counter()
    trainable = student_parameters(hybrid)
    unhealed = {name: parameter.detach().clone() for name, parameter in trainable.items()}
    held_out = [next(batches) for _ in range(config.eval_batches)]
    result = HealResult(status="ok", linear_layers=layers,
                        trainable_parameters=sum(p.numel() for p in trainable.values()))
    frozen = _freeze_all_but(hybrid, trainable)
    try:
        result.initial_kl = held_out_kl(teacher, hybrid, held_out, config.temperature)
        failure = _train(teacher, hybrid, batches, config, list(trainable.values()), result, progress)
        if failure is None:
            result.final_kl = held_out_kl(teacher, hybrid, held_out, config.temperature)
            if not math.isfinite(result.final_kl):
                failure = f"non-finite held-out KL after healing: {result.final_kl}"
        if failure is not None:
            _restore(trainable, unhealed)
            result.status, result.reason, result.final_kl = "failed", failure, None
            logger.warning("heal failed (%s); the students are back as they were before healing", failure)
    finally:
        for parameter, requires_grad in frozen:
            parameter.requires_grad_(requires_grad)
        hybrid.eval()
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def _train(teacher, hybrid, batches, config: HealConfig, parameters, result: HealResult,
           progress: ProgressCallback | None) -> str | None:
    """The optimiser steps; returns why training failed, or None."""
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    for step in range(config.steps):
        tokens = next(batches)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=tokens).logits
        loss = next_token_kl(teacher_logits, hybrid(input_ids=tokens).logits, config.temperature)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            return f"non-finite training KL {loss_value} at step {step + 1}"
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip).item()
        if not math.isfinite(grad_norm):
            return f"non-finite gradient norm {grad_norm} at step {step + 1}"
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        result.steps, result.tokens = step + 1, result.tokens + tokens.numel()
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            result.loss_curve.append([step + 1, loss_value, lr_now])
            if progress is not None:
                progress(step + 1, config.steps, loss_value)
    if not all(torch.isfinite(parameter).all() for parameter in parameters):
        return "non-finite student parameters after healing"
    return None


@torch.no_grad()
def held_out_kl(teacher: PreTrainedModel, hybrid: PreTrainedModel, batches: list[torch.Tensor],
                temperature: float) -> float:
    """KL(teacher || hybrid) per token over `batches`."""
    total, count = 0.0, 0
    for tokens in batches:
        kl = next_token_kl(teacher(input_ids=tokens).logits, hybrid(input_ids=tokens).logits, temperature)
        total, count = total + kl.item() * tokens.numel(), count + tokens.numel()
    return total / count


def _freeze_all_but(model: PreTrainedModel, trainable: dict[str, torch.nn.Parameter]):
    """Freeze every parameter except `trainable`; returns (parameter, previous requires_grad) to restore."""
    keep = {id(parameter) for parameter in trainable.values()}
    before = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in before:
        parameter.requires_grad_(id(parameter) in keep)
    return before


@torch.no_grad()
def _restore(trainable: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    for name, parameter in trainable.items():
        parameter.copy_(values[name])
