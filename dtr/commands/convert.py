"""`dtr convert`: the whole DtR conversion (the Prefect flow `flows/convert.py`) from the command line.

    dtr convert                          # smollm2-135m for `sentiment`, the 2-core budget (profile default)
    dtr convert --profile smoke          # the same path on tiny-llama, well under two minutes
    dtr convert --task trec --mixer gla --max-layers all --runner dask --workers 2

Every flow parameter is an option (help texts are the parameters' own descriptions); options left out come
from the profile, whose values are the parameter models' defaults (`tasks/params.py`) unless it names others.
Parameters are validated before anything starts (one-line error, exit code 2). Prefect
runs embedded unless PREFECT_API_URL is set; MLflow uses MLFLOW_TRACKING_URI or ./mlflow.db.

Once the parameters pass, every log record (dtr's loggers at DEBUG, Prefect's and MLflow's at their own
level, credentials masked) also goes to `runs/<run_id>/logs/convert-<UTC time>.log`; a runtime failure is
one `error:` line that points to that file (`dtr/cli.py`), the traceback only there (or with --verbose).
"""

from __future__ import annotations

import json
import logging
import os
import signal
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import typer


def _help(path: str) -> str:
    """The description of a ConvertParams field ("distill.steps")."""
    from tasks.params import ConvertParams

    model: Any = ConvertParams
    parts = path.split(".")
    for part in parts[:-1]:
        model = model.model_fields[part].annotation
    return model.model_fields[parts[-1]].description or ""


def _verbalisers(values: list[str] | None) -> dict[str, str] | None:
    if not values:
        return None
    parsed = {}
    for value in values:
        if "=" not in value:
            raise ValueError(f"--verbaliser {value!r} must look like LABEL=CONTINUATION, e.g. pos=' positive'")
        label, continuation = value.split("=", 1)
        parsed[label] = continuation
    return parsed


def _max_layers(value: str | None) -> Any:
    if value is None:
        return None
    if value.lower() in ("all", "none"):
        return "unlimited"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--max-layers must be a number or 'all', got {value!r}") from None


