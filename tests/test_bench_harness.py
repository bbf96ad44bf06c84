"""The benchmark harness: where results go (a quick run never writes into docs/), bad input, the registry."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmarks import all as bench_all
from benchmarks import distill_cost, harness, mixers, search_cost

TINY_DISTILL = ["--model", "tiny-llama", "--layers", "2", "--steps", "2", "--tokens", "256", "--seq-len", "32",
                "--repeats", "1"]


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_quick_run_writes_into_runs_bench_quick_and_never_into_docs(tmp_path, monkeypatch, caplog):
    docs = tmp_path / "docs" / "bench"
    shutil.copytree(harness.DOCS_BENCH / "distill", docs / "distill")  # a copy of the published results
    before = _snapshot(docs)
    monkeypatch.setattr(harness, "DOCS_BENCH", docs)
    monkeypatch.setattr(harness, "QUICK_ROOT", tmp_path / "runs" / "bench-quick")
    argv = ["--quick", *TINY_DISTILL, "--work-dir", str(tmp_path / "work")]
    caplog.set_level("INFO", logger="benchmarks")
    assert distill_cost.main(argv) == 0
    assert _snapshot(docs) == before  # tables, JSON and plot untouched
    out = tmp_path / "runs" / "bench-quick" / "distill"
    result = json.loads((out / "distill.json").read_text())
    assert result["preset"] == "quick" and result["settings"]["steps"] == 2  # given flags win over the preset
    assert (out / "distill.md").is_file() and (out / "distill_throughput.png").is_file()
    assert f"distill: wrote {out} (a quick run: docs/ untouched)" in caplog.text  # says where
    monkeypatch.setattr(harness, "QUICK_ROOT", tmp_path / "elsewhere")
    assert distill_cost.main(argv + ["--out", str(tmp_path / "explicit")]) == 0  # --out publishes anywhere
    assert (tmp_path / "explicit" / "distill.json").is_file() and not (tmp_path / "elsewhere").exists()


def test_output_folders_resolve_by_run_kind():
    inference = harness.Benchmark("inference", object, dict, str)
    assert harness.output_dir(inference, None, None) == harness.DOCS_BENCH / "inference"  # full run: publish
    assert harness.output_dir(inference, None, "quick") == harness.QUICK_ROOT / "inference"
    assert harness.output_dir(inference, "/tmp/x", "quick") == harness.output_dir(inference, "/tmp/x", None)
    assert harness.output_dir(mixers.BENCH, None, None) is None  # prints only unless given --out
    assert bench_all.default_paths(False) == (harness.DOCS_BENCH, bench_all.DEFAULT_DOC)
    assert bench_all.default_paths(True) == (harness.QUICK_ROOT, harness.QUICK_ROOT / "BENCHMARKS.md")
    assert harness.DOCS_BENCH.parent.name == "docs" and harness.QUICK_ROOT.parent.name == "runs"


def test_bad_input_is_one_error_line_before_any_work(tmp_path, capsys):
    for argv in (["--steps", "0"], ["--mixer", "nope"], ["--seq-len", "99999"]):
        with pytest.raises(SystemExit) as exit_info:
            distill_cost.main(argv + ["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("dtr bench distill: error: ")
    assert "sequence length 99999 is above the model's max_position_embeddings (8192)" in err[-1]
    assert not list(tmp_path.iterdir())  # no folder, no file


def test_search_prints_and_writes_nothing_without_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "DOCS_BENCH", tmp_path / "docs")
    monkeypatch.setattr(harness, "QUICK_ROOT", tmp_path / "quick")
    assert search_cost.main(["--quick", "--model", "tiny-llama", "--limit", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["same_answer"] and result["config"]["rounds"] == 1 and result["preset"] == "quick"
    assert not list(tmp_path.iterdir())


def test_every_registered_benchmark_has_a_module_with_main_and_the_registry_feeds_the_cli():
    import importlib

    from dtr.commands import bench

    for entry in harness.REGISTRY:
        module = importlib.import_module(entry.module)
        assert module.BENCH.name == entry.name and callable(module.main)
        assert bench.BENCHMARKS[entry.name] == (entry.module, entry.help)
    assert list(bench.BENCHMARKS) == [e.name for e in harness.REGISTRY] + ["all"]


def test_result_store_computes_once_and_counts_reuse(tmp_path):
    calls = []
    store = harness.ResultStore(tmp_path / "key", kinds=("test",))
    assert store.get("test/a.json", lambda: calls.append(1) or {"x": 1}, "test") == {"x": 1}
    again = harness.ResultStore(tmp_path / "key", kinds=("test",))  # a later run with the same key
    assert again.get("test/a.json", lambda: calls.append(2) or {"x": 2}, "test") == {"x": 1}
    assert calls == [1] and store.reused == {"test": 0} and again.reused == {"test": 1}


@pytest.mark.parametrize("module", [search_cost, "placements", "recall"])
def test_a_missing_students_folder_is_refused_before_any_work(tmp_path, capsys, module):
    import importlib

    main = module.main if not isinstance(module, str) else importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--students", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"error: --students {tmp_path / 'nope'} is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
