"""`dtr_core.artifacts.reuse_or_compute`: a stored record is reused only when its key matches and it is intact;
otherwise the result is computed again and written atomically."""

from __future__ import annotations

import json
import logging

import pytest

from dtr_core.artifacts import read_json, reuse_or_compute


def _counter():
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    return calls, compute


def test_a_matching_key_is_reused_and_another_key_is_computed(tmp_path):
    path = tmp_path / "sub" / "record.json"
    calls, compute = _counter()
    first, reused = reuse_or_compute(path, "k1", compute)
    assert (first, reused) == ({"value": 1, "key": "k1"}, False)
    assert read_json(path) == first
    assert reuse_or_compute(path, "k1", compute) == (first, True) and len(calls) == 1
    changed, reused = reuse_or_compute(path, "k2", compute)
    assert (changed, reused) == ({"value": 2, "key": "k2"}, False) and read_json(path)["key"] == "k2"


@pytest.mark.parametrize("content", ["{ not json", "[1, 2]", ""])
def test_an_unreadable_record_is_computed_again(tmp_path, content):
    path = tmp_path / "record.json"
    path.write_text(content)
    calls, compute = _counter()
    assert reuse_or_compute(path, "k", compute) == ({"value": 1, "key": "k"}, False)
    assert json.loads(path.read_text())["value"] == 1


def test_a_record_with_a_problem_is_computed_again_with_a_warning(tmp_path, caplog):
    path = tmp_path / "record.json"
    calls, compute = _counter()
    reuse_or_compute(path, "k", compute)
    with caplog.at_level(logging.WARNING, logger="dtr_core.artifacts"):
        record, reused = reuse_or_compute(path, "k", compute, problem=lambda stored: "weights.bin changed",
                                          label="layer 3")
    assert not reused and record["value"] == 2
    assert "layer 3" in caplog.text and "weights.bin changed" in caplog.text
    assert reuse_or_compute(path, "k", compute, problem=lambda stored: None) == (record, True)


def test_a_failed_computation_leaves_the_old_record(tmp_path):
    path = tmp_path / "record.json"
    reuse_or_compute(path, "k1", lambda: {"value": 1})

    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        reuse_or_compute(path, "k2", fail)
    assert read_json(path) == {"value": 1, "key": "k1"}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left


def test_without_write_compute_writes_its_own_record(tmp_path):
    folder = tmp_path / "export"

    def compute():
        folder.mkdir()
        record = {"key": "k", "files": 1}
        (folder / "info.json").write_text(json.dumps(record))
        return record

    assert reuse_or_compute(folder / "info.json", "k", compute, write=False) == ({"key": "k", "files": 1}, False)
    assert reuse_or_compute(folder / "info.json", "k", compute, write=False) == ({"key": "k", "files": 1}, True)
