"""`dtr hybridize`: build a hybrid from a model and a layer set and save it as a Hugging Face folder.

`--out` must be new, empty, or a folder dtr wrote (e.g. an earlier `dtr hybridize` output, which is
replaced); any other folder is refused before the model loads, unless `--overwrite` says to replace it.
"""

from __future__ import annotations

import errno
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer


_LAYER_PART = re.compile(r"(\d+)(?:\s*-\s*(\d+))?")
_LAYERS_EXAMPLE = "e.g. 3,7,12 or 0-4"
# Far beyond any model's depth (the model's own range is checked in `build_hybrid`); it keeps a typo such as
# 0-4000000000 from building a set of four billion indices.
_MAX_LAYER_INDEX = 100_000


def parse_layers(text: str) -> list[int]:
    """'3,7,12' or '3-5,9' -> sorted unique layer indices (at least one).

    Raises ValueError (one line, with the fix) for empty text, reversed ranges ('3-1'), negative
    indices and anything else that is not a list of layer indices.
    """
    parts = [piece.strip() for piece in text.split(",")]
    if not any(parts):
        raise ValueError(f"--layers is empty; give the layers to make linear, {_LAYERS_EXAMPLE}")
    layers: set[int] = set()
    for part in filter(None, parts):
        match = _LAYER_PART.fullmatch(part)
        if match is None:
            if part.startswith("-") and _LAYER_PART.fullmatch(part[1:]):
                raise ValueError(f"--layers '{text}' has a negative index ({part}); layers count from 0, "
                                 f"write {_LAYERS_EXAMPLE}")
            raise ValueError(f"--layers '{text}' is not a list of layer indices; write {_LAYERS_EXAMPLE}")
        start = int(match[1])
        end = start if match[2] is None else int(match[2])
        if end < start:
            raise ValueError(f"--layers '{text}' has the reversed range {part}; write it as {end}-{start}")
        if end > _MAX_LAYER_INDEX:
            raise ValueError(f"--layers '{text}': layer {end} is beyond any model; {_LAYERS_EXAMPLE}")
        layers.update(range(start, end + 1))
    return sorted(layers)


def _check_writable(out: Path) -> None:
    """A PermissionError naming the folder now (exit 2), not after the model is built, if `out` cannot be made.

    The folder is built next to `out` and renamed into place, so its parent (or the nearest existing
    ancestor) must be writable.
    """
    folder = out.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--out {out}: {folder} is a file, so no folder can be made below it; choose another --out")
    if not os.access(folder, os.W_OK):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder))


def hybridize(
    model: Annotated[str, typer.Option(help="Teacher: built-in name (smollm2-135m, tiny-llama, ...), local folder or hub id.")],
    layers: Annotated[str, typer.Option(help="Layers to make linear, e.g. 3,7,12 or 0-4.")],
    out: Annotated[Path, typer.Option(help="Output folder (save_pretrained layout, safetensors).")],
    mixer: Annotated[str, typer.Option(help="Linear-attention student: gla, gated_deltanet or jetblock.")] = "gated_deltanet",
    students: Annotated[Optional[Path], typer.Option(help="Distillation output folder (runs/<id>/students); default: fresh students initialised from the teacher.")] = None,
    no_rope: Annotated[bool, typer.Option("--no-rope", help="Students without rotary position embedding (NoPE).")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own code from the hub (only if you trust it).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out even if it is a folder dtr did not write (its files are deleted).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="On failure, also print the traceback.")] = False,
) -> None:
    """Build a hybrid: the given layers become linear-attention students; save it."""
    from dtr.cli import start_work
    from dtr_core.artifacts import check_replaceable
    from dtr_core.preflight import check_model_source
    from tasks.params import MixerName

    layer_list = parse_layers(layers)
    if mixer not in typing.get_args(MixerName):
        raise ValueError(f"unknown mixer '{mixer}'; choose one of: {', '.join(typing.get_args(MixerName))}")
    if students is not None and not students.is_dir():
        raise FileNotFoundError(f"students folder {students} does not exist; pass the `students` folder of a run")
    check_replaceable(out, overwrite, option="--overwrite")  # never a user's folder, unless asked
    _check_writable(out)
    facts = check_model_source(model, trust_remote_code=trust_remote_code)
    if layer_list[-1] >= facts.num_layers:
        raise ValueError(f"layer index {layer_list[-1]} is out of range; this model has layers 0..{facts.num_layers - 1}")

    from dtr_core.hybrid.build import build_hybrid, save_hybrid
    from dtr_core.hybrid.model import cache_bytes, layer_map
    from dtr_core.mixers import MixerConfig
    from dtr_core.models import load_model
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per saved shard
    teacher, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    hybrid = build_hybrid(teacher, layer_list, mixer, students, MixerConfig(use_rope=not no_rope))  # checks layers
    start_work(out, option="--out")
    save_hybrid(hybrid, tokenizer, out, overwrite=overwrite)
    kinds = layer_map(hybrid)
    linear = sum(kind != "full" for kind in kinds)
    ratio = cache_bytes(hybrid, 32768) / cache_bytes(teacher, 32768)
    typer.echo(f"saved {out}: {linear}/{len(kinds)} layers linear ({mixer}); cache at 32K context = {ratio:.0%} of the teacher's")


def register(app: typer.Typer) -> None:
    app.command("hybridize")(hybridize)
