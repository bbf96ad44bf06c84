"""The teacher's attention inputs and outputs of a block of layers, live: `TeacherTap` (DtR phase 1).

Forward hooks on the block's attention modules take the hidden states entering `self_attn` and its output
before the residual add; the forward stops after the block's last layer (an exception raised by its hook), so
later layers and the LM head never run. Each sequence is at positions 0..T-1 with no padding: a student
recomputes RoPE from those positions and needs no mask (linear attention is causal by construction).
"""

from __future__ import annotations

import contextlib
import threading

import torch
from transformers import PreTrainedModel


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU (fp32 there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


class _StopForward(Exception):
    """Raised by the hook of the block's last layer: later layers and the LM head are not needed."""


class TeacherTap:
    """Hooks on the attention modules of `layers`: `run(ids)` -> {layer: (x, y)}, each (B, T, hidden) fp32,
    the hidden states entering `self_attn` and its output before the residual add.

    The hooks act only on forwards run by the thread that opened the tap: blocks running in parallel threads
    share one teacher (`tasks/runtime.py`), and each must see only its own batches."""

    def __init__(self, model: PreTrainedModel, layers: list[int], device: torch.device):
        self.model, self.layers, self.device = model, layers, device
        self._taken: dict[int, list[torch.Tensor]] = {}
        self._thread = threading.get_ident()

    def __enter__(self) -> TeacherTap:
        from dtr_core.hybrid.surgery import attention_module

        def pre_hook(layer):
            def hook(module, args, kwargs):
                if threading.get_ident() == self._thread:
                    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                    self._taken[layer] = [x.float()]
            return hook

        def post_hook(layer):
            def hook(module, args, kwargs, output):
                if threading.get_ident() != self._thread:
                    return
                self._taken[layer].append((output[0] if isinstance(output, tuple) else output).float())
                if layer == self.layers[-1]:
                    raise _StopForward
            return hook

        self._handles = []
        for layer in self.layers:
            module = attention_module(self.model, layer)
            self._handles.append(module.register_forward_pre_hook(pre_hook(layer), with_kwargs=True))
            self._handles.append(module.register_forward_hook(post_hook(layer), with_kwargs=True))
        self._was_training = self.model.training
        self.model.eval()
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self.model.train(self._was_training)

    def run(self, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        self._taken = {}
        with torch.no_grad(), autocast_for(self.device):
            try:
                self.model(input_ids=ids.to(self.device), use_cache=False)
            except _StopForward:
                pass
        taken, self._taken = self._taken, {}
        return {layer: (x, y) for layer, (x, y) in taken.items()}
