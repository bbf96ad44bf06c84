"""The mixer benchmark's output shape (tiny sizes, seconds); says nothing about speed."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from benchmarks import mixers
from dtr.commands import bench


def test_tiny_json_has_one_row_per_op_impl_and_length(capsys):
    assert mixers.main(["--tiny", "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = {(row["op"], row["impl"], row["length"]) for row in result["rows"]}
    expected = {
        (op, impl, length)
        for length in mixers.TINY_LENGTHS
        for op, impls in [("gla", ("naive", "chunk", "step")), ("gated_delta_rule", ("naive", "chunk", "step")),
                          ("attention", ("sdpa", "sdpa_decode"))]
        for impl in impls
    }
    assert keys == expected and len(result["rows"]) == len(expected)
    for row in result["rows"]:
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["unit"] == ("token" if row["impl"] in ("step", "sdpa_decode") else "sequence")
        assert row["vs_sdpa"] is not None and row["vs_sdpa"] > 0
        assert (row["vs_naive"] is None) == (row["op"] == "attention")
    assert result["machine"]["torch_threads"] == 1
    assert set(result["crossover"]) == {"gla", "gated_delta_rule"}


def test_crossover_is_the_first_length_of_the_final_winning_run():
    def rows(chunk_ms, sdpa_ms):
        out = []
        for length, chunk, sdpa in zip((512, 2048, 8192), chunk_ms, sdpa_ms, strict=True):
            out.append(mixers.Row("gla", "chunk", length, "sequence", chunk, chunk, chunk, 1))
            out.append(mixers.Row("attention", "sdpa", length, "sequence", sdpa, sdpa, sdpa, 1))
        return out

    assert mixers.crossover(rows([5, 50, 100], [1, 40, 500]), "gla") == {"from_length": 8192, "after_length": 2048}
    assert mixers.crossover(rows([1, 50, 100], [5, 40, 500]), "gla") == {"from_length": 8192, "after_length": 2048}
    assert mixers.crossover(rows([1, 2, 3], [5, 40, 500]), "gla") == {"from_length": 512, "after_length": None}
    assert mixers.crossover(rows([5, 50, 600], [1, 40, 500]), "gla") == {"from_length": None, "after_length": None}


def test_markdown_table_and_cli_command():
    app = typer.Typer()
    bench.register(app)
    result = CliRunner().invoke(app, ["bench", "mixers", "--tiny", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "| op | impl | T | unit | median ms | min-max ms | vs naive | vs SDPA |" in result.output
    assert "| gated_delta_rule | chunk | 130 | sequence |" in result.output


def test_only_existing_benchmark_modules_are_registered():
    app = typer.Typer()
    bench.register(app)
    group = typer.main.get_group(app)
    registered = set(group.commands["bench"].commands)
    assert "mixers" in registered
    assert registered == {name for name, (module, _) in bench.BENCHMARKS.items() if bench._module_exists(module)}


def test_cuda_device_without_a_gpu_is_one_clear_error(capsys):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the error path is for machines without one")
    with pytest.raises(SystemExit) as exit_info:
        mixers.main(["--tiny", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda needs a CUDA GPU" in capsys.readouterr().err


def test_naive_and_chunk_calls_alternate_after_one_warm_up_each(monkeypatch):
    calls = []
    monkeypatch.setattr(mixers, "REPEAT_BUDGET_S", 3.5)  # past 3 rounds, stop once each fn took > 3.5 s
    ticks = iter(range(1000))
    monkeypatch.setattr(mixers.harness, "_wall_clock", lambda: next(ticks))  # every call: one second
    settings = mixers.Settings(lengths=(8,), repeats=10)
    times = mixers._time(settings, {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                         {"a": lambda: calls.append("warm a")})
    assert calls == ["warm a", "b"] + ["a", "b"] * 4  # the same order every round: naive, chunk, naive, ...
    assert times == {"a": [1000.0] * 4, "b": [1000.0] * 4}