def _quiet_libraries(verbose: bool) -> None:
    """Progress lines from the flow stay; per-task state lines and library progress bars go.

    dtr's own loggers and MLflow's are quieted on the console by `dtr.cli.attach_log_file`, which keeps
    them whole in the run's log file.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "WARNING")
        for name in ("alembic", "httpx"):  # a line per migration step and per API request
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("urllib3").setLevel(logging.ERROR)  # a warning per retry when a server goes away
    import warnings

    warnings.filterwarnings("ignore", message=".*type hints to the `predict` method.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def embedded_prefect_settings() -> None:
    """Settings for Prefect's embedded server, made before Prefect is imported (it reads them then).

    - Its database lives under `$DTR_CACHE_DIR/prefect`, not in the user's home. A user's own Prefect setup
      wins: nothing changes when PREFECT_HOME or PREFECT_API_URL is set, or when ~/.prefect exists (the
      user's profiles live there).
    - It may take 120 s to start instead of Prefect's 20: the first start migrates a fresh database, which
      took longer than 20 s on a busy 2-core machine and failed the run.
    """
    from dtr_core.models import cache_dir

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if {"PREFECT_HOME", "PREFECT_API_URL"} & set(os.environ) or (Path.home() / ".prefect").exists():
        return
    home = cache_dir() / "prefect"
    home.mkdir(parents=True, exist_ok=True)  # Prefect itself does not create missing parents
    os.environ["PREFECT_HOME"] = str(home)


def log_file_path(params: Any) -> Path:
    """`<output_dir>/<run_id>/logs/convert-<UTC time>.log`: this run's log (every attempt its own file)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return Path(params.output_dir).resolve() / params.resolved_run_id() / "logs" / f"convert-{stamp}.log"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _k(tokens: int) -> str:
    """2048 -> "2K", 32768 -> "32K", 500 -> "500"."""
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    context, long = summary["speed"]["context_len"], summary["speed"].get("long_context_len")
    table = Table(title=f"{summary['model']} -> {summary['task']} ({summary['metric']}, {summary['mixer']}, "
                        f"{summary['num_layers']} layers)")
    columns = ["model", "linear", "val", "test", f"KV@{_k(context)}", "prefill", "decode"]
    columns += [f"KV@{_k(long)}", f"decode@{_k(long)}"] if long else []
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "linear") else "right", no_wrap=True)
    for row in summary["rows"]:
        cells = [row["model"], str(row["num_linear"]), f"{row['validation']:.3f}", f"{row['test']:.3f}",
                 f"{row['cache_bytes'] / 2**20:.1f} MB", f"{row['prefill_speedup']:.2f}x", f"{row['decode_speedup']:.2f}x"]
        if long:
            cells += [f"{row['long_cache_bytes'] / 2**20:.1f} MB", f"{row.get('long_decode_speedup', 1.0):.2f}x"]
        table.add_row(*cells)
    console = Console(width=max(Console().width, 110))  # not cut to 80 columns when the output is not a terminal
    console.print(table)
    lines = [f"prefill/decode: speedup vs the teacher at {context} tokens"
             + (f"; decode@{_k(long)}: from a synthetic {long}-token cache" if long else "")
             + f"; val/test: {summary['metric']}",
             f"search: {summary['rounds']} rounds, stopped: {summary['stop_reason']}, P_min {summary['p_min']:.4f}; "
             f"wall time {summary['seconds'] / 60:.1f} min",
             f"run folder: {summary['run_dir']}"]
    lines += [f"failed layer {failed['layer']} (never offered to the search): {failed['reason']}"
              for failed in summary.get("failed_layers") or []]
    for row in summary["rows"][1:]:
        layers = ", ".join(map(str, row["linear_layers"])) or "none"
        lines.append(f"{row['model']}: {row['path']}  (linear layers: {layers})")
    lines.append(f"MLflow run: {summary['mlflow']['url']}")
    for role, info in (summary.get("registered") or {}).items():
        lines.append(f"registered: {info['registered_uri']} (version {info['version']})"
                     + (f"; {info['reason']}" if info.get("reason") else ""))
    typer.echo("\n".join(lines))


