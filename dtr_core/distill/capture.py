"""Teacher activation capture for blockwise local distillation (DtR phase 1, step 2).

BLD trains each layer's student on the *teacher's* attention inputs (teacher forcing), so the
teacher runs once over the distillation tokens and, for every layer l, we store what its attention
module receives and returns:

    out_dir/layer_007.safetensors   inputs  [N, T, hidden]  hidden states entering self_attn
                                    outputs [N, T, hidden]  self_attn output, before the residual add
    out_dir/tokens.safetensors      input_ids [N, T]        the chunks (for provenance and checks)
    out_dir/manifest.json           written last: fingerprint, shapes, dtype, file hashes, content hash

Each chunk is an independent sequence at positions 0..T-1 with no padding, so nothing else is
needed: a student recomputes RoPE from those positions with the model's own `model.model.rotary_emb`
and needs no attention mask (linear attention is causal by construction).

Streaming to disk. All shapes are known before the first forward pass, so each layer file is a
valid safetensors file laid out up front: the header is written first and the data region is
pre-sized; forward hooks then write each batch's rows straight to their final byte offsets. Memory
stays at one batch of one layer; there is no merge step, and the files are ordinary safetensors
files (`safetensors.safe_open` reads them). `open_layer_activations` memory-maps them back.

Atomicity and reuse. Everything is written into a temporary folder that replaces `out_dir` in one
rename once the manifest is written. The manifest's `key` hashes what determines the content
(model fingerprint, token ids, layers, storage dtype); a complete capture with the same key is
reused without running the model, but only if its files still match the manifest. `content_hash`
hashes the files themselves and is what students record as their provenance.

Checking a capture before reuse: the sizes first (free: catches truncated or half-copied files), then
a full re-hash of every file. The re-hash runs whenever a capture is about to be reused, because a
same-size change would otherwise go unnoticed: students record the manifest's `content_hash`, not the
bytes they read, so every student trained afterwards would learn from wrong activations under a valid
key. It is cheap next to the capture it can save: sha256 reads ~1.3 GB/s on this project's 2-core
machine, so the default capture (smollm2-135m, 8192 tokens, 30 layers, float32: 1.1 GB) re-hashes in
~1 s from the page cache, against ~14 s to capture it, and reuse only happens when a run is resumed.
A capture that fails either check is captured again, with a warning naming the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from dtr_core.artifacts import (
    atomic_dir,
    hash_json,
    hash_tensor,
    read_json,
    reuse_or_compute,
    sha256_file,
    write_json,
)

logger = logging.getLogger(__name__)

CAPTURE_FORMAT = 1  # bump when the layout changes, so old captures are not reused
MANIFEST = "manifest.json"
TOKENS_FILE = "tokens.safetensors"

# torch dtype -> (safetensors dtype name, numpy dtype used for memory-mapping)
STORE_DTYPES: dict[torch.dtype, tuple[str, type]] = {
    torch.float32: ("F32", np.float32),
    torch.float16: ("F16", np.float16),
    torch.bfloat16: ("BF16", np.uint16),  # numpy has no bfloat16: map raw bits, view in torch
}
_DTYPE_BY_NAME = {name: dtype for dtype, (name, _) in STORE_DTYPES.items()}


def layer_file(layer_idx: int) -> str:
    return f"layer_{layer_idx:03d}.safetensors"


class _StopForward(Exception):
    """Raised by the hook of the last captured layer: later layers and the LM head are not needed."""


class StreamingSafetensorsWriter:
    """Write a safetensors file whose tensor shapes are known up front, a slab of rows at a time.

    `write_rows(name, start, tensor)` writes `tensor` as rows `start:start + len(tensor)` of
    tensor `name` (first dimension). Unwritten rows read back as zeros.
    """

    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None):
        if sys.byteorder != "little":  # safetensors is little-endian; we write raw tensor bytes
            raise RuntimeError("streaming safetensors writer needs a little-endian machine")
        header: dict[str, Any] = {}
        self._layout: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name, (shape, dtype) in specs.items():
            item = torch.empty((), dtype=dtype).element_size()
            nbytes = math.prod(shape) * item
            row_bytes = math.prod(shape[1:]) * item
            header[name] = {"dtype": STORE_DTYPES[dtype][0], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._layout[name] = (offset, row_bytes, dtype, tuple(shape))
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
        header_bytes += b" " * (-len(header_bytes) % 8)  # safetensors aligns the data region to 8
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        self._data_start = 8 + len(header_bytes)
        self._file.truncate(self._data_start + offset)  # pre-size (sparse until written)

    def write_rows(self, name: str, start: int, tensor: torch.Tensor) -> None:
        offset, row_bytes, dtype, shape = self._layout[name]
        if tensor.dtype != dtype or tuple(tensor.shape[1:]) != shape[1:] or start + len(tensor) > shape[0]:
            raise ValueError(f"rows {start}+{tuple(tensor.shape)} {tensor.dtype} do not fit {name} "
                             f"{shape} {dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.seek(self._data_start + offset + start * row_bytes)
        self._file.write(memoryview(data))

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def capture_activations(
    model: PreTrainedModel,
    token_ids: torch.Tensor,
    out_dir: str | os.PathLike,
    layers: list[int] | None = None,
    store_dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the teacher once over `token_ids` (LongTensor [N, T]) and store per-layer attention I/O.

    `layers` defaults to all layers; `store_dtype` is float32, float16 or bfloat16 (the
    activations are cast on write). `metadata` (JSON-able: e.g. corpus source, token budget) is
    recorded in the manifest but does not enter the reuse key. Returns the manifest dict, with
    `"reused": True` added when an existing complete capture was returned.
    """
    from dtr_core.models import model_fingerprint

    layers = _checked_layers(model, token_ids, layers, store_dtype, batch_size)
    metadata = dict(metadata or {})
    json.dumps(metadata, allow_nan=False)  # fail now, not after the forward passes
    out_dir = Path(out_dir)
    fingerprint = model_fingerprint(model)
    key = hash_json({"format": CAPTURE_FORMAT, "model": fingerprint, "tokens": hash_tensor(token_ids),
                     "layers": layers, "dtype": STORE_DTYPES[store_dtype][0]})
    manifest, reused = reuse_or_compute(
        out_dir / MANIFEST, key,
        lambda: _capture(model, token_ids, out_dir, layers, store_dtype, batch_size,
                         {"key": key, "model_fingerprint": fingerprint, "data": metadata}),
        problem=lambda stored: capture_problem(out_dir, stored), read=lambda path: read_manifest(path.parent),
        write=False, label="capture", log=logger)
    return {**manifest, "reused": True} if reused else manifest


