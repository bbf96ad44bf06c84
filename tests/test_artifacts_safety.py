"""dtr never replaces a folder it did not write: the `.dtr-artifact` marker and `atomic_dir`'s guard."""

from __future__ import annotations

import json
import os

import pytest

from dtr_core.artifacts import MARKER, NotADtrArtifact, atomic_dir, check_replaceable, is_dtr_artifact, read_json


def _user_folder(path):
    path.mkdir()
    (path / "thesis.txt").write_text("four years of work")
    return path


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_a_user_folder_is_refused_and_left_intact(tmp_path):
    precious = _user_folder(tmp_path / "precious")
    ran = []
    with pytest.raises(NotADtrArtifact) as error, atomic_dir(precious) as staging:
        ran.append(staging)
    message = str(error.value)
    assert isinstance(error.value, FileExistsError) and "\n" not in message
    assert str(precious) in message and "overwrite=True" in message
    assert ran == [], "refused before the block ran"
    assert (precious / "thesis.txt").read_text() == "four years of work"
    assert sorted(p.name for p in precious.iterdir()) == ["thesis.txt"] and _leftovers(tmp_path) == []


def test_a_file_is_refused(tmp_path):
    (tmp_path / "notes").write_text("x")
    with pytest.raises(NotADtrArtifact, match="is a file"), atomic_dir(tmp_path / "notes"):
        pass
    assert (tmp_path / "notes").read_text() == "x"


def test_overwrite_replaces_a_user_folder(tmp_path):
    precious = _user_folder(tmp_path / "precious")
    with atomic_dir(precious, overwrite=True, kind="test") as staging:
        (staging / "model.bin").write_bytes(b"1")
    assert sorted(p.name for p in precious.iterdir()) == [MARKER, "model.bin"]
    marker = read_json(precious / MARKER)
    assert marker["writer"] == "dtr" and marker["kind"] == "test" and marker["created"].endswith("Z")
    assert _leftovers(tmp_path) == []


def test_own_folders_and_empty_folders_are_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as staging:
        (staging / "a").write_text("1")
    assert is_dtr_artifact(tmp_path / "empty")
    with atomic_dir(tmp_path / "empty") as staging:  # now a dtr artifact: replaced as a whole
        (staging / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [MARKER, "b"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("name, content, recognised", [
    ("dtr_export.json", {"key": "k"}, True),                          # runs/<id>/hybrids/best
    ("meta.json", {"format": 1, "key": "k", "status": "ok"}, True),    # runs/<id>/students/layer_007
    ("manifest.json", {"format": 1, "key": "k", "layers": [0]}, True),  # an older run's activations capture
    ("config.json", {"model_type": "dtr_llama"}, True),               # an earlier `dtr hybridize --out`
    ("meta.json", {"title": "my photos"}, False),
    ("manifest.json", "not an object", False),
    ("config.json", {"model_type": "llama"}, False),                  # someone's own HF model
])
def test_folders_from_earlier_dtr_versions_are_recognised(tmp_path, name, content, recognised):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / name).write_text(json.dumps(content))
    (folder / "weights.safetensors").write_bytes(b"...")
    assert is_dtr_artifact(folder) is recognised
    if recognised:
        with atomic_dir(folder) as staging:
            (staging / name).write_text(json.dumps(content))
        assert (folder / MARKER).is_file() and not (folder / "weights.safetensors").exists()
    else:
        with pytest.raises(NotADtrArtifact):
            check_replaceable(folder)
        assert (folder / "weights.safetensors").is_file()


def test_a_folder_filled_while_the_block_runs_is_not_replaced(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(NotADtrArtifact), atomic_dir(target) as staging:
        (staging / "model.bin").write_bytes(b"1")
        _user_folder(target)  # someone else puts their files there meanwhile
    assert sorted(p.name for p in target.iterdir()) == ["thesis.txt"] and _leftovers(tmp_path) == []


def test_an_alias_link_is_replaced_without_touching_its_target(tmp_path):
    best = tmp_path / "best"
    with atomic_dir(best) as staging:
        (staging / "w").write_text("best")
    (tmp_path / "opt").symlink_to("best", target_is_directory=True)  # what RunLayout.alias_hybrid leaves
    with atomic_dir(tmp_path / "opt") as staging:
        (staging / "w").write_text("opt")
    assert not (tmp_path / "opt").is_symlink() and (tmp_path / "opt" / "w").read_text() == "opt"
    assert (best / "w").read_text() == "best" and _leftovers(tmp_path) == []
    user = _user_folder(tmp_path / "user")
    (tmp_path / "link").symlink_to(user, target_is_directory=True)
    with pytest.raises(NotADtrArtifact):
        check_replaceable(tmp_path / "link")


def test_a_saved_hybrid_with_the_marker_loads_and_refuses_a_user_folder(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM

    from dtr_core.hybrid.build import build_hybrid, save_hybrid

    teacher, tokenizer = tiny_llama
    hybrid = build_hybrid(teacher, [1], "gla")
    precious = _user_folder(tmp_path / "precious")
    with pytest.raises(NotADtrArtifact):
        save_hybrid(hybrid, tokenizer, precious)
    assert sorted(os.listdir(precious)) == ["thesis.txt"]
    out = save_hybrid(hybrid, tokenizer, tmp_path / "hybrid")
    assert read_json(out / MARKER)["kind"] == "hybrid"
    assert AutoModelForCausalLM.from_pretrained(out).config.dtr_layer_mixers == ["full", "gla", "full", "full"]
    save_hybrid(hybrid, tokenizer, out)  # its own earlier output: replaced without overwrite
    save_hybrid(hybrid, tokenizer, precious, overwrite=True)
    assert not (precious / "thesis.txt").exists() and (precious / MARKER).is_file()


def test_remove_temporaries_deletes_only_what_killed_atomic_writes_left(tmp_path):
    from dtr_core.artifacts import NotADtrArtifact, remove_temporaries, write_marker

    run = tmp_path / "run"
    (run / "students" / ".layer_001.tmp-ab12cd34").mkdir(parents=True)
    (run / "students" / ".layer_001.tmp-ab12cd34" / "weights.safetensors").write_bytes(b"x")
    (run / ".summary.json.tmp-0123abcd").write_text("{")
    (run / "students" / "block_000-001" / ".checkpoint.old-deadbeef").mkdir(parents=True)
    keep = [run / ".lock", run / ".lock.json", run / "students" / "notes.tmp-ab12cd34", run / ".hidden"]
    for path in keep:
        path.write_text("keep")
    with pytest.raises(NotADtrArtifact):
        remove_temporaries(run)  # not marked as dtr's: nothing is touched
    write_marker(run, kind="run")
    removed = remove_temporaries(run)
    assert sorted(p.name for p in removed) == [".checkpoint.old-deadbeef", ".layer_001.tmp-ab12cd34",
                                                 ".summary.json.tmp-0123abcd"]
    assert all(path.read_text() == "keep" for path in keep)
    assert not (run / "students" / ".layer_001.tmp-ab12cd34").exists()
