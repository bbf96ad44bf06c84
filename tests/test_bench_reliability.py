"""The reliability probe's machinery (benchmarks/reliability.py) on a few fast cases, each a real `dtr` process."""

from __future__ import annotations

import json

import pytest

from benchmarks import reliability
from benchmarks.reliability import BY_NAME, Case, Probe


@pytest.fixture
def probe(tmp_path):
    return Probe(tmp_path, timeout=120, fault_timeout=300)


def test_bad_input_is_recorded_with_exit_code_lines_time_and_nothing_written(probe):
    row = probe.run(BY_NAME["--max-layers 0"])
    assert row["exit"] == 2 and row["stderr_lines"] == 1 and row["written"] == []
    assert row["did"].startswith("error: invalid parameters: max_layers") and 0 < row["seconds"] < 60
    assert row["command"] == "dtr convert --profile smoke --max-layers 0"  # the --output-dir $T/runs is implied
    assert row["category"] == "arguments" and row["goal"] == "bad input"
    assert row["verdict"] == ("pass" if row["seconds"] < reliability.BAD_INPUT_SECONDS else "FAIL")

    missing = probe.run(BY_NAME["nonexistent model path"])
    assert missing["exit"] == 2 and missing["stderr_lines"] == 1 and missing["written"] == []
    assert "$T/no-such-model" in missing["did"] and str(probe.root) not in missing["did"] + missing["command"]


def test_a_refusal_keeps_the_users_file_and_the_extra_check_runs(probe):
    row = probe.run(BY_NAME["hybridize --out a user's folder"])
    assert row["exit"] == 2 and row["stderr_lines"] == 1 and row["written"] == []
    assert "is a folder that dtr did not write" in row["did"]
    folder = probe.root / "cases" / "hybridize-out-a-user-s-folder"
    assert (folder / "mine" / "notes.txt").read_text() == reliability.USER_FILE
    assert not any("changed or gone" in p for p in row["problems"])


def test_a_case_that_writes_is_caught_as_writing_and_fails_its_goal(probe):
    """A valid `dtr hybridize` run under the bad-input goal: exit 0 and a new folder, both named."""
    case = Case("writes", "arguments", ("hybridize", "--model", "tiny-llama", "--layers", "1", "--out", "{T}/out"),
                check=reliability.file_intact("out/config.json", "never this"))
    row = probe.run(case)
    assert row["exit"] == 0 and row["verdict"] == "FAIL"
    assert row["written"] == ["out"]  # a new folder stands for its content
    assert "exit 0" in row["problems"] and "wrote out" in row["problems"]
    assert "out/config.json changed or gone" in row["problems"]
    assert "saved" in row["did"] and "$T/out" in row["did"]  # no `error:` line: what it printed first


def test_snapshot_diff_names_new_changed_and_removed_paths(tmp_path):
    (tmp_path / "keep.txt").write_text("a")
    (tmp_path / "gone.txt").write_text("b")
    before = reliability.snapshot(tmp_path)
    (tmp_path / "keep.txt").write_text("changed")
    (tmp_path / "gone.txt").unlink()
    (tmp_path / "new" / "deep").mkdir(parents=True)
    (tmp_path / "new" / "deep" / "file").write_text("c")
    assert reliability.written(before, reliability.snapshot(tmp_path)) == ["new", "~keep.txt", "-gone.txt"]
    assert reliability.written(before, before) == []


def test_main_publishes_the_table_and_refuses_unknown_cases(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--only", "--max-layers 0,unknown profile", "--out", str(out), "--timeout", "120"]
    assert reliability.main(argv) in (0, 1)  # 1: a case missed its goal (e.g. slow on a busy machine)
    result = json.loads((out / "reliability.json").read_text())
    assert [row["name"] for row in result["cases"]] == ["--max-layers 0", "unknown profile"]
    assert sum(result["counts"].values()) == 2 and result["machine"]["load_average"]
    report = (out / "reliability.md").read_text()
    assert "## Command-line arguments" in report and "| --max-layers 0 | `dtr convert --profile smoke" in report
    assert "cases meet their goal" in report and "## Faults" not in report
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        reliability.main(["--only", "no such case", "--out", str(tmp_path / "x")])
    assert refused.value.code == 2 and "unknown case(s) 'no such case'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_every_case_names_a_known_category_and_goal_and_quick_is_about_ten_fast_cases():
    assert len(reliability.CASES) >= 60 and len(BY_NAME) == len(reliability.CASES)
    for case in reliability.CASES:
        assert case.category in reliability.CATEGORIES and case.goal in reliability.GOALS
        assert "," not in case.name  # --only takes a comma-separated list
        assert (case.driver is not None) == case.slow
    quick = reliability.selected(reliability.Settings(subset="quick"))
    assert 8 <= len(quick) <= 12 and not any(case.slow for case in quick)