def _checked_layers(model: PreTrainedModel, token_ids: torch.Tensor, layers: list[int] | None,
                    store_dtype: torch.dtype, batch_size: int) -> list[int]:
    """The sorted layers to capture; bad arguments raise ValueError before anything runs."""
    from dtr_core.hybrid.surgery import num_layers

    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2 or token_ids.dtype != torch.long:
        raise ValueError("token_ids must be a LongTensor of shape [N, seq_len]")
    n_seq, seq_len = token_ids.shape
    if n_seq == 0 or seq_len == 0:
        raise ValueError(f"nothing to capture: token_ids has shape {tuple(token_ids.shape)} "
                         "(token budget 0, or a budget smaller than one chunk of seq_len tokens?)")
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {sorted(str(d) for d in STORE_DTYPES)}, got {store_dtype}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    total_layers = num_layers(model)
    layers = list(range(total_layers)) if layers is None else sorted(set(int(i) for i in layers))
    if not layers:
        raise ValueError("layers is empty: nothing to capture")
    for layer_idx in layers:
        if not 0 <= layer_idx < total_layers:
            raise ValueError(f"layer index {layer_idx} is out of range; this model has layers 0..{total_layers - 1}")
    return layers


def _capture(model: PreTrainedModel, token_ids: torch.Tensor, out_dir: Path, layers: list[int],
             store_dtype: torch.dtype, batch_size: int, record: dict[str, Any]) -> dict[str, Any]:
    """Run the teacher over `token_ids` and write the capture folder, the manifest (`record` + the rest) last."""
    n_seq, seq_len = token_ids.shape
    shape = (n_seq, seq_len, model.config.hidden_size)
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        save_file({"input_ids": token_ids.contiguous().cpu()}, str(tmp / TOKENS_FILE))
        writers = {
            i: StreamingSafetensorsWriter(tmp / layer_file(i), {"inputs": (shape, store_dtype),
                                                                "outputs": (shape, store_dtype)},
                                          metadata={"layer": str(i), "model": record["model_fingerprint"]})
            for i in layers
        }
        try:
            _run_teacher(model, token_ids, layers, writers, store_dtype, batch_size)
        finally:
            for writer in writers.values():
                writer.close()
        seconds = time.perf_counter() - started
        manifest = _manifest(model, tmp, layers, shape, STORE_DTYPES[store_dtype][0], seconds, record)
        write_json(tmp / MANIFEST, manifest)  # written last: the completion marker
    logger.info("capture: %d tokens x %d layers in %.1fs (%.0f tok/s) -> %s",
                n_seq * seq_len, len(layers), seconds, manifest["tokens_per_second"], out_dir)
    return manifest


