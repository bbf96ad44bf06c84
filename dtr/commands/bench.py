"""`dtr bench <name>`: run a benchmark of `benchmarks/` (the registry `benchmarks.harness.REGISTRY`).

    dtr bench mixers --quick          # linear-attention ops vs SDPA, markdown table
    dtr bench inference               # a full run: publishes into docs/bench/inference/
    dtr bench inference --quick       # a short run: writes into runs/bench-quick/inference/, never into docs/
    dtr bench mixers --threads 1      # other options pass through to the benchmark's own parser

Every benchmark module has `main(argv) -> int`; none is registered when the `benchmarks` package is missing.
"""

from __future__ import annotations

import importlib
import importlib.util

import typer


def _registry() -> dict[str, tuple[str, str]]:
    """name -> (module with `main(argv: list[str] | None) -> int`, one-line help)."""
    try:
        from benchmarks.harness import REGISTRY
    except ModuleNotFoundError:  # the `benchmarks` package itself is missing
        return {}
    return {entry.name: (entry.module, entry.help) for entry in REGISTRY} | {
        "all": ("benchmarks.all", "Every benchmark; assembles docs/BENCHMARKS.md.")}


BENCHMARKS = _registry()


def _module_exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _benchmark_command(module: str):
    def command(
        ctx: typer.Context,
        quick: bool = typer.Option(False, "--quick", help="short settings; writes nothing into docs/"),
        as_json: bool = typer.Option(False, "--json", help="print JSON instead of a markdown table"),
    ) -> None:
        argv = (["--quick"] if quick else []) + (["--json"] if as_json else []) + list(ctx.args)
        raise typer.Exit(importlib.import_module(module).main(argv) or 0)

    return command


def register(app: typer.Typer) -> None:
    bench_app = typer.Typer(
        name="bench",
        help="Run a benchmark from benchmarks/ (--quick, --json, --out; other options pass through).",
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
