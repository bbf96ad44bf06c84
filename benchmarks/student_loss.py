"""Student quality by variant and token budget: held-out normalised loss of blockwise-distilled students.

For each student variant (a set of `MixerConfig` options, e.g. the published forms) and each training budget
(tokens per layer), the asked layers are distilled together on the streamed BBC corpus (`distill_block`: one
teacher pass per step for all of them), and each layer's held-out normalised loss (MSE / Var of the teacher's
attention output on held-out text; 1.0 = no better than the mean) is reported with the student's size against
the teacher attention's. Finished layers are reused by key from `--work-dir`, so a longer budget or a new
variant costs only what is new. Reading the numbers: docs/BENCHMARKS.md, section "Student quality".
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import int_list, name_list, option
from benchmarks.students import WORK_DIR, distill_config

logger = logging.getLogger("benchmarks.student_loss")

# a variant is "default" (today's `MixerConfig`, the published forms) or options joined by "+"
EARLIER = "gate=sigmoid+qk_activation=none+short_conv=false"  # the defaults before the published forms
VARIANTS = ("default", "gate=sigmoid", "qk_activation=none", "short_conv=false", EARLIER)


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = option("smollm2-135m", "teacher: a dtr_core.models.load_model source")
    mixer: str = option("gated_deltanet", "student type")
    layers: tuple[int, ...] = option((3, 15, 27), "layers distilled (together, one teacher pass)", int_list)
    budgets: tuple[int, ...] = option((10 * 1024, 40 * 1024), "training tokens per layer, e.g. 10K,40K,100K",
                                      int_list, minimum=1)
    variants: tuple[str, ...] = option(VARIANTS, "comma-separated variants: default, or MixerConfig options "
                                       "joined by + (short_conv=false, gate=sigmoid, qk_activation=none, ...)",
                                       name_list)
    seq_len: int = option(256, "tokens per training sequence", minimum=1)
    work_dir: str = option(WORK_DIR, "where the students live (reused by key)")


def mixer_options(variant: str) -> dict:
    """`gate=sigmoid+short_conv=false+conv_size=3` -> {"gate": "sigmoid", "short_conv": False, "conv_size": 3};
    a bare name is True; "default" -> {}."""
    if variant == "default":
        return {}
    options = {}
    for part in variant.split("+"):
        name, _, value = part.partition("=")
        options[name] = (True if value.lower() in ("", "true") else False if value.lower() == "false"
                         else int(value) if value.isdigit() else value)
    return options


def check(s: Settings, preset: str | None) -> Settings:
    from dtr_core.mixers import MixerConfig

    harness.check_mixer(s.mixer)
    for variant in s.variants:
        try:
            MixerConfig(**mixer_options(variant))
        except (TypeError, ValueError) as error:
            raise ValueError(f"variant {variant!r}: {error}; options are MixerConfig fields") from error
    return dataclasses.replace(s, budgets=tuple(sorted(set(s.budgets))))


def _parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure(s: Settings) -> dict:
    from dtr_core.artifacts import hash_json
    from dtr_core.distill.block import distill_block
    from dtr_core.distill.corpus import Corpus
    from dtr_core.hybrid.surgery import attention_module
    from dtr_core.mixers import MixerConfig, get_mixer_class
    from dtr_core.distill.config import RANDOM_TEACHER_MAX_NORMALIZED_LOSS
    from dtr_core.models import RANDOM_CONFIGS, load_model
    from dtr_core.run_layout import slug

    model, tokenizer = load_model(s.model)
    model.eval()
    teacher_params = _parameters(attention_module(model, s.layers[0]))
    rows = []
    for variant in s.variants:
        config_values = mixer_options(variant)
        student_params = _parameters(get_mixer_class(s.mixer)(model.config, s.layers[0], MixerConfig(**config_values)))
        for tokens in s.budgets:
            config = distill_config(None, tokens=tokens, seq_len=s.seq_len)
            if s.model in RANDOM_CONFIGS:  # a teacher with random weights: its students cannot beat the mean
                config = dataclasses.replace(config, max_normalized_loss=RANDOM_TEACHER_MAX_NORMALIZED_LOSS)
            student = hash_json(MixerConfig(**config_values).defining_dict())[:12]  # the label may change meaning
            folder = Path(s.work_dir) / "student_loss" / f"{slug(s.model)}-{s.mixer}-{student}-t{tokens}"
            started = time.perf_counter()
            results = distill_block(model, list(s.layers), s.mixer, config, Corpus("bbc", tokenizer), folder,
                                    mixer_config=MixerConfig(**config_values))
            losses = {str(r.layer): r.normalized_loss for r in results}
            logger.info("%s, %d tokens: %s", variant, tokens, {k: round(v, 3) for k, v in losses.items() if v})
            rows.append({"variant": variant, "tokens": config.steps * config.tokens_per_step, "steps": config.steps,
                         "losses": losses, "status": {str(r.layer): r.status for r in results},
                         "reused": all(r.reused for r in results), "seconds": time.perf_counter() - started,
                         "student_params": student_params})
    return {"num_layers": model.config.num_hidden_layers, "teacher_attention_params": teacher_params, "rows": rows}


def _summary(losses: dict) -> tuple[float | None, float | None]:
    values = [v for v in losses.values() if v is not None]
    return (statistics.median(values), max(values)) if values else (None, None)


def markdown(result: dict) -> str:
    s = result["settings"]
    layers = [str(layer) for layer in s["layers"]]
    rows = []
    for r in result["rows"]:
        median, worst = _summary(r["losses"])
        rows.append([r["variant"], r["tokens"], r["steps"],
                     *(f"{r['losses'][layer]:.3f}" if r["losses"].get(layer) is not None else "n/a"
                       for layer in layers),
                     "n/a" if median is None else f"{median:.3f}", "n/a" if worst is None else f"{worst:.3f}",
                     f"{r['student_params'] / 1e6:.2f}M", "reused" if r["reused"] else f"{r['seconds']:.0f} s"])
    return harness.report(f"Student quality: {s['model']}, {s['mixer']} students", result, "\n".join([
        f"Held-out normalised loss (1.0 = no better than predicting the mean) of layers {', '.join(layers)} of "
        f"{result['num_layers']}, distilled together on the BBC corpus in sequences of {s['seq_len']} tokens. "
        f"Parameters per layer: teacher attention {result['teacher_attention_params'] / 1e6:.2f}M.", "",
        harness.markdown_table(["variant", "training tokens per layer", "steps", *(f"layer {x}" for x in layers),
                                "median", "worst", "params per layer", "wall"], rows),
        *(["", f"Note: {result['relabelled']}."] if result.get("relabelled") else [])]))


def plots(result: dict, out_dir: Path) -> list[str]:
    series = []
    for variant in result["settings"]["variants"]:
        points = [(r["tokens"], _summary(r["losses"])[0]) for r in result["rows"] if r["variant"] == variant]
        series.append(harness.Series(variant, [x for x, _ in points], [y for _, y in points]))
    harness.plot_lines(out_dir / "student_loss.png", series, f"Student quality ({result['settings']['model']})",
                       "training tokens per layer", "median held-out normalised loss", logx=True)
    return ["student_loss.png"]


BENCH = harness.Benchmark("students", Settings, measure, markdown, plots, check=check,
                          presets={"quick": dict(model="tiny-llama", layers=(0, 1), budgets=(512, 1024),
                                                 variants=("default", EARLIER), seq_len=64)})
main = BENCH.main

if __name__ == "__main__":
    sys.exit(main())
