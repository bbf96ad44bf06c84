"""Divergent students fail with their loss and the threshold, are never searched, and corrupted students heal.

A tiny in-code teacher (tiny-llama, 4 layers) distilled on a small text corpus (sequences of 32 tokens). At
lr 1.0 its students train to finite weights with large losses: no non-finite loss, so only the loss
threshold catches them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from dtr_core.search.acceptance import Tolerance
from dtr_core.artifacts import read_json
from distill_support import write_corpus
from dtr_core.distill.block import distill_block
from dtr_core.distill.config import DistillConfig
from dtr_core.distill.corpus import Corpus
from dtr_core.distill.training import load_students, read_layer_results
from dtr_core.evaluation.tasks import ClassificationTask, Example
from dtr_core.mixers import MIXERS
from dtr_core.search.greedy_search import encode_split, run_greedy_search

T = 32
FAST = DistillConfig.for_steps(40, batch_size=4, seq_lens=(T,), eval_sequences=4, lr=1e-2)
HOT = replace(FAST, lr=1.0)  # diverges on the tiny teacher with finite weights


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matmuls: one thread is fastest


@pytest.fixture(scope="module")
def teacher_and_tokenizer():
    from dtr_core.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def teacher(teacher_and_tokenizer):
    return teacher_and_tokenizer[0]


@pytest.fixture(scope="module")
def corpus(teacher_and_tokenizer, tmp_path_factory):
    return Corpus(write_corpus(tmp_path_factory.mktemp("corpus") / "text.txt"), teacher_and_tokenizer[1])


def distill_layer(teacher, layer, corpus, mixer, config, folder, **kwargs):
    """One layer as its own block."""
    return distill_block(teacher, [layer], mixer, config, corpus, folder, **kwargs)[0]


def test_learning_rate_1_fails_naming_the_loss_and_the_threshold(teacher, corpus, tmp_path):
    result = distill_layer(teacher, 1, corpus, "gla", HOT, tmp_path)
    assert result.status == "failed" and not result.ok
    assert math.isfinite(result.normalized_loss) and result.normalized_loss >= 1.0
    assert f"normalised loss {result.normalized_loss:.4g}" in result.reason
    assert "max_normalized_loss 1.0" in result.reason and result.max_normalized_loss == 1.0
    meta = read_json(tmp_path / "layer_001" / "meta.json")
    assert meta["status"] == "failed" and meta["reason"] == result.reason
    assert (tmp_path / "layer_001" / "weights.safetensors").is_file()  # kept: another threshold re-judges it
    assert read_layer_results(tmp_path)[1].status == "failed"
    assert load_students(tmp_path, teacher) == {}
    assert load_students(tmp_path, teacher, layers=[1]) == {}


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_default_threshold_keeps_good_students(teacher, corpus, tmp_path, mixer):
    assert DistillConfig().max_normalized_loss == FAST.max_normalized_loss == 1.0
    results = [distill_layer(teacher, layer, corpus, mixer, FAST, tmp_path) for layer in (1, 2, 3)]
    assert all(r.ok and r.reason is None and r.normalized_loss < 1.0 for r in results)
    assert sorted(load_students(tmp_path, teacher, mixer_name=mixer)) == [1, 2, 3]


def test_threshold_rejudges_reused_students_without_training(teacher, corpus, tmp_path):
    first = distill_layer(teacher, 2, corpus, "gla", FAST, tmp_path)
    assert first.ok
    weights = tmp_path / "layer_002" / "weights.safetensors"
    stamp = weights.stat().st_mtime_ns
    calls = []
    strict = replace(FAST, max_normalized_loss=first.normalized_loss)  # "at or above" fails
    judged = distill_layer(teacher, 2, corpus, "gla", strict, tmp_path, progress=lambda *a: calls.append(a))
    assert judged.reused and calls == [] and judged.key == first.key  # the threshold is not in the key
    assert judged.status == "failed" and "at or above max_normalized_loss" in judged.reason
    assert read_layer_results(tmp_path)[2].status == "failed" and load_students(tmp_path, teacher) == {}
    again = distill_layer(teacher, 2, corpus, "gla", FAST, tmp_path, progress=lambda *a: calls.append(a))
    assert again.reused and again.ok and again.reason is None and calls == []
    assert read_layer_results(tmp_path)[2].ok and sorted(load_students(tmp_path, teacher)) == [2]
    assert weights.stat().st_mtime_ns == stamp
    # a looser threshold lets a diverged student through, still without training
    hot = distill_layer(teacher, 3, corpus, "gla", HOT, tmp_path)
    assert not hot.ok
    loose = distill_layer(teacher, 3, corpus, "gla", replace(HOT, max_normalized_loss=1e9), tmp_path)
    assert loose.reused and loose.ok and sorted(load_students(tmp_path, teacher)) == [2, 3]


def _toy_task() -> ClassificationTask:
    words = ["ab", "cd", "ef", "gh", "abc", "de", "fgh", "a", "bcd", "efg"]
    examples = [Example(uid=f"c{i}", text=" ".join(words[(i + j) % len(words)] for j in range(3 + i % 4)),
                        label="x" if i % 2 else "y") for i in range(24)]
    return ClassificationTask(name="toy-cls", load=lambda: examples, validation_size=16, test_size=4,
                              template="{text} =", verbalisers={"x": "A", "y": "B"})


def test_failed_layer_is_never_a_candidate(teacher_and_tokenizer, corpus, tmp_path):
    teacher, tokenizer = teacher_and_tokenizer
    assert not distill_layer(teacher, 0, corpus, "gla", HOT, tmp_path).ok
    assert all(distill_layer(teacher, layer, corpus, "gla", FAST, tmp_path).ok for layer in (1, 2, 3))
    results = read_layer_results(tmp_path)
    available = sorted(layer for layer, result in results.items() if result.ok)  # what flows/replace.py offers
    students = load_students(tmp_path, teacher)  # what the candidate tasks score with
    assert available == sorted(students) == [1, 2, 3]
    task = _toy_task()
    batches = encode_split(task, tokenizer)
    # P_min below any score: every round commits, so every ok layer is offered until none is left
    result, _, _ = run_greedy_search(teacher, task, batches, students, Tolerance("absolute", -1.0))
    offered = [set(r.candidates) for r in result.rounds]
    assert offered[0] == {1, 2, 3} and all(0 not in layers for layers in offered)
    assert sorted(result.swap_order) == [1, 2, 3] and result.available_layers == (1, 2, 3)


def _raw_tensors(path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of a safetensors file as (dtype, shape, raw bytes). Not the file's bytes: safetensors writes
    its metadata keys in no fixed order."""
    return {name: (str(t.dtype), tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            for name, t in load_file(str(path)).items()}


@pytest.mark.parametrize("damage", ["flip-one-byte", "truncate", "delete", "garbage-meta"])
def test_corrupted_student_is_distilled_again_bit_for_bit(teacher, corpus, tmp_path, caplog, damage):
    first = distill_layer(teacher, 2, corpus, "gated_deltanet", FAST, tmp_path)
    weights = tmp_path / "layer_002" / "weights.safetensors"
    original = weights.read_bytes()
    original_tensors = _raw_tensors(weights)
    path = tmp_path / "layer_002" / ("meta.json" if damage == "garbage-meta" else "weights.safetensors")
    if damage == "flip-one-byte":
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0x01]))
    elif damage == "truncate":
        weights.write_bytes(original[:100])
    elif damage == "delete":
        weights.unlink()
    else:
        path.write_text("{ not json")
    # loading refuses it, naming the file and the fix
    with pytest.raises(ValueError, match="run the same conversion again") as refused:
        load_students(tmp_path, teacher)
    assert str(path) in str(refused.value)
    with caplog.at_level(logging.WARNING, logger="dtr_core.distill.training"):
        healed = distill_layer(teacher, 2, corpus, "gated_deltanet", FAST, tmp_path)
    assert str(path) in caplog.text
    if damage != "garbage-meta":
        assert "distill layer 2" in caplog.text
    assert not healed.reused and healed.ok
    assert _raw_tensors(weights) == original_tensors  # the same seed: the uninterrupted run's weights, bit for bit
    assert {**healed.to_dict(), "seconds": 0} == {**first.to_dict(), "seconds": 0}
    assert sorted(load_students(tmp_path, teacher)) == [2]
    assert distill_layer(teacher, 2, corpus, "gated_deltanet", FAST, tmp_path).reused


