"""`dtr` console script: one typer app, one module per command under `dtr/commands/`.

Every command fails with one line on stderr, never a traceback (the traceback is printed too only with the
command's `--verbose` / `-v`, or with `DTR_VERBOSE=1`). `report_failure` decides line and exit code:

- the user's input (`UserError`, `ValueError` incl. pydantic's, `FileNotFoundError`, `FileExistsError`):
  `error: <message>`, exit 2; the same errors raised once the work has started (`start_work()`, e.g. the run
  folder in use by another process, a tracking store that stopped answering) are runtime failures:
  `error: <message> (full log: <path>)`, exit 1;
- no space left (ENOSPC, EDQUOT): `error: no space left on device writing <path>; free space or choose
  another --output-dir` (the command's own option, see `start_work`), exit 1;
- `PermissionError`: `error: permission denied: <path>; ...`, exit 2 while the command is still checking
  its input, 1 once its work has started (`start_work()`);
- Ctrl-C (and SIGTERM in `dtr convert`): `interrupted; run the same command again to resume`, exit 130;
- anything else: `error: dtr <command> failed: <Type>: <message> (full log: <path>)`, exit 1. The traceback
  goes to the command's log file: the run's log for `dtr convert` (`attach_log_file`), else
  `$DTR_CACHE_DIR/logs/dtr-<command>-<UTC time>.log` (default `~/.cache/dtr/logs`), written only then.

Printed and logged text goes through `dtr_core.redaction.redact` (URL credentials masked).
"""

from __future__ import annotations

import errno
import functools
import importlib
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from typer import _click as click  # typer vendors click; its usage errors are these classes
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
COMMAND_MODULES = ["hybridize", "heal", "evaluate", "bench", "convert", "ui"]