def _run_teacher(model: PreTrainedModel, token_ids: torch.Tensor, layers: list[int],
                 writers: dict[int, StreamingSafetensorsWriter], store_dtype: torch.dtype, batch_size: int) -> None:
    """One forward pass per batch, stopped after the last captured layer; hooks write each layer's attention
    input and output rows in place."""
    from dtr_core.hybrid.surgery import attention_module

    device = next(model.parameters()).device
    row = [0]  # first row of the current batch, read by the hooks
    handles = []

    def pre_hook(layer_idx):
        def hook(module, args, kwargs):
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            writers[layer_idx].write_rows("inputs", row[0], hidden_states.to(store_dtype))
        return hook

    def post_hook(layer_idx):
        def hook(module, args, kwargs, output):
            attn_out = output[0] if isinstance(output, tuple) else output
            writers[layer_idx].write_rows("outputs", row[0], attn_out.to(store_dtype))
            if layer_idx == layers[-1]:
                raise _StopForward
        return hook

    was_training = model.training
    model.eval()
    try:
        for i in layers:
            module = attention_module(model, i)
            handles.append(module.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook(i), with_kwargs=True))
        with torch.inference_mode():
            for start in range(0, len(token_ids), batch_size):
                row[0] = start
                try:
                    model(input_ids=token_ids[start:start + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _manifest(model: PreTrainedModel, folder: Path, layers: list[int], shape: tuple[int, int, int],
              dtype_name: str, seconds: float, record: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the capture written into `folder`: what it holds, the files' hashes, the timing."""
    from dtr_core.models import model_fingerprint
    from dtr_core.hybrid.surgery import attention_module, num_layers

    n_seq, seq_len, hidden = shape
    fingerprint = record["model_fingerprint"]
    files = {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
             for name in [TOKENS_FILE] + [layer_file(i) for i in layers]}
    return {
        "format": CAPTURE_FORMAT,
        "key": record["key"],
        "model_fingerprint": fingerprint,
        "model_type": model.config.model_type,
        "num_model_layers": num_layers(model),
        # per-layer attention weights hash: distillation checks it is handed the same teacher
        "attention_fingerprints": {str(i): model_fingerprint(attention_module(model, i)) for i in layers},
        "layers": layers,
        "num_sequences": n_seq,
        "seq_len": seq_len,
        "num_tokens": n_seq * seq_len,
        "hidden_size": hidden,
        "dtype": dtype_name,
        "shapes": {"inputs": list(shape), "outputs": list(shape), "input_ids": [n_seq, seq_len]},
        "positions": "each sequence at positions 0..seq_len-1, no padding",
        "target": "attention module output before the residual add",
        "data": record["data"],
        "files": files,
        "content_hash": hash_json({"files": {k: v["sha256"] for k, v in files.items()},
                                   "model": fingerprint, "dtype": dtype_name, "layers": layers}),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(n_seq * seq_len / max(seconds, 1e-9), 1),
    }


def read_manifest(activations_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a complete capture, or None if there is none (or it cannot be read)."""
    path = Path(activations_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as error:
        logger.warning("capture: %s cannot be read (%s); treated as no capture", path, error)
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == CAPTURE_FORMAT else None


def capture_problem(activations_dir: str | os.PathLike, manifest: dict[str, Any]) -> str | None:
    """Why the files of a capture do not match `manifest`, or None if they do.

    Sizes are checked first, for every file (no data read), then each file's sha256 (reads everything:
    ~1 s per GB; the module docstring says why both run before every reuse).
    """
    activations_dir = Path(activations_dir)
    for name, info in manifest["files"].items():
        path = activations_dir / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != info["bytes"]:
            return f"{path} has {size} bytes, its manifest says {info['bytes']}"
    for name, info in manifest["files"].items():
        path = activations_dir / name
        try:
            digest = sha256_file(path)
        except OSError as error:
            return f"{path} cannot be read ({error})"
        if digest != info["sha256"]:
            return f"{path} does not match the sha256 in its manifest (the file changed after the capture)"
    return None


def layer_manifest(activations_dir: str | os.PathLike, layer_idx: int,
                   missing: type[Exception] = ValueError) -> dict[str, Any]:
    """The manifest of a complete capture that holds `layer_idx`; `missing` (no capture) or ValueError (no such
    layer) naming the problem otherwise."""
    manifest = read_manifest(activations_dir)
    if manifest is None:
        raise missing(f"no complete activation capture in {activations_dir} (manifest.json missing)")
    if layer_idx not in manifest["layers"]:
        raise ValueError(f"layer {layer_idx} was not captured in {activations_dir}; "
                         f"captured layers: {manifest['layers']}")
    return manifest


def verify_capture(activations_dir: str | os.PathLike) -> bool:
    """Re-hash every file of a capture against its manifest (reads every file)."""
    manifest = read_manifest(activations_dir)
    return manifest is not None and capture_problem(activations_dir, manifest) is None


def open_layer_activations(activations_dir: str | os.PathLike, layer_idx: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Memory-mapped (inputs, outputs) of one layer, each [N, T, hidden] in the stored dtype.

    Nothing is read until indexed: `inputs[idx]` reads just those sequences. The tensors are
    copy-on-write views of the file; writing to them never changes the file.
    """
    activations_dir = Path(activations_dir)
    manifest = layer_manifest(activations_dir, layer_idx, missing=FileNotFoundError)
    path = activations_dir / layer_file(layer_idx)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    tensors = []
    for name in ("inputs", "outputs"):
        info = header[name]
        torch_dtype = _DTYPE_BY_NAME[info["dtype"]]
        begin, _ = info["data_offsets"]
        array = np.memmap(path, dtype=STORE_DTYPES[torch_dtype][1], mode="c",
                          offset=8 + header_len + begin, shape=tuple(info["shape"]))
        tensor = torch.from_numpy(array)
        tensors.append(tensor.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else tensor)
    return tensors[0], tensors[1]
