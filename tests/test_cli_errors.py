"""How `dtr` fails: one stderr line and the right exit code, the traceback in a log file (or with --verbose)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest

from dtr.cli import EXIT_INTERRUPTED, INTERRUPTED, describe_failure
from dtr.commands.hybridize import parse_layers


def _env(tmp_path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DTR_VERBOSE"}
    return {**env, "DTR_CACHE_DIR": str(tmp_path / "cache"), "DTR_TORCH_THREADS": "1", **extra}


def run_dtr(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dtr.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=_env(tmp_path, **env))


def run_raising(tmp_path, body: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """A real `dtr` process whose command `boom` runs `body` (Python statements)."""
    code = "\n".join([
        "import errno, sys",
        "from dtr import cli",
        "def boom(verbose: bool = cli.typer.Option(False, '--verbose', '-v')):",
        "    cli.start_work()",
        textwrap.indent(textwrap.dedent(body), "    "),
        "cli.app.command('boom')(boom)",
        f"sys.argv = ['dtr', 'boom', *{list(args)!r}]",
        "cli.main()",
    ])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=_env(tmp_path, **env))


@pytest.mark.parametrize("text, message", [
    ("", "--layers is empty"),
    ("   ", "--layers is empty"),
    (" , ", "--layers is empty"),
    ("3-1", "reversed range 3-1; write it as 1-3"),
    ("-1", "negative index (-1); layers count from 0"),
    ("2,-3", "negative index (-3)"),
    ("1-", "is not a list of layer indices"),
    ("a,b", "is not a list of layer indices"),
    ("1.5", "is not a list of layer indices"),
    ("0-4000000000", "layer 4000000000 is beyond any model"),
])
def test_parse_layers_rejects_what_yields_no_layer(text, message):
    with pytest.raises(ValueError) as error:
        parse_layers(text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_parse_layers_reads_lists_and_ranges():
    assert parse_layers("3,7,12") == [3, 7, 12]
    assert parse_layers(" 5-6 , 0,5, ") == [0, 5, 6]
    assert parse_layers("2-2") == [2]


def test_damaged_weights_are_bad_input_found_before_loading(tmp_path, tiny_llama):
    hybrid = tmp_path / "hybrid"
    model, tokenizer = tiny_llama
    model.save_pretrained(hybrid)
    tokenizer.save_pretrained(hybrid)
    weights = hybrid / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a damaged download
    result = run_dtr(tmp_path, "eval", "--model", str(hybrid), "--task", "sentiment", "--limit", "2")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "model.safetensors" in line and "Traceback" not in result.stderr
    assert not (tmp_path / "cache" / "logs").exists()


def test_runtime_failure_is_one_line_and_the_traceback_is_in_the_log(tmp_path, tiny_llama):
    hybrid = tmp_path / "hybrid"
    model, tokenizer = tiny_llama
    model.save_pretrained(hybrid)
    tokenizer.save_pretrained(hybrid)
    config = json.loads((hybrid / "config.json").read_text())
    config["intermediate_size"] *= 2  # every file intact, so the checks pass; the weights no longer fit at load
    (hybrid / "config.json").write_text(json.dumps(config))

    result = run_dtr(tmp_path, "eval", "--model", str(hybrid), "--task", "sentiment", "--limit", "2")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: dtr eval failed: ") and "Traceback" not in result.stderr
    log_file = lines[0].rsplit("(full log: ", 1)[1].rstrip(")")
    assert log_file.startswith(str(tmp_path / "cache" / "logs" / "dtr-eval-"))
    log = open(log_file, encoding="utf-8").read()
    assert "Traceback (most recent call last)" in log

    verbose = run_dtr(tmp_path, "eval", "--model", str(hybrid), "--task", "sentiment", "--limit", "2", "--verbose")
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1].startswith("error: dtr eval failed: ")


def test_user_error_writes_no_log_and_has_no_traceback(tmp_path):
    result = run_dtr(tmp_path, "eval", "--model", "tiny-llama", "--task", "nope")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and "choose one of" in result.stderr
    assert not (tmp_path / "cache" / "logs").exists() and list(tmp_path.iterdir()) == []


def test_runtime_failure_in_a_real_process_is_redacted(tmp_path):
    result = run_raising(tmp_path, 'raise RuntimeError("store https://alice:s3cret@db.example/x refused\\nmore")')
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: dtr boom failed: RuntimeError: store https://***@db.example/x refused; more")
    assert "s3cret" not in result.stderr
    log_file = line.rsplit("(full log: ", 1)[1].rstrip(")")
    log = open(log_file, encoding="utf-8").read()
    assert "Traceback" in log and "s3cret" not in log and "https://***@db.example" in log


def test_attached_log_file_gets_debug_lines_and_tracebacks_the_console_does_not(tmp_path):
    log_file = tmp_path / "runs" / "r1" / "logs" / "convert.log"
    result = run_raising(tmp_path, f"""
        import logging
        cli.attach_log_file({str(log_file)!r})
        logging.getLogger("dtr_core.distill.training").debug("step 7 of layer 3")
        logging.getLogger("dtr_core.distill.training").warning("layer 3 failed")
        try:
            raise ValueError("inner")
        except ValueError:
            logging.getLogger("prefect.flow_runs").error("task crashed", exc_info=True)
        raise RuntimeError("store http://u:pw@host/ down")
    """)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"error: dtr boom failed: RuntimeError: store http://***@host/ down (full log: {log_file})"
    assert "layer 3 failed" in result.stderr and "step 7" not in result.stderr
    assert "Traceback" not in result.stderr and "task crashed" not in result.stderr
    log = log_file.read_text(encoding="utf-8")
    assert "DEBUG dtr_core.distill.training [MainThread]: step 7 of layer 3" in log and "ERROR prefect.flow_runs" in log
    assert log.count("Traceback (most recent call last)") == 2 and "pw@" not in log


def test_interrupt_is_one_line_and_exit_130(tmp_path):
    result = run_raising(tmp_path, "raise KeyboardInterrupt")
    assert result.returncode == EXIT_INTERRUPTED
    assert result.stderr.strip().splitlines() == [INTERRUPTED]
    verbose = run_raising(tmp_path, "raise KeyboardInterrupt", DTR_VERBOSE="1")  # the environment's --verbose
    assert verbose.returncode == EXIT_INTERRUPTED and "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == INTERRUPTED


def test_a_full_disk_is_one_line_in_a_real_process(tmp_path):
    """A 200 KB tmpfs (needs root, as on the project's machines; skipped where mounting is not allowed)."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        result = run_dtr(tmp_path, "hybridize", "--model", "tiny-llama", "--layers", "1", "--out", "small/h")
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            "error: no space left on device writing small/h; free space or choose another --out"]
        assert not list(small.iterdir()), "the half-written folder is gone"
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_disk_full_and_quota_lines():
    line, code = describe_failure(OSError(errno.ENOSPC, "No space left on device", "/r/x/layer_003.safetensors"))
    assert code == 1
    assert line == ("error: no space left on device writing /r/x/layer_003.safetensors; free space or choose "
                    "another --output-dir")
    assert describe_failure(OSError(errno.EDQUOT, "Disk quota exceeded", "/q"))[0].startswith(
        "error: no space left on device writing /q;")
    try:  # a library that wraps the OSError (torch, safetensors) still names the path
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/r/y.bin")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from inner
    except RuntimeError as wrapped:
        assert describe_failure(wrapped)[0].startswith("error: no space left on device writing /r/y.bin;")
    safetensors_error = RuntimeError("Error while serializing: IoError(No space left on device (os error 28))")
    line, code = describe_failure(safetensors_error)
    assert code == 1 and line == "error: no space left on device; free space or choose another --output-dir"