def test_summary_and_plot_name_failed_layers(tmp_path):
    from tasks.plots import plot_distill_losses
    from tasks.report import failed_layers, summary_markdown

    results = [{"layer": 2, "status": "ok", "reason": None, "initial_normalized_loss": 1.2, "normalized_loss": 0.4,
                "max_normalized_loss": 1.0},
               {"layer": 1, "status": "failed", "reason": "held-out normalised loss 3.848e+05 is at or above "
                "max_normalized_loss 1.0", "initial_normalized_loss": 1.3, "normalized_loss": 384780.0,
                "max_normalized_loss": 1.0},
               {"layer": 0, "status": "failed", "reason": "non-finite training loss nan at step 3",
                "initial_normalized_loss": 1.1, "normalized_loss": None, "max_normalized_loss": None}]
    failed = failed_layers(results)
    assert failed == [{"layer": 0, "reason": "non-finite training loss nan at step 3"},
                      {"layer": 1, "reason": results[1]["reason"]}]
    row = {"model": "teacher", "linear_layers": [], "num_linear": 0, "validation": 0.8, "test": 0.7,
           "cache_bytes": 2**20, "prefill_speedup": 1.0, "decode_speedup": 1.0}
    summary = {"run_id": "r", "model": "tiny-llama", "task": "toy", "metric": "accuracy", "mixer": "gla",
               "num_layers": 4, "stop_reason": "rejected", "p_min": 0.76, "speed": {"context_len": 64}, "rows": [row],
               "run_dir": "/tmp/r", "mlflow": {"url": "u"}, "registered": None, "seconds": 60.0,
               "failed_layers": failed}
    text = summary_markdown(summary)
    assert "- layer 0: non-finite training loss nan at step 3" in text
    assert f"- layer 1: {results[1]['reason']}" in text
    assert "failed" not in summary_markdown({**summary, "failed_layers": []})
    path = plot_distill_losses(results, tmp_path / "losses.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
