"""Blockwise local distillation on the streamed teacher (tiny model): it learns, does not depend on how layers
are grouped, resumes bit for bit, reuses, fails safely."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from distill_support import attention_io, write_corpus
from dtr_core.distill.block import distill_block, split_into_blocks, teacher_layer_forwards
from dtr_core.distill.config import RANDOM_TEACHER_MAX_NORMALIZED_LOSS, DistillConfig
from dtr_core.distill.corpus import Corpus
from dtr_core.distill.training import calibrate_output_scale, load_students, read_layer_results
from dtr_core.hybrid.surgery import attention_module, restore_layers, swap_layers
from dtr_core.mixers import MIXERS, MixerConfig

T = 32
# a random teacher: its students are judged against the random-teacher threshold (see there)
FAST = DistillConfig.for_steps(20, batch_size=4, seq_lens=(T,), eval_sequences=4, lr=1e-2,
                               max_normalized_loss=RANDOM_TEACHER_MAX_NORMALIZED_LOSS)


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


def _weights(folder, layer) -> dict[str, bytes]:
    """The raw bytes of every tensor of a saved student (the file's header orders its metadata freely)."""
    tensors = load_file(str(folder / f"layer_{layer:03d}" / "weights.safetensors"))
    return {name: tensor.numpy().tobytes() for name, tensor in tensors.items()}


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "steps must be > 0"),
    (dict(batch_size=0), "batch_size"),
    (dict(seq_lens=()), "seq_lens"),
    (dict(seq_lens=(32, 0)), "seq_lens"),
    (dict(eval_sequences=0), "eval_sequences"),
    (dict(lr=0.0), "lr must be"),
    (dict(lr=float("nan")), "lr must be"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(steps=10, warmup_steps=11), "warmup_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(grad_clip=0.0), "grad_clip"),
    (dict(grad_clip=math.inf), "grad_clip"),
    (dict(log_every=0), "log_every"),
    (dict(max_normalized_loss=0.0), "max_normalized_loss must be"),
    (dict(max_normalized_loss=math.inf), "max_normalized_loss must be"),
    (dict(checkpoint_every_steps=0), "checkpoint_every_steps"),
    (dict(checkpoint_every_minutes=0), "checkpoint_every_minutes"),
])
def test_config_validation(bad, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**bad)


def test_lr_schedule_warmup_then_cosine():
    config = DistillConfig(steps=100, min_lr_ratio=0.1)
    assert config.num_warmup_steps == 10 and DistillConfig(steps=100, warmup_steps=3).num_warmup_steps == 3
    factors = [config.lr_factor(step) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))  # non-increasing after warm-up
    assert factors[-1] == pytest.approx(0.1)
    assert DistillConfig(steps=3).lr_factor(0) == 1.0  # warm-up rounds to 0 steps: no warm-up
    assert DistillConfig.from_dict(config.to_dict()) == config


def test_budget_in_tokens_and_sequence_length_mix():
    assert DistillConfig().steps * DistillConfig().tokens_per_step == 40 * 4 * 256  # the default budget
    assert DistillConfig.for_tokens(1000, batch_size=2, seq_lens=(100,)).steps == 5
    assert DistillConfig.for_tokens(1000, steps=3, batch_size=2, seq_lens=(100,)).steps == 3  # steps win
    assert DistillConfig.for_tokens(10**8).steps == 10**8 // 1024 + 1  # 1e8 tokens: only a number
    mix = DistillConfig(batch_size=4, seq_lens=(256, 1024, 4096))
    assert [mix.sequences_at(i) for i in range(4)] == [(4, 256), (1, 1024), (1, 4096), (4, 256)]
    assert DistillConfig(batch_size=4, seq_lens=(64, 128)).sequences_at(1) == (2, 128)
    with pytest.raises(ValueError, match="tokens must be > 0"):
        DistillConfig.for_tokens(0)
    assert split_into_blocks(5, 2) == [[0, 1], [2, 3], [4]] and split_into_blocks(3, 8) == [[0, 1, 2]]
    assert teacher_layer_forwards(split_into_blocks(30, 30)) == 1
    assert teacher_layer_forwards(split_into_blocks(30, 1)) == 15.5  # (30 + 1) / 2
    assert teacher_layer_forwards([[0, 1], [2, 3]]) == (2 + 4) / 4


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_distillation_beats_the_copied_student(teacher, corpus, tmp_path, mixer):
    calls = []
    [result] = distill_block(teacher, [1], mixer, FAST, corpus, tmp_path,
                             progress=lambda step, total, loss, tokens: calls.append((step, total, tokens)))
    assert result.ok and not result.reused and result.reason is None
    assert result.final_loss < 0.75 * result.initial_loss
    assert result.normalized_loss < 0.75 * result.initial_normalized_loss
    assert result.steps == FAST.steps and result.tokens == FAST.steps * FAST.batch_size * T
    assert result.eval_sequences == 4
    assert calls == [(step, 20, step * 4 * T) for step in range(2, 21, 2)]
    assert read_layer_results(tmp_path)[1] == result
    assert not any(tmp_path.glob("block_*"))  # the checkpoint went with the block
    # the saved student reproduces the reported held-out loss on the first 4 sequences of the stream
    student = load_students(tmp_path, teacher)[1]
    x, y = attention_io(teacher, corpus.rows().take(4, T), 1)
    rope = teacher.model.rotary_emb(x, torch.arange(T)[None].expand(4, -1))
    with torch.no_grad():
        prediction, _ = student(hidden_states=x, position_embeddings=rope)
    assert torch.mean((prediction - y) ** 2).item() == pytest.approx(result.final_loss, rel=1e-4)


