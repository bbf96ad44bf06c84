"""`dtr bench <name>`: run a benchmark from `benchmarks/` (each a module with `main(argv) -> int`).

    dtr bench mixers --quick          # linear-attention ops vs SDPA, markdown table
    dtr bench mixers --json           # the full run, as JSON
    dtr bench mixers --threads 1      # other options pass through to the module's own parser

A benchmark is one line in `BENCHMARKS`; only those whose module exists are registered.
"""

from __future__ import annotations

import importlib
import importlib.util

import typer

# name -> (module with `main(argv: list[str] | None) -> int`, one-line help); registered if the module exists
BENCHMARKS: dict[str, tuple[str, str]] = {
    "mixers": ("benchmarks.mixers", "CPU time of the linear-attention ops (naive, chunked, step) vs causal SDPA."),
    "search": ("benchmarks.search_cost", "Greedy search cost: fast evaluator vs the plain one, same answer."),
    "distill": ("benchmarks.distill_cost", "Blockwise distillation cost per layer, 1 vs 2 workers."),
    "inference": ("benchmarks.inference", "Hybrid vs teacher: prefill/decode speed and cache size."),
    "placements": ("benchmarks.placements", "Layer placements: greedy DtR vs baselines."),
    "recall": ("benchmarks.recall", "Long-context recall probe: teacher vs hybrid."),
    "all": ("benchmarks.all", "Every benchmark; assembles docs/BENCHMARKS.md."),
}


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the `benchmarks` package itself is missing
        return False


def _benchmark_command(module: str):
    def command(
        ctx: typer.Context,
        quick: bool = typer.Option(False, "--quick", help="short settings (minutes, not tens of minutes)"),
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of a markdown table"),
    ) -> None:
        argv = (["--quick"] if quick else []) + (["--json"] if as_json else []) + list(ctx.args)
        raise typer.Exit(importlib.import_module(module).main(argv) or 0)

    return command


def register(app: typer.Typer) -> None:
    bench_app = typer.Typer(
        name="bench",
        help="Run a benchmark from benchmarks/ (--quick, --json; other options pass through).",
        no_args_is_help=True,
    )
    for name, (module, help_text) in BENCHMARKS.items():
        if _module_exists(module):
            bench_app.command(
                name,
                help=help_text,
                context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
            )(_benchmark_command(module))
    app.add_typer(bench_app, name="bench")