def test_permission_denied_names_the_path(tmp_path, monkeypatch):
    from dtr import cli

    error = PermissionError(errno.EACCES, "Permission denied", "/srv/out")
    monkeypatch.setattr(cli._State, "work_started", False)
    line, code = describe_failure(error)
    assert code == 2 and line.startswith("error: permission denied: /srv/out;")
    monkeypatch.setattr(cli._State, "work_started", True)
    assert describe_failure(error)[1] == 1


def test_user_errors_are_one_line_exit_2(monkeypatch):
    from dtr import cli

    monkeypatch.setattr(cli._State, "work_started", False)
    line, code = describe_failure(ValueError("bad tracking URI postgresql://bob:pw@db/mlflow\nsecond line"))
    assert code == 2 and line == "error: bad tracking URI postgresql://***@db/mlflow; second line"
    assert describe_failure(FileExistsError("x exists"))[1] == 2
    assert describe_failure(FileNotFoundError("no such thing"))[1] == 2


def test_errors_raised_by_the_work_itself_are_runtime_failures(monkeypatch):
    """Once the input checks passed, a ValueError (a run folder in use, a store that stopped answering) is a
    runtime failure: exit 1, and the line points to the log."""
    from dtr import cli

    monkeypatch.setattr(cli._State, "work_started", True)
    line, code = describe_failure(ValueError("run x is in use by another dtr process"), "convert", "/r/x.log")
    assert code == 1 and line == "error: run x is in use by another dtr process (full log: /r/x.log)"