def test_students_do_not_depend_on_how_layers_are_grouped(teacher, corpus, tmp_path):
    """One block of all layers, or one block per layer: bit-identical weights and equal losses."""
    together = distill_block(teacher, [0, 1, 2, 3], "gated_deltanet", FAST, corpus, tmp_path / "one")
    apart = [distill_block(teacher, [layer], "gated_deltanet", FAST, corpus, tmp_path / "four")[0]
             for layer in range(4)]
    for a, b in zip(together, apart):
        assert _weights(tmp_path / "one", a.layer) == _weights(tmp_path / "four", b.layer)
        assert (a.key, a.final_loss, a.initial_loss, a.output_scale) == (b.key, b.final_loss, b.initial_loss,
                                                                         b.output_scale)
    pairs = distill_block(teacher, [2, 3], "gated_deltanet", FAST, corpus, tmp_path / "pairs")
    assert [r.final_loss for r in pairs] == [r.final_loss for r in together[2:]]


def test_interrupted_block_resumes_bit_for_bit(teacher, corpus, tmp_path):
    config = replace(FAST, checkpoint_every_steps=3)
    reference = distill_block(teacher, [1, 2], "gla", config, corpus, tmp_path / "whole")

    class Crash(Exception):
        pass

    def crash_after_step_8(step, total, loss, tokens):
        if step == 8:
            raise Crash

    with pytest.raises(Crash):
        distill_block(teacher, [1, 2], "gla", config, corpus, tmp_path / "cut", progress=crash_after_step_8)
    checkpoint = tmp_path / "cut" / "block_001-002" / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir() if not p.name.startswith(".")) == [
        "optimizer.safetensors", "rng.safetensors", "state.json", "students.safetensors"]
    assert not any((tmp_path / "cut").glob("layer_*"))
    calls = []
    resumed = distill_block(teacher, [1, 2], "gla", config, corpus, tmp_path / "cut",
                            progress=lambda step, *rest: calls.append(step))
    assert calls[0] == 8  # continued from the checkpoint of step 6: steps 7.. again, nothing before
    for a, b in zip(reference, resumed):
        assert _weights(tmp_path / "whole", a.layer) == _weights(tmp_path / "cut", b.layer)
        assert (a.final_loss, a.initial_loss, a.best_train_loss) == (b.final_loss, b.initial_loss, b.best_train_loss)
    assert not (tmp_path / "cut" / "block_001-002").exists()


def test_sequence_length_mix_trains(teacher, corpus, tmp_path):
    config = replace(FAST, seq_lens=(T, 2 * T), steps=6, warmup_steps=1, log_every=1)
    shapes = []
    handle = teacher.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    try:
        [result] = distill_block(teacher, [2], "gla", config, corpus, tmp_path)
    finally:
        handle.remove()
    # the first training batch, the held-out sequences before training, 5 more batches, the held-out ones again
    assert shapes == [(4, T), (4, T), (2, 2 * T), (4, T), (2, 2 * T), (4, T), (2, 2 * T), (4, T)]
    assert result.tokens == 6 * 4 * T and result.final_loss < result.initial_loss
    [single] = distill_block(teacher, [2], "gla", replace(config, seq_lens=(T,)), corpus, tmp_path / "single")
    assert single.key != result.key and single.final_loss != result.final_loss


