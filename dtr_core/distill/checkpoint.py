"""A block's training checkpoint: what `distill_block` needs to resume mid-block, bit for bit.

`students/block_007-013/checkpoint/`, replaced as a whole (`dtr_core.artifacts.atomic_dir`), so a kill
leaves the previous complete checkpoint or the new one:

    students.safetensors   every live student's state dict, keys `<layer>.<name>`
    optimizer.safetensors  AdamW state, keys `<layer>.<param index>.{exp_avg,exp_avg_sq,step}`
    rng.safetensors        torch's RNG states as uint8 tensors (`cpu`, `cuda`)
    state.json             written last: the block key, the step, the stream position, each layer's
                           `LayerResult` so far (calibration factor, initial losses, status), its loss curve
                           and the held-out variance of the teacher's output

Only tensors and JSON: nothing is unpickled. The learning rate needs no state: `DistillConfig.lr_factor`
gives it from the step.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dtr_core.artifacts import atomic_dir, read_json, write_json

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
STATE = "state.json"
STUDENTS = "students.safetensors"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"


def block_dir(students_dir: str | Path, layers: list[int]) -> Path:
    """`students_dir/block_<first>-<last>`: where the block of `layers` keeps its checkpoint."""
    return Path(students_dir) / f"block_{layers[0]:03d}-{layers[-1]:03d}"


@dataclass
class Checkpoint:
    """A block's training state after `step` optimiser steps (tensors on the CPU)."""

    key: str
    step: int
    position: int  # tokens of the corpus stream consumed
    layers: dict[str, dict[str, Any]]  # layer -> {"result", "curve", "variance"} (JSON-able)
    students: dict[int, dict[str, torch.Tensor]]
    optimizers: dict[int, dict[int, dict[str, torch.Tensor]]]  # layer -> param index -> state
    rng: dict[str, torch.Tensor]


def write_checkpoint(folder: Path, checkpoint: Checkpoint) -> None:
    """`folder/checkpoint/`, atomically; `state.json` is written last."""
    students = {f"{layer}.{name}": t.detach().to("cpu").contiguous()
                for layer, state in checkpoint.students.items() for name, t in state.items()}
    optimizer = {f"{layer}.{index}.{name}": t.detach().to("cpu").contiguous().reshape(t.shape)
                 for layer, states in checkpoint.optimizers.items()
                 for index, state in states.items() for name, t in state.items()}
    with atomic_dir(folder / "checkpoint") as tmp:
        save_file(students, str(tmp / STUDENTS))
        save_file(optimizer, str(tmp / OPTIMIZER))
        save_file({name: t.contiguous() for name, t in checkpoint.rng.items()}, str(tmp / RNG))
        write_json(tmp / STATE, {"format": CHECKPOINT_FORMAT, "key": checkpoint.key, "step": checkpoint.step,
                                 "position": checkpoint.position, "layers": checkpoint.layers})


def read_checkpoint(folder: Path, key: str) -> Checkpoint | None:
    """The checkpoint in `folder/checkpoint/` when it is complete and made for `key`; None otherwise."""
    path = folder / "checkpoint"
    if not (path / STATE).is_file():
        return None
    try:
        state = read_json(path / STATE)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("key") != key:
            logger.info("distill: %s is for other settings; starting the block over", path)
            return None
        students: dict[int, dict[str, torch.Tensor]] = {}
        for name, tensor in load_file(str(path / STUDENTS)).items():
            layer, param = name.split(".", 1)
            students.setdefault(int(layer), {})[param] = tensor
        optimizers: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        for name, tensor in load_file(str(path / OPTIMIZER)).items():
            layer, index, field = name.split(".")
            optimizers.setdefault(int(layer), {}).setdefault(int(index), {})[field] = tensor
        rng = load_file(str(path / RNG))
    except (OSError, ValueError, KeyError) as error:
        logger.warning("distill: %s cannot be read (%s); starting the block over", path, error)
        return None
    return Checkpoint(key=key, step=int(state["step"]), position=int(state["position"]), layers=state["layers"],
                      students=students, optimizers=optimizers, rng=rng)


def remove_checkpoint(folder: Path) -> None:
    """Delete the block's folder (its checkpoint) once every layer of the block is written."""
    shutil.rmtree(folder, ignore_errors=True)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