def convert_command(
    profile: str = typer.Option("default", "--profile", "-p", help="Starting point: default (smollm2-135m on "
                                "sentiment, <= 20 min on 2 CPU cores) or smoke (tiny-llama, < 2 min)"),
    model: str | None = typer.Option(None, "--model", "-m", help=_help("model")),
    task: str | None = typer.Option(None, "--task", "-t", help=_help("task.name")),
    data_file: str | None = typer.Option(None, "--data-file", help=_help("task.data_file")),
    text_column: str | None = typer.Option(None, "--text-column", help=_help("task.text_column")),
    label_column: str | None = typer.Option(None, "--label-column", help=_help("task.label_column")),
    template: str | None = typer.Option(None, "--template", help=_help("task.template")),
    verbaliser: list[str] | None = typer.Option(None, "--verbaliser", help="data_file: LABEL=CONTINUATION "
                                                "(repeat per label), e.g. --verbaliser pos=' positive'"),
    validation_limit: int | None = typer.Option(None, "--val-limit", help=_help("task.validation_limit")),
    test_limit: int | None = typer.Option(None, "--test-limit", help=_help("task.test_limit")),
    metric: str | None = typer.Option(None, "--metric", help=_help("task.metric")),
    verbaliser_scoring: str | None = typer.Option(None, "--verbaliser-scoring",
                                                  help=_help("task.verbaliser_scoring")),
    reference_column: list[str] | None = typer.Option(None, "--reference-column", help=_help("task.reference_columns")
                                                      + " (repeat for several)"),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help=_help("task.max_new_tokens")),
    stop: list[str] | None = typer.Option(None, "--stop", help=_help("task.stop") + " (repeat for several)"),
    answer_regex: str | None = typer.Option(None, "--answer-regex", help=_help("task.answer_regex")),
    mixer: str | None = typer.Option(None, "--mixer", help=_help("mixer") + ": gated_deltanet, gla or jetblock"),
    corpus: str | None = typer.Option(None, "--corpus", help=_help("distill.corpus")),
    tokens: str | None = typer.Option(None, "--distill-tokens", help=_help("distill.tokens") + " (e.g. 40960 or 1e8)"),
    seq_len: str | None = typer.Option(None, "--seq-len", help=_help("distill.seq_len")),
    layers_per_task: int | None = typer.Option(None, "--layers-per-task", help=_help("distill.layers_per_task")),
    checkpoint_every_steps: int | None = typer.Option(None, "--checkpoint-every-steps",
                                                      help=_help("distill.checkpoint_every_steps")),
    steps: int | None = typer.Option(None, "--steps", help=_help("distill.steps")),
    lr: float | None = typer.Option(None, "--lr", help=_help("distill.lr")),
    distill_batch_size: int | None = typer.Option(None, "--distill-batch-size", help=_help("distill.batch_size")),
    max_normalized_loss: float | None = typer.Option(None, "--max-normalized-loss",
                                                     help=_help("distill.max_normalized_loss")),
    tolerance_mode: str | None = typer.Option(None, "--tolerance-mode", help=_help("tolerance.mode")),
    tolerance: float | None = typer.Option(None, "--tolerance", help=_help("tolerance.value")),
    acceptance: str | None = typer.Option(None, "--acceptance", help=_help("acceptance.mode")),
    confidence: float | None = typer.Option(None, "--confidence", help=_help("acceptance.confidence")),
    resamples: int | None = typer.Option(None, "--resamples", help=_help("acceptance.resamples")),
    max_layers: str | None = typer.Option(None, "--max-layers", help=_help("max_layers") + "; 'all' for no cap"),
    seed: int | None = typer.Option(None, "--seed", help=_help("seed")),
    runner: str | None = typer.Option(None, "--runner", help=_help("runner.kind")),
    workers: int | None = typer.Option(None, "--workers", help=_help("runner.workers")),
    dask_address: str | None = typer.Option(None, "--dask-address", help=_help("runner.dask_address")),
    context_len: int | None = typer.Option(None, "--context-len", help=_help("speed.context_len")),
    long_context_len: int | None = typer.Option(None, "--long-context-len", help=_help("speed.long_context_len")),
    decode_tokens: int | None = typer.Option(None, "--decode-tokens", help=_help("speed.decode_tokens")),
    speed_repeats: int | None = typer.Option(None, "--speed-repeats", help=_help("speed.repeats")),
    heal: bool | None = typer.Option(None, "--heal/--no-heal", help=_help("heal.enabled")),
    heal_steps: int | None = typer.Option(None, "--heal-steps", help=_help("heal.steps")),
    heal_lr: float | None = typer.Option(None, "--heal-lr", help=_help("heal.lr")),
    heal_seq_len: int | None = typer.Option(None, "--heal-seq-len", help=_help("heal.seq_len")),
    heal_corpus: str | None = typer.Option(None, "--heal-corpus", help=_help("heal.corpus")),
    heal_every: int | None = typer.Option(None, "--heal-every", help=_help("heal.every")),
    heal_lora_rank: int | None = typer.Option(None, "--heal-lora-rank", help=_help("heal.lora_rank")),
    heal_task_lm_weight: float | None = typer.Option(None, "--heal-task-lm-weight",
                                                     help=_help("heal.task_lm_weight")),
    tracking_uri: str | None = typer.Option(None, "--tracking-uri", help=_help("tracking.tracking_uri")),
    experiment: str | None = typer.Option(None, "--experiment", help=_help("tracking.experiment")),
    register_models: bool | None = typer.Option(None, "--register/--no-register",
                                                help=_help("tracking.register_models")),
    model_name: str | None = typer.Option(None, "--model-name", help=_help("tracking.model_name")),
    promote: str | None = typer.Option(None, "--promote", help=_help("tracking.promote")),
    output_dir: str | None = typer.Option(None, "--output-dir", "-o", help=_help("output_dir")),
    run_id: str | None = typer.Option(None, "--run-id", help=_help("run_id")),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object at the end"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also show per-task and library log lines, "
                                 "and a failure's traceback"),
) -> None:
    """Convert a pretrained transformer into a task-specific hybrid (Distill-then-Replace), end to end."""
    from tasks.params import build_params, check_params_once

    layers_cap = _max_layers(max_layers)
    overrides: dict[str, Any] = {
        "model": model, "mixer": mixer, "seed": seed, "output_dir": output_dir, "run_id": run_id,
        "max_layers": None if layers_cap is None else layers_cap,
        "task": {"name": task, "data_file": data_file, "text_column": text_column, "label_column": label_column,
                 "template": template, "verbalisers": _verbalisers(verbaliser),
                 "validation_limit": validation_limit, "test_limit": test_limit, "metric": metric,
                 "verbaliser_scoring": verbaliser_scoring, "reference_columns": reference_column or None,
                 "max_new_tokens": max_new_tokens, "stop": stop or None, "answer_regex": answer_regex},
        "distill": {"corpus": corpus, "tokens": tokens, "seq_len": seq_len, "steps": steps, "lr": lr,
                    "batch_size": distill_batch_size, "layers_per_task": layers_per_task,
                    "checkpoint_every_steps": checkpoint_every_steps,
                    "max_normalized_loss": max_normalized_loss},
        "tolerance": {"mode": tolerance_mode, "value": tolerance},
        "acceptance": {"mode": acceptance, "confidence": confidence, "resamples": resamples},
        "runner": {"kind": runner, "workers": workers, "dask_address": dask_address},
        "speed": {"context_len": context_len, "long_context_len": long_context_len, "decode_tokens": decode_tokens,
                  "repeats": speed_repeats},
        "heal": {"enabled": heal, "steps": heal_steps, "lr": heal_lr, "seq_len": heal_seq_len, "corpus": heal_corpus,
                 "every": heal_every, "lora_rank": heal_lora_rank, "task_lm_weight": heal_task_lm_weight},
        "tracking": {"tracking_uri": tracking_uri, "experiment": experiment, "register_models": register_models,
                     "model_name": model_name, "promote": promote},
    }
    overrides = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v)
                 for k, v in overrides.items()}
    if overrides.get("max_layers") == "unlimited":
        overrides["max_layers"] = None
        unlimited = True
    else:
        unlimited = False
    params = build_params(profile, **overrides)
    if unlimited:
        params = params.model_copy(update={"max_layers": None})
    check_params_once(params)  # before Prefect or any model starts: one-line errors; the flow does not repeat it
    _quiet_libraries(verbose)
    from dtr.cli import attach_log_file, start_work
    from dtr_core.artifacts import write_marker

    # only now, with the input checked, is anything written: the run folder is marked as dtr's first, so a
    # run that fails before its flow starts (e.g. Prefect's server not starting) can be started again
    log_path = log_file_path(params)
    write_marker(log_path.parent.parent, kind="run")
    log_file = attach_log_file(log_path)
    start_work(log_file.parent.parent)
    embedded_prefect_settings()
    from flows.convert import run_convert  # imports prefect and mlflow, which set up their logging on import

    typer.echo(f"dtr convert: {params.model} for '{params.task.label}' (profile {profile}, mixer {params.mixer}, "
               f"runner {params.runner.kind} x{params.runner.workers}) -> "
               f"{os.path.join(params.output_dir, params.resolved_run_id())}")
    typer.echo(f"log: {log_file}")

    # SIGTERM ends the run like Ctrl-C: the flow is marked crashed, the MLflow run FAILED and the temporary
    # Prefect server stopped (the default action would leave it running). The run folder stays resumable.
    signal.signal(signal.SIGTERM, _interrupt)
    summary = run_convert(params)
    _print_summary(summary)
    if as_json:
        typer.echo(json.dumps(summary))


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_command)