@pytest.mark.parametrize("mixer", sorted(MIXERS))
def test_output_calibration_is_the_least_squares_scale(teacher, corpus, mixer):
    from dtr_core.mixers import build_student

    student = build_student(mixer, teacher.config, 1, teacher_attention=attention_module(teacher, 1))
    x, y = attention_io(teacher, corpus.rows().take(4, T), 1)
    rope = teacher.model.rotary_emb(x[:1], torch.arange(T)[None])
    with torch.no_grad():
        before, _ = student(hidden_states=x, position_embeddings=(rope[0].expand(4, -1, -1),
                                                                  rope[1].expand(4, -1, -1)))
        factor = calibrate_output_scale(student, x, y, rope)
        after, _ = student(hidden_states=x, position_embeddings=(rope[0].expand(4, -1, -1),
                                                                 rope[1].expand(4, -1, -1)))
    torch.testing.assert_close(after, factor * before, rtol=1e-4, atol=1e-6)
    p, t = before.double().flatten(), y.double().flatten()
    least_squares, floor = float(p @ t / (p @ p)), 0.1 * float(t.norm() / p.norm())
    assert factor == pytest.approx(max(least_squares, floor))
    with torch.no_grad():
        student.scale_output(1 / factor)
        assert calibrate_output_scale(student, x, 0.05 * before, rope) == pytest.approx(0.05, rel=1e-5)


def test_calibrated_student_starts_closer_to_the_teacher(teacher, corpus, tmp_path):
    one_step = replace(FAST, steps=1, warmup_steps=1)
    [plain] = distill_block(teacher, [1], "gated_deltanet", replace(one_step, calibrate_output=False), corpus,
                            tmp_path / "plain")
    [calibrated] = distill_block(teacher, [1], "gated_deltanet", one_step, corpus, tmp_path / "cal")
    assert plain.output_scale is None and calibrated.output_scale > 0
    assert calibrated.initial_loss < plain.initial_loss
    assert plain.key != calibrated.key  # the flag is part of the reuse key


def test_teacher_is_untouched(teacher, corpus, tmp_path):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    distill_block(teacher, [0, 1], "gla", FAST, corpus, tmp_path)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not teacher.training


def test_completed_layers_are_reused_without_running_the_teacher(teacher, corpus, tmp_path):
    first = distill_block(teacher, [1, 2], "jetblock", FAST, corpus, tmp_path)
    stamp = (tmp_path / "layer_001" / "weights.safetensors").stat().st_mtime_ns
    forwards, calls = [], []
    handle = teacher.model.embed_tokens.register_forward_hook(lambda *args: forwards.append(1))
    try:
        again = distill_block(teacher, [1, 2], "jetblock", FAST, corpus, tmp_path,
                              progress=lambda *args: calls.append(args))
        # how the student is computed (chunk size, backend) is not what it computes: still reused
        other_execution = distill_block(teacher, [1, 2], "jetblock", FAST, corpus, tmp_path,
                                        mixer_config=MixerConfig(chunk_size=8, backend="torch"))
    finally:
        handle.remove()
    assert forwards == [] and calls == [] and all(r.reused for r in again + other_execution)
    assert (tmp_path / "layer_001" / "weights.safetensors").stat().st_mtime_ns == stamp
    assert [{**r.to_dict(), "reused": False} for r in again] == [r.to_dict() for r in first]
    # a block with one layer done trains only the other
    mixed = distill_block(teacher, [2, 3], "jetblock", FAST, corpus, tmp_path)
    assert [r.reused for r in mixed] == [True, False]
    # any change to what determines the result retrains the layer
    other_corpus = Corpus(write_corpus(tmp_path / "other.txt", seed=1), corpus.tokenizer)
    for change in (dict(mixer_config=MixerConfig(use_rope=False)), dict(config=replace(FAST, steps=10)),
                   dict(config=replace(FAST, seq_lens=(16,))), dict(corpus=other_corpus)):
        kwargs = dict(config=FAST, corpus=corpus) | change
        [changed] = distill_block(teacher, [1], "jetblock", students_dir=tmp_path / "changed",
                                  **kwargs)
        assert not changed.reused and changed.key != first[0].key


def test_non_finite_loss_fails_the_layer_while_the_block_trains_on(teacher, corpus, tmp_path):
    def poison(module, args, output):  # the teacher's layer-1 attention output holds a NaN
        attn_out, weights = output
        attn_out = attn_out.clone()
        attn_out[0, 3, 5] = float("nan")
        return attn_out, weights

    handle = attention_module(teacher, 1).register_forward_hook(poison)
    config = replace(FAST, steps=6, max_normalized_loss=1e6)  # only non-finite losses fail here
    try:
        ok, failed = distill_block(teacher, [0, 1], "gla", config, corpus, tmp_path)
    finally:
        handle.remove()
    assert ok.ok and ok.steps == 6
    assert failed.status == "failed" and "non-finite" in failed.reason
    assert sorted(p.name for p in (tmp_path / "layer_001").iterdir() if not p.name.startswith(".")) == ["meta.json"]
    assert list(load_students(tmp_path, teacher)) == [0]
    # a failed layer without weights is trained again, not reused
    assert not distill_block(teacher, [1], "gla", config, corpus, tmp_path)[0].reused


