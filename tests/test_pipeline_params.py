"""Bad parameters are rejected before any work, with one clear line (library, flow and CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_support import tiny_params

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("fresh_runtime_cache")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"distill": {"steps": 0}}, "distill.steps"),
    ({"mixer": "mamba"}, "mixer"),
    ({"runner": {"kind": "ray"}}, "runner.kind"),
    ({"runner": {"workers": 0}}, "runner.workers"),
    ({"distill": {"tokens": 0}}, "distill.tokens"),
    ({"distill": {"tokens": -5}}, "distill.tokens"),
    ({"distill": {"tokens": "many"}}, "distill.tokens"),
    ({"distill": {"seq_len": 0}}, "distill.seq_len"),
    ({"distill": {"seq_len": "64,0"}}, "distill.seq_len"),
    ({"distill": {"layers_per_task": 0}}, "distill.layers_per_task"),
    ({"distill": {"eval_sequences": 0}}, "distill.eval_sequences"),
    ({"task": {"validation_limit": 0}}, "task.validation_limit"),
    ({"acceptance": {"confidence": 1.5}}, "acceptance.confidence"),
    ({"max_layers": -1}, "max_layers"),
    ({"max_layers": 0}, "max_layers"),
    ({"run_id": "../../x"}, "run_id"),
    ({"tracking": {"model_name": "team/model"}}, "tracking.model_name"),
    ({"unknown": 1}, "unknown"),
])
def test_pydantic_rejects_with_one_line(tmp_path, overrides, message):
    with pytest.raises(ValueError) as error:
        tiny_params(tmp_path, **overrides)
    text = str(error.value)
    assert message in text and "\n" not in text


@pytest.mark.parametrize(("overrides", "message"), [
    ({"model": str(Path("/nonexistent/model"))}, "neither a built-in name"),
    ({"task": {"name": "imdb"}}, "unknown task"),
    ({"task": {"data_file": "/nonexistent/data.csv"}}, "needs verbalisers"),
    ({"task": {"data_file": "/nonexistent/data.csv", "verbalisers": {"a": " yes", "b": " no"}}}, "does not exist"),
    ({"distill": {"corpus": "/nonexistent/corpus.txt"}}, "corpus"),
    ({"distill": {"seq_len": 8192}}, "above the model's max_position_embeddings (4096)"),
    ({"distill": {"seq_len": "64,5000"}}, "sequence length 5000 is above"),
    ({"tolerance": {"mode": "relative", "value": 1.5}}, "relative tolerance"),
    ({"runner": {"kind": "threads", "dask_address": "tcp://127.0.0.1:8786"}}, "dask_address"),
    ({"tracking": {"tracking_uri": "http://127.0.0.1:9"}}, "unreachable"),
    ({"tracking": {"tracking_uri": "file:///tmp/mlruns"}}, "file store"),
])
def test_check_params_rejects_with_one_line(tmp_path, overrides, message):
    from tasks.params import check_params

    with pytest.raises((ValueError, FileNotFoundError)) as error:
        check_params(tiny_params(tmp_path, **overrides))
    text = str(error.value)
    assert message in text and "\n" not in text


def test_unreadable_or_empty_corpus_is_one_line(tmp_path):
    from tasks.params import check_params

    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": " "}\n')
    unreadable = tmp_path / "locked.txt"
    unreadable.write_text("text")
    unreadable.chmod(0)
    cases = [(empty, "holds no text"), (tmp_path / "table.xlsx", "is not one of")]
    (tmp_path / "table.xlsx").write_text("x")
    if os.geteuid() != 0:  # root reads any file
        cases.append((unreadable, "cannot be read"))
    for corpus, message in cases:
        with pytest.raises(ValueError) as error:
            check_params(tiny_params(tmp_path, distill={"corpus": str(corpus)}))
        assert message in str(error.value) and "\n" not in str(error.value)


def test_budget_in_tokens_accepts_1e8_and_a_length_mix(tmp_path):
    params = tiny_params(tmp_path, distill={"tokens": "1e8", "seq_len": "32,64", "steps": None})
    assert params.distill.tokens == 10**8 and params.distill.seq_lens == (32, 64)
    config = params.distill.distill_config(seed=0)
    assert config.steps == 10**8 // (4 * 32) and config.sequences_at(1) == (2, 64)  # 781,250 steps of 128


def test_flow_rejects_before_any_work(tmp_path, prefect_harness):
    from flows.convert import convert

    params = tiny_params(tmp_path)
    bad = params.model_copy(update={"tolerance": params.tolerance.model_copy(update={"value": 2.0})})
    with pytest.raises(ValueError, match="relative tolerance"):
        convert(**{name: getattr(bad, name) for name in bad.model_dump()})
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_cli_prints_one_line_and_exits_2(tmp_path):
    dtr = Path(sys.executable).parent / "dtr"
    out = subprocess.run([str(dtr), "convert", "--profile", "smoke", "--steps", "0", "--output-dir",
                          str(tmp_path / "runs")], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == ["error: invalid parameters: distill.steps: Input should be greater "
                                               "than or equal to 1 (got 0)"]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_cli_help_documents_every_flow_parameter():
    from typer.testing import CliRunner

    from dtr.cli import _register_commands, app

    _register_commands()
    result = CliRunner().invoke(app, ["convert", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0
    for option in ("--model", "--task", "--data-file", "--template", "--verbaliser", "--mixer", "--corpus",
                   "--distill-tokens", "--seq-len", "--steps", "--lr", "--tolerance-mode", "--tolerance",
                   "--acceptance", "--max-layers", "--seed", "--runner", "--workers", "--dask-address",
                   "--context-len", "--tracking-uri", "--experiment", "--register", "--output-dir", "--run-id",
                   "--profile", "--max-normalized-loss", "--layers-per-task", "--metric", "--verbaliser-scoring",
                   "--reference-column", "--max-new-tokens", "--stop", "--answer-regex", "--heal", "--heal-steps",
                   "--heal-lr", "--heal-every", "--heal-lora-rank", "--heal-task-lm-weight", "--promote"):
        assert option in result.output, option


def test_parameters_are_checked_once_per_process(tmp_path, monkeypatch):
    import tasks.params as module

    calls = []
    monkeypatch.setattr(module, "check_params", lambda params: calls.append(params))
    monkeypatch.setattr(module, "_last_checked", {"hash": None})
    params = tiny_params(tmp_path)
    module.check_params_once(params)
    module.check_params_once(params.model_copy())  # the same parameters: not checked again
    assert len(calls) == 1
    other = tiny_params(tmp_path, seed=1)
    module.check_params_once(other)
    assert calls == [params, other]


def test_a_failed_check_is_not_remembered(tmp_path, monkeypatch):
    import tasks.params as module

    def refuse(params):
        raise ValueError("no")

    monkeypatch.setattr(module, "check_params", refuse)
    monkeypatch.setattr(module, "_last_checked", {"hash": None})
    params = tiny_params(tmp_path)
    for _ in range(2):
        with pytest.raises(ValueError, match="no"):
            module.check_params_once(params)
