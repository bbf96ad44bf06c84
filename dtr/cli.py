"""`dtr` console script: one typer app, one module per command under `dtr/commands/`.

Errors that are the user's fault (`ValueError`, `FileNotFoundError` raised by dtr) are printed as one
`error: ...` line with exit code 2, never as a traceback.
"""

from __future__ import annotations

import importlib
import logging
import sys

import typer

app = typer.Typer(
    name="dtr",
    help="Distill-then-Replace: turn a pretrained transformer into a faster task-specific hybrid "
    "of full- and linear-attention layers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules, imported on start; each registers its commands on `app`.
COMMAND_MODULES = ["hybridize", "evaluate", "bench", "convert", "ui"]


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"dtr.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"dtr.commands.{name}":
                continue  # command not built yet
            raise
        module.register(app)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _register_commands()
    try:
        app()
    except (UserError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
