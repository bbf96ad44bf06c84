"""`dtr hybridize`: build a hybrid from a model and a layer set and save it as a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def hybridize(
    model: Annotated[str, typer.Option(help="Teacher: built-in name (smollm2-135m, tiny-llama, ...), local folder or hub id.")],
    layers: Annotated[str, typer.Option(help="Layers to make linear, e.g. 3,7,12 or 0-4.")],
    out: Annotated[Path, typer.Option(help="Output folder (save_pretrained layout, safetensors).")],
    mixer: Annotated[str, typer.Option(help="Linear-attention student: gla, gated_deltanet or jetblock.")] = "gated_deltanet",
    students: Annotated[Optional[Path], typer.Option(help="Distillation output folder (runs/<id>/students); default: fresh students initialised from the teacher.")] = None,
    no_rope: Annotated[bool, typer.Option("--no-rope", help="Students without rotary position embedding (NoPE).")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own code from the hub (only if you trust it).")] = False,
) -> None:
    """Build a hybrid: the given layers become linear-attention students; save it."""
    from dtr_core.build_hybrid import build_hybrid, parse_layers, save_hybrid
    from dtr_core.hybrid import cache_bytes, layer_map
    from dtr_core.mixers import MixerConfig, get_mixer_class
    from dtr_core.models import load_model

    layer_list = parse_layers(layers)
    get_mixer_class(mixer)  # fail before loading a model
    if students is not None and not students.is_dir():
        raise FileNotFoundError(f"students folder {students} does not exist; pass the `students` folder of a run")
    teacher, tokenizer = load_model(model, trust_remote_code=trust_remote_code)
    hybrid = build_hybrid(teacher, layer_list, mixer, students, MixerConfig(use_rope=not no_rope))
    save_hybrid(hybrid, tokenizer, out)
    kinds = layer_map(hybrid)
    linear = sum(kind != "full" for kind in kinds)
    ratio = cache_bytes(hybrid, 32768) / cache_bytes(teacher, 32768)
    typer.echo(f"saved {out}: {linear}/{len(kinds)} layers linear ({mixer}); cache at 32K context = {ratio:.0%} of the teacher's")


def register(app: typer.Typer) -> None:
    app.command("hybridize")(hybridize)