def test_divergent_learning_rate_marks_layer_failed(teacher, corpus, tmp_path):
    [result] = distill_block(teacher, [1], "gla", replace(FAST, steps=6, warmup_steps=0, lr=1e30), corpus, tmp_path)
    assert result.status == "failed" and "non-finite" in result.reason
    assert not (tmp_path / "layer_001" / "weights.safetensors").exists()
    assert load_students(tmp_path, teacher) == {}


@pytest.mark.parametrize("change, message", [
    (dict(mixer_name="mamba"), "unknown mixer 'mamba'; choose one of"),
    (dict(layers=[4]), "out of range"),
    (dict(layers=[-1]), "out of range"),
    (dict(layers=[]), "layers is empty"),
    (dict(config={"steps": 10}), "must be a DistillConfig"),
    (dict(config=replace(FAST, seq_lens=(32, 5000))), "above the model's max_position_embeddings"),
], ids=["unknown-mixer", "layer-too-large", "layer-negative", "no-layers", "dict-config", "seq-len-too-long"])
def test_bad_input_writes_nothing(teacher, corpus, tmp_path, change, message):
    kwargs = dict(layers=[1], mixer_name="gla", config=FAST, corpus=corpus, students_dir=tmp_path / "students")
    with pytest.raises(ValueError, match=message):
        distill_block(teacher, **(kwargs | change))
    assert not (tmp_path / "students").exists()


def test_loaded_students_swap_into_the_model(teacher, corpus, tmp_path):
    assert all(r.ok for r in distill_block(teacher, [1, 2], "gla", FAST, corpus, tmp_path))
    with pytest.raises(ValueError, match="distilled with mixer 'gla'"):
        load_students(tmp_path, teacher, mixer_name="jetblock")
    students = load_students(tmp_path, teacher, mixer_name="gla")
    assert sorted(students) == [1, 2] and all(not s.training for s in students.values())
    assert list(load_students(tmp_path, teacher, layers=[2, 3])) == [2]
    token_ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = teacher(input_ids=token_ids).logits
        originals = swap_layers(teacher, students)
        try:
            hybrid = teacher(input_ids=token_ids).logits
        finally:
            restore_layers(teacher, originals)
        assert torch.isfinite(hybrid).all() and not torch.equal(hybrid, reference)
        assert torch.equal(teacher(input_ids=token_ids).logits, reference)


def test_same_seed_gives_identical_weights(teacher, corpus, tmp_path):
    [a] = distill_block(teacher, [2], "gated_deltanet", FAST, corpus, tmp_path / "a")
    [b] = distill_block(teacher, [2], "gated_deltanet", FAST, corpus, tmp_path / "b")
    assert a.key == b.key and _weights(tmp_path / "a", 2) == _weights(tmp_path / "b", 2)
    # the seed initialises the student's non-copied parameters: part of the key
    [c] = distill_block(teacher, [2], "gated_deltanet", replace(FAST, seed=1), corpus, tmp_path / "c")
    assert c.key != a.key and not c.reused


def test_blocks_in_parallel_threads_share_one_teacher(teacher, corpus, tmp_path):
    """The thread runner runs blocks at once on one teacher: each block's hooks see only its own forwards."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(distill_block, teacher, block, "gla", FAST, corpus, tmp_path / "parallel")
                   for block in ([0, 1], [2, 3])]
        parallel = [result for future in futures for result in future.result()]
    serial = distill_block(teacher, [0, 1, 2, 3], "gla", FAST, corpus, tmp_path / "serial")
    for a, b in zip(parallel, serial):
        assert _weights(tmp_path / "parallel", a.layer) == _weights(tmp_path / "serial", b.layer)


@pytest.mark.gpu
def test_block_trains_on_cuda_under_bf16_autocast(corpus, tmp_path):
    """On CUDA the teacher and student forwards run under bf16 autocast; the students keep fp32 weights."""
    from dtr_core.models import load_model

    model = load_model("tiny-llama")[0].cuda()
    results = distill_block(model, [0, 1], "gated_deltanet", FAST, corpus, tmp_path)
    assert all(r.ok and r.final_loss < r.initial_loss for r in results)
    weights = load_file(str(tmp_path / "layer_001" / "weights.safetensors"))
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
