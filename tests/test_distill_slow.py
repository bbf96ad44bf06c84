"""Phase 1 on the real smollm2-135m: distil two layers on the streamed teacher, swap them in, evaluate (minutes on
CPU)."""

from __future__ import annotations

import logging
import math
import time

import pytest

from dtr_core.distill.block import distill_block
from dtr_core.distill.config import DistillConfig
from dtr_core.distill.training import load_students

logger = logging.getLogger(__name__)

LAYERS = [4, 12]
SEQ_LEN = 256
MIXER = "gated_deltanet"  # the fastest student to train on CPU (gla's backward is ~2x slower)
CONFIG = DistillConfig(steps=60, seq_lens=(SEQ_LEN,))  # 60 x 4 x 256 = 61k training tokens per layer


@pytest.mark.slow
def test_smollm2_distil_two_layers_then_evaluate(tmp_path, record_property):
    from dtr_core.distill.corpus import Corpus
    from dtr_core.evaluation import evaluate
    from dtr_core.models import load_model
    from dtr_core.hybrid.surgery import restore_layers, swap_layers

    model, tokenizer = load_model("smollm2-135m")
    started = time.perf_counter()
    results = distill_block(model, LAYERS, MIXER, CONFIG, Corpus("bbc", tokenizer), tmp_path / "students")
    seconds = time.perf_counter() - started
    record_property("distill_tokens_per_second", CONFIG.steps * CONFIG.tokens_per_step / seconds)
    for result in results:
        layer = result.layer
        record_property(f"distill_seconds_layer_{layer}", result.seconds)
        logger.info("layer %d: normalised loss %.3f -> %.3f in %.1f s", layer,
                    result.initial_normalized_loss, result.normalized_loss, result.seconds)
        assert result.ok, result.reason
        assert result.normalized_loss < 0.5 * result.initial_normalized_loss

    students = load_students(tmp_path / "students", model, mixer_name=MIXER)
    assert sorted(students) == LAYERS
    started = time.perf_counter()
    base = evaluate(model, tokenizer, "sentiment", "validation", limit=48)
    originals = swap_layers(model, students)
    try:
        hybrid = evaluate(model, tokenizer, "sentiment", "validation", limit=48)
    finally:
        restore_layers(model, originals)
    record_property("evaluate_seconds", time.perf_counter() - started)
    logger.info("sentiment (48 validation examples): full %.3f, hybrid with layers %s linear %.3f",
                base.score, LAYERS, hybrid.score)
    assert math.isfinite(hybrid.score) and 0.0 <= hybrid.score <= 1.0
    assert hybrid.score >= 0.5 * base.score, "two distilled layers should not wreck the model"
