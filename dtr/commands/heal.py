"""`dtr heal`: train a saved hybrid end to end towards its teacher and save the healed hybrid.

    dtr heal --model runs/x/hybrids/opt --teacher smollm2-135m --out runs/x/hybrids/healed-2k --steps 200

Only the students (the linear-attention layers) train, on KL(teacher || hybrid) of the next-token
distributions over the corpus; every other weight stays bit-identical (with `--lora-rank R`, LoRA adapters on
the frozen projections train too and are merged into the saved hybrid). A heal that diverges saves nothing.
`--out` must be new, empty, or a folder dtr wrote, as for `dtr hybridize`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from dtr_core.heal.config import HealConfig


def heal_command(
    model: Annotated[Path, typer.Option(help="The hybrid to heal: a save_pretrained folder dtr wrote (hybridize, or "
                                        "runs/<id>/hybrids/opt).")],
    teacher: Annotated[str, typer.Option(help="Its teacher: built-in name, save_pretrained folder or hub id.")],
    out: Annotated[Path, typer.Option(help="Output folder for the healed hybrid.")],
    corpus: Annotated[str, typer.Option(help="Healing text: 'bbc' (built in), a .txt/.jsonl/.parquet/.csv file or "
                                        "folder, or hf:<dataset>[:<config>]:<split>.")] = "bbc",
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = HealConfig.steps,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = HealConfig.lr,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = HealConfig.batch_size,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = HealConfig.seq_len,
    lora_rank: Annotated[int, typer.Option(help="LoRA adapters (through peft) of this rank on the frozen "
                                           "full-attention and MLP projections, trained with the students and merged "
                                           "into the saved hybrid (0: the students alone train).")] = HealConfig.lora_rank,
    checkpoint_every_steps: Annotated[int, typer.Option(help="A checkpoint every N steps (and every 10 minutes); "
                                                        "a killed heal run again continues from it.")] = HealConfig.checkpoint_every_steps,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out even if dtr did not write it.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="On failure, also print the traceback.")] = False,
) -> None:
    """Heal a hybrid: its students train end to end towards the teacher; save the result."""
    from dtr.cli import start_work
    from dtr_core.artifacts import check_replaceable
    from dtr_core.preflight import check_model_folder, check_model_source

    from tasks.params import check_corpus_exists

    config = HealConfig(steps=steps, lr=lr, batch_size=batch_size, seq_len=seq_len, lora_rank=lora_rank,
                        checkpoint_every_steps=checkpoint_every_steps)
    check_corpus_exists(corpus)
    linear = linear_layers_of(model)
    check_replaceable(out, overwrite, option="--overwrite")
    check_model_folder(model)
    check_model_source(teacher)
    start_work(out, option="--out")

    from dtr_core.artifacts import hash_json
    from dtr_core.distill.corpus import Corpus
    from dtr_core.heal.training import heal, progress_line
    from dtr_core.hybrid.export import save_export
    from dtr_core.models import cache_dir, load_model, model_fingerprint

    teacher_model, tokenizer = load_model(teacher)
    hybrid, _ = load_model(str(model))

    started = time.perf_counter()

    def progress(step: int, total: int, loss: float) -> None:
        typer.echo(progress_line(step, total, loss, time.perf_counter() - started, config), err=True)

    text = Corpus(corpus, tokenizer)
    key = hash_json({"hybrid": model_fingerprint(hybrid), "teacher": model_fingerprint(teacher_model),
                     "heal": config.defining_dict(), "corpus": text.identity})
    result = heal(teacher_model, hybrid, text, config, progress, state_dir=cache_dir() / "heal" / key[:16], key=key)
    if not result.ok:
        raise RuntimeError(f"heal diverged ({result.reason}); nothing saved: lower --lr and run it again")
    save_export(hybrid, tokenizer, out, key, linear[1], {"role": "healed", "healed_from": str(model),
                                                          "heal": result.to_dict()})
    typer.echo(f"saved {out}: {len(linear[0])} linear layers healed; held-out KL to the teacher "
               f"{result.initial_kl:.4f} -> {result.final_kl:.4f} ({result.steps} steps, {result.seconds:.0f} s)")


def linear_layers_of(folder: Path) -> tuple[list[int], str]:
    """(linear layer indices, mixer) from a saved hybrid's config.json, without loading it; ValueError if none."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--model {folder} is not a saved model folder (no config.json); pass a hybrid folder dtr "
                         "wrote (dtr hybridize --out, or runs/<id>/hybrids/opt)")
    try:
        kinds = json.loads(config_path.read_text(encoding="utf-8")).get("dtr_layer_mixers") or []
    except (OSError, ValueError) as error:
        raise ValueError(f"--model {folder}: config.json cannot be read ({error}); re-save the hybrid") from None
    linear = [index for index, kind in enumerate(kinds) if kind != "full"]
    if not linear:
        raise ValueError(f"--model {folder} has no linear-attention layer, so there is nothing to heal; pass a "
                         "hybrid (dtr hybridize, or runs/<id>/hybrids/opt)")
    return linear, kinds[linear[0]]


def register(app: typer.Typer) -> None:
    app.command("heal")(heal_command)