@pytest.mark.parametrize("args, message", [
    (["convert", "--tolerance", "abc"], "error: Invalid value for '--tolerance'"),
    (["convert", "--no-such-option"], "error: No such option: --no-such-option"),
    (["no-such-command"], "error: No such command 'no-such-command'; see `dtr --help`"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, args, message):
    result = run_dtr(tmp_path, *args)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(message)
    assert list(tmp_path.iterdir()) == []


def test_a_log_file_that_cannot_be_written_says_so_once(tmp_path, capsys):
    import logging

    from dtr.cli import RunLogHandler

    handler = RunLogHandler(tmp_path / "run.log", encoding="utf-8")
    handler.stream.close()  # every later write fails, as on a full disk
    handler.stream = open(os.devnull, "rb")  # noqa: SIM115 - a stream that refuses writes
    logger = logging.getLogger("dtr.test_log_file")
    logger.addHandler(handler)
    try:
        for index in range(5):
            logger.warning("record %d", index)
    finally:
        logger.removeHandler(handler)
        handler.stream.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: the log file {tmp_path / 'run.log'} can no longer")


def test_last_line_stays_last_after_prefects_temporary_server_and_home_stays_clean(tmp_path):
    """A command that ran an embedded Prefect flow, then failed: Prefect stops its temporary server at exit,
    after dtr's line, and logs that it does; dtr's `error:` line must still be the last. Prefect's and
    matplotlib's state go under $DTR_CACHE_DIR, not into the user's home."""
    home = tmp_path / "home"
    home.mkdir()
    result = run_raising(tmp_path, """
        import logging
        from dtr.commands.convert import embedded_prefect_settings
        embedded_prefect_settings()  # what `dtr convert` does before it imports Prefect
        from prefect import flow
        import matplotlib.pyplot
        logging.getLogger("httpx").setLevel(logging.WARNING)  # as `dtr convert` sets it: a line per API request
        flow(lambda: 1, name="tiny")()
        raise RuntimeError("after the flow")
    """, HOME=str(home))
    assert result.returncode == 1, result.stderr
    assert "Starting temporary server" in result.stderr  # the embedded server really ran
    assert result.stderr.strip().splitlines()[-1].startswith("error: dtr boom failed: RuntimeError: after the flow")
    assert list(home.iterdir()) == []
    assert (tmp_path / "cache" / "prefect").is_dir() and (tmp_path / "cache" / "matplotlib").is_dir()


@pytest.mark.parametrize("setup, keeps_prefect_home", [
    ({}, False),
    ({"PREFECT_API_URL": "http://127.0.0.1:4200/api"}, True),
    ({"PREFECT_HOME": "/somewhere"}, True),
    ({"dot_prefect": True}, True),
])
def test_prefect_state_moves_to_the_cache_only_without_a_users_prefect_setup(tmp_path, monkeypatch, setup,
                                                                             keeps_prefect_home):
    from dtr.commands.convert import embedded_prefect_settings

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DTR_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in setup.items():
        if name == "dot_prefect":
            (tmp_path / ".prefect").mkdir()
        else:
            monkeypatch.setenv(name, value)
    embedded_prefect_settings()
    assert (os.environ.get("PREFECT_HOME") == str(tmp_path / "cache" / "prefect")) != keeps_prefect_home
    assert (tmp_path / "cache" / "prefect").is_dir() != keeps_prefect_home
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "120"


def test_a_failure_outside_any_command_is_one_line(tmp_path):
    """E.g. a command module that fails to import: still one `error:` line and exit 1, no traceback."""
    code = "\n".join([
        "import sys",
        "from dtr import cli",
        "def broken():",
        "    raise ImportError('cannot import name X from dtr_core.distill.config')",
        "cli._register_commands = broken",
        "sys.argv = ['dtr', 'convert']",
        "cli.main()",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env=_env(tmp_path))
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: dtr convert failed: ImportError: cannot import name X"), line
