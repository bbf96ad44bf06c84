"""Run a decoder from any layer on cached hidden states: the prefix reuse of the fast greedy search.

Swapping layer l leaves layers 0..l-1 unchanged, so the hidden states entering layer l are the same for
every candidate of a round. `trace_batch` runs the model's own `forward` once and records, through
forward pre-hooks on the decoder layers, exactly what each layer receives: the hidden states (kept only
for the `keep` layers) and the keyword arguments (attention mask, `position_embeddings=(cos, sin)`,
`position_ids`, `cache=None`, ...; per layer, so a family with per-layer masks such as sliding windows is
reproduced too). `logits_from` then calls layers `start..L-1` with those arguments, the final norm and the
LM head, as `LlamaModel.forward` / `LlamaForCausalLM.forward` do in transformers 5.24. Nothing is
re-derived, so the logits equal the model's own bit for bit (tested in tests/test_search.py). A
`substitute` module runs in place of a decoder layer without touching the model (the fast scorer,
`dtr_core/search/scorer.py`, runs a candidate's student this way while other threads use the same model).

Memory: one kept layer costs B x T x hidden floats per batch; all layers of a split cost
N x T x hidden x L floats (`hidden_bytes`). `checkpoint_layers` picks an evenly spaced subset under a
byte budget; a candidate then restarts from the nearest kept layer below it (recomputing the gap), or
from the embeddings when nothing fits.
"""

from __future__ import annotations

import inspect

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import slice_logits_to_keep

from dtr_core.families import input_embeddings, output_logits
from dtr_core.hybrid.surgery import decoder_layers

__all__ = [
    "BatchTrace",
    "checkpoint_layers",
    "head_logits",
    "hidden_bytes",
    "logits_from",
    "retrace_from",
    "run_layers",
    "trace_batch",
]


@dataclass
class BatchTrace:
    """What the decoder layers received for one batch during one forward of the model.

    `hidden[i]`: the hidden states entering layer i, (B, T, hidden), for the kept layers.
    `layer_kwargs[i]`: the keyword arguments layer i was called with (shared tensors, not copies).
    `input_ids`: kept to recompute the embeddings when layer 0 is not kept.
    """

    hidden: dict[int, torch.Tensor]
    layer_kwargs: list[dict[str, Any]]
    input_ids: torch.Tensor | None = None
    logits_to_keep: int | torch.Tensor = 0  # as given to the model's forward

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.hidden.values())


def trace_batch(model: PreTrainedModel, model_inputs: Mapping[str, Any], keep: Iterable[int] = ()) -> BatchTrace:
    """Run `model(**model_inputs)` once and record each decoder layer's inputs (hidden states for `keep`)."""
    layers = decoder_layers(model)
    keep = set(keep)
    hidden: dict[int, torch.Tensor] = {}
    layer_kwargs: list[dict[str, Any] | None] = [None] * len(layers)

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if args:
                states, extra = args[0], args[1:]
            else:
                states, extra = kwargs["hidden_states"], ()
            # a decoder layer called with more positional arguments (GPT-2's cache, mask): by their parameter names
            names = list(inspect.signature(module.forward).parameters)[1:1 + len(extra)]
            if len(names) < len(extra) or set(names) & set(kwargs):
                raise RuntimeError(f"decoder layer {index} got unexpected positional arguments; update layerwise.py")
            layer_kwargs[index] = {**dict(zip(names, extra)),
                                   **{k: v for k, v in kwargs.items() if k != "hidden_states"}}
            if index in keep:
                hidden[index] = states

        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(**model_inputs)
    finally:
        for handle in handles:
            handle.remove()
    if any(kwargs is None for kwargs in layer_kwargs):
        raise RuntimeError("not every decoder layer ran during the traced forward")
    return BatchTrace(
        hidden=hidden,
        layer_kwargs=layer_kwargs,  # type: ignore[arg-type]
        input_ids=model_inputs.get("input_ids"),
        logits_to_keep=model_inputs.get("logits_to_keep", 0),
    )