VERBOSE_ENV = "DTR_VERBOSE"
EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
INTERRUPTED = "interrupted; run the same command again to resume"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
# dtr's own loggers: DEBUG into a log file; on the console INFO with --verbose, else WARNING and up.
OWN_LOGGERS = ("dtr", "dtr_core", "tasks", "flows", "benchmarks")
# Libraries with their own console handler (propagate=False): the log file is attached to them too.
SEPARATE_LOGGERS = ("mlflow",)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s]: %(message)s"


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 2."""


# The user's input: exit 2 while the command checks its input; raised once the work has started, exit 1.
USAGE_ERRORS = (UserError, ValueError, FileNotFoundError, FileExistsError)


class _State:
    """What the failure report needs to know about the running command (one command per process)."""

    verbose = False
    work_started = False
    output: Path | None = None  # where the command writes, named when the disk fills up
    output_option = "--output-dir"
    log_handler: logging.FileHandler | None = None


def redact(text: str) -> str:
    """`dtr_core.redaction.redact`, imported on use (importing dtr_core loads torch)."""
    from dtr_core.redaction import redact as redact_text

    return redact_text(text)


def is_verbose() -> bool:
    return _State.verbose or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def start_work(output: str | os.PathLike | None = None, option: str = "--output-dir") -> None:
    """The command has checked its input; a `PermissionError` from now on is a runtime failure (exit 1).

    `output` (what the command writes) and `option` (how the user chooses it) complete the no-space line
    when the failing write does not name its file.
    """
    _State.work_started = True
    _State.output = None if output is None else Path(output)
    _State.output_option = option


def one_line(text: str) -> str:
    """`text` as one redacted line (a multi-line message's lines joined with '; ')."""
    return redact("; ".join(line.strip() for line in str(text).splitlines() if line.strip()))


# --- logging -----------------------------------------------------------------------------------------------

class RedactFilter(logging.Filter):
    """Masks credentials in a record's message and traceback before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class ConsoleFilter(logging.Filter):
    """What the console shows while a log file takes everything: no tracebacks (unless verbose), and dtr's
    own loggers from WARNING (INFO with verbose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if is_verbose():
            return record.name.split(".")[0] not in OWN_LOGGERS or record.levelno >= logging.INFO
        if record.exc_info or record.exc_text:
            return False
        return record.name.split(".")[0] not in OWN_LOGGERS + SEPARATE_LOGGERS or record.levelno >= logging.WARNING


class RunLogHandler(logging.FileHandler):
    """The run's log file. When a write fails (a full disk), it says so once on stderr and stops writing,
    instead of logging's default of a traceback on stderr for every later record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            error = sys.exc_info()[1]
            print(one_line(f"warning: the log file {self.baseFilename} can no longer be written ({error}); "
                           "logging to it stopped"), file=sys.stderr, flush=True)

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)


def _console_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in SEPARATE_LOGGERS]
    return [handler for logger in loggers for handler in logger.handlers
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]


def attach_log_file(path: str | os.PathLike) -> Path:
    """Send every log record (dtr's loggers at DEBUG, libraries at their own level) to the file `path`.

    Call it after the command's input checks passed (bad input writes nothing), and after importing the
    libraries that configure logging on import (prefect, mlflow). The console keeps its lines, without
    tracebacks; a runtime failure's line points to this file. Both see messages with credentials masked.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = RunLogHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RedactFilter())
    for console in _console_handlers():
        console.addFilter(RedactFilter())
        console.addFilter(ConsoleFilter())
    for name in ("", *SEPARATE_LOGGERS):
        logging.getLogger(name).addHandler(handler)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    _State.log_handler = handler
    logging.getLogger("dtr.cli").debug("dtr %s", " ".join(sys.argv[1:]))
    return path


def _log_traceback(error: BaseException, command: str) -> Path | None:
    """Write `error`'s traceback to the command's log file; its path, or None if it cannot be written."""
    record = logging.LogRecord("dtr.cli", logging.ERROR, __file__, 0, "dtr %s failed", (command,),
                               (type(error), error, error.__traceback__))
    RedactFilter().filter(record)
    if _State.log_handler is not None:
        try:
            _State.log_handler.handle(record)
            _State.log_handler.flush()
            return Path(_State.log_handler.baseFilename)
        except OSError:
            pass
    try:
        from dtr_core.models import cache_dir

        folder = cache_dir() / "logs"
    except Exception:  # the failure may be a broken install: a log is still worth having
        folder = Path(tempfile.gettempdir()) / "dtr-logs"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = folder / f"dtr-{command.replace(' ', '-') or 'cli'}-{stamp}-{os.getpid()}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(logging.Formatter(LOG_FORMAT).format(record) + "\n", encoding="utf-8")
    except OSError:
        return None
    return path


# --- failures ----------------------------------------------------------------------------------------------

def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _no_space(error: BaseException) -> tuple[bool, str | None]:
    """(is it a full disk or quota, the path being written if known) over the exception chain."""
    found, path = False, None
    for item in _chain(error):
        if isinstance(item, OSError) and item.errno in _NO_SPACE:
            found = True
            path = path or item.filename
        elif any(text in str(item).lower() for text in _NO_SPACE_TEXT):
            found = True
    return found, path


def describe_failure(error: BaseException, command: str = "", log_file: str | os.PathLike | None = None
                     ) -> tuple[str, int]:
    """The one line to print for `error` and the exit code (see the module docstring)."""
    if isinstance(error, KeyboardInterrupt):
        return INTERRUPTED, EXIT_INTERRUPTED
    full, path = _no_space(error)
    if full:
        path = path or _State.output
        where = f" writing {os.fsdecode(path)}" if path else ""
        return one_line(f"error: no space left on device{where}; free space or choose another "
                        f"{_State.output_option}"), EXIT_RUNTIME
    if isinstance(error, PermissionError):
        target = os.fsdecode(error.filename) if error.filename else str(error)
        code = EXIT_RUNTIME if _State.work_started else EXIT_USAGE
        return one_line(f"error: permission denied: {target}; check its permissions or choose another path"), code
    log = f"full log: {log_file}" if log_file else "no log file could be written"
    if isinstance(error, USAGE_ERRORS):
        if not _State.work_started:
            return one_line(f"error: {error}"), EXIT_USAGE
        return f"{one_line(f'error: {error}')} ({log})", EXIT_RUNTIME  # raised by the work itself
    message = one_line(str(error))
    what = type(error).__name__ + (f": {message}" if message else "")
    if len(what) > 400:
        what = what[:400] + "..."
    return f"error: dtr {command or 'command'} failed: {what} ({log})", EXIT_RUNTIME


def report_failure(error: BaseException, command: str) -> int:
    """Print the failure's line on stderr (the traceback first with --verbose); its exit code."""
    usage = isinstance(error, USAGE_ERRORS + (PermissionError,)) and not _State.work_started
    expected = usage or isinstance(error, KeyboardInterrupt) or _no_space(error)[0]
    log_file = None if expected else _log_traceback(error, command)
    if is_verbose():
        print(redact("".join(traceback.format_exception(error))), file=sys.stderr, end="")
    line, code = describe_failure(error, command, log_file)
    quiet_prefect_exit()
    print(line, file=sys.stderr, flush=True)
    return code


def quiet_prefect_exit() -> None:
    """Keep dtr's last line last: Prefect logs "Stopping temporary server" at exit on its `prefect` logger."""
    logging.getLogger("prefect").setLevel(logging.WARNING)


def _guarded(callback: Callable[..., Any], command: str) -> Callable[..., Any]:
    """`callback` with every failure turned into its one line and exit code (`report_failure`)."""

    @functools.wraps(callback)
    def run(*args: Any, **kwargs: Any) -> Any:
        _State.verbose = bool(kwargs.get("verbose", False))
        try:
            return callback(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.exceptions.TyperException):  # exit codes, usage errors: typer's
            raise
        except (Exception, KeyboardInterrupt) as error:
            raise typer.Exit(report_failure(error, command)) from None

    run.dtr_guarded = True  # type: ignore[attr-defined]
    return run


def _guard_commands(typer_app: typer.Typer, prefix: str = "") -> None:
    for info in typer_app.registered_commands:
        if info.callback is not None and not getattr(info.callback, "dtr_guarded", False):
            name = info.name or info.callback.__name__.replace("_", "-")
            info.callback = _guarded(info.callback, f"{prefix}{name}")
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _guard_commands(group.typer_instance, f"{prefix}{group.name or group.typer_instance.info.name} ")


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"dtr.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"dtr.commands.{name}":
                continue  # command not built yet
            raise
        module.register(app)
    _guard_commands(app)


# Library chatter that is not the user's business: progress bars per loaded shard, transformers' load reports
# (their content reaches the user through the error they explain). Set before the libraries are imported;
# the user's own environment wins.
QUIET_LIBRARIES = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error",
                   "TOKENIZERS_PARALLELISM": "false"}


def main() -> None:
    from dtr_core.models import cache_dir

    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MPLCONFIGDIR", str(cache_dir() / "matplotlib"))  # not ~/.config: dtr's own cache
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        _register_commands()
        code = app(standalone_mode=False, prog_name="dtr")  # usage errors come back to us as exceptions, to print in one line
        quiet_prefect_exit()
    except click.exceptions.ClickException as error:  # a bad option or command: typer's box would be 5 lines
        print(usage_line(error), file=sys.stderr, flush=True)
        sys.exit(error.exit_code)
    except typer.Abort:
        print(INTERRUPTED, file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except (Exception, KeyboardInterrupt) as error:  # outside any command (its own failures are guarded)
        sys.exit(report_failure(error, " ".join(arg for arg in sys.argv[1:2] if not arg.startswith("-"))))
    sys.exit(code if isinstance(code, int) else 0)


def usage_line(error: click.exceptions.ClickException) -> str:
    """A command-line usage error as one line: the problem, then where the valid options are listed."""
    context = getattr(error, "ctx", None)
    help_hint = f"; see `{context.command_path} --help`" if context is not None else "; see `dtr --help`"
    return one_line(f"error: {error.format_message().rstrip('.')}") + help_hint


if __name__ == "__main__":  # `python -m dtr.cli`: run the imported module, whose state the commands share
    from dtr.cli import main as imported_main

    imported_main()