def run_layers(
    model: PreTrainedModel,
    trace: BatchTrace,
    hidden: torch.Tensor,
    start: int,
    stop: int,
    substitute: Mapping[int, nn.Module] | None = None,
) -> torch.Tensor:
    """Apply decoder layers start..stop-1 to `hidden` with the traced arguments (`substitute[i]`, when given,
    in place of layer i). Costs stop - start layer-forwards."""
    layers = decoder_layers(model)
    substitute = substitute or {}
    for index in range(start, stop):
        out = substitute.get(index, layers[index])(hidden, **trace.layer_kwargs[index])
        hidden = out[0] if isinstance(out, tuple) else out  # transformers 5.x returns a tensor
    return hidden


def head_logits(model: PreTrainedModel, trace: BatchTrace, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + LM head (+ the family's logit scaling), as `<Family>ForCausalLM.forward` (with its
    `logits_to_keep` slicing; `dtr_core.families.output_logits`)."""
    return output_logits(model, slice_logits_to_keep(hidden, trace.logits_to_keep))


def _restart(model: PreTrainedModel, trace: BatchTrace, start: int) -> tuple[torch.Tensor, int]:
    """The hidden states entering the nearest kept layer <= start (or the embeddings), and that layer."""
    restart = max((i for i in trace.hidden if i <= start), default=None)
    if restart is not None:
        return trace.hidden[restart], restart
    if trace.input_ids is None:
        raise ValueError("no kept layer at or below the start and no input_ids to recompute the embeddings")
    return input_embeddings(model, trace.input_ids), 0


def logits_from(
    model: PreTrainedModel, trace: BatchTrace, start: int, substitute: Mapping[int, nn.Module] | None = None
) -> tuple[torch.Tensor, int]:
    """Logits of the model as it is now (with `substitute[i]` in place of decoder layer i, for i >= start),
    reusing the traced hidden states entering layer `start`.

    Layers below `start` must be unchanged since the trace. When layer `start` was not kept, restarts
    from the nearest kept layer below (or from the embeddings). Returns (logits, layer-forwards spent).
    """
    if substitute and min(substitute) < start:
        raise ValueError(f"substitute layers {sorted(substitute)} must be at or above the start layer {start}")
    count = len(decoder_layers(model))
    hidden, restart = _restart(model, trace, start)
    hidden = run_layers(model, trace, hidden, restart, count, substitute)
    return head_logits(model, trace, hidden), count - restart


def retrace_from(model: PreTrainedModel, trace: BatchTrace, changed: int) -> int:
    """Update `trace` in place after layer `changed` was swapped: the kept states entering layers above it
    are recomputed (those at or below it are unchanged). Equals a fresh `trace_batch` of the model as it
    is now, for (L - changed) layer-forwards or fewer instead of L. Returns the layer-forwards spent."""
    above = [i for i in trace.hidden if i > changed]
    if not above:
        return 0
    hidden, restart = _restart(model, trace, changed)
    for index in range(restart, max(above)):
        hidden = run_layers(model, trace, hidden, index, index + 1)
        if index + 1 in trace.hidden:
            trace.hidden[index + 1] = hidden
    return max(above) - restart


def hidden_bytes(num_tokens: int, hidden_size: int, num_layers: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes to keep `num_layers` layers' inputs for `num_tokens` (sum of B x T over batches) positions."""
    return num_tokens * hidden_size * num_layers * torch.empty((), dtype=dtype).element_size()


def checkpoint_layers(num_layers: int, bytes_per_layer: int, limit_bytes: int | None) -> tuple[int, ...]:
    """The layers whose inputs to keep: all when they fit in `limit_bytes` (None = no limit), else every
    s-th layer (0, s, 2s, ...) for the smallest stride s that fits; () when not even one layer fits."""
    if limit_bytes is None or bytes_per_layer * num_layers <= limit_bytes:
        return tuple(range(num_layers))
    for stride in range(2, num_layers + 1):
        kept = tuple(range(0, num_layers, stride))
        if len(kept) * bytes_per_layer <= limit_bytes:
            return kept
    return ()
