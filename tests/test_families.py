"""Every family of dtr_core/families.py on a tiny random model built from transformers' own config class: the
empty swap is bit-identical, teacher-initialised students copy the teacher's projections and run, the hybrid
exports, loads through `AutoModelForCausalLM` and generates with its cache exactly as full forwards do, and
the fast greedy search equals the reference listing. A family outside the table with the Llama attention
layout is tried and verified; any other keeps the clear error. docs/FAMILIES.md cites these tests."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import dtr_core.hybrid  # noqa: F401  registers the hybrid classes
from distill_support import write_corpus
from dtr_core.distill.config import DistillConfig
from dtr_core.distill.corpus import Corpus
from dtr_core.distill.training import load_students, read_layer_results
from dtr_core.evaluation.tasks import ClassificationTask, Example
from dtr_core.families import FAMILIES, get_family, layer_type
from dtr_core.hybrid.export import read_export_info, save_export
from dtr_core.hybrid.model import cache_bytes, layer_map, make_hybrid
from dtr_core.hybrid.surgery import attention_module, swap_layers, verify_family
from dtr_core.mixers import MIXERS, MixerConfig, build_student
from dtr_core.models import TINY_VOCAB, byte_tokenizer
from dtr_core.search.acceptance import Tolerance
from dtr_core.search.greedy_search import encode_split, run_greedy_search
from dtr_core.search.reference import run_reference
from pipeline_support import toy_texts

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matmuls: one thread is fastest

SPECIAL = dict(vocab_size=TINY_VOCAB, bos_token_id=256, eos_token_id=257, pad_token_id=258)
COMMON = dict(SPECIAL, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
# Gemma: one key/value head, head_dim above hidden / heads, a window shorter than the generated sequences
GEMMA = dict(num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, sliding_window=6,
             layer_types=["sliding_attention", "full_attention"] * 2)
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(COMMON, num_key_value_heads=2)),
    "granite": ("GraniteConfig", dict(COMMON, num_key_value_heads=2, embedding_multiplier=12.0,
                                      residual_multiplier=0.22, attention_multiplier=0.0078125, logits_scaling=8.0)),
    "olmo2": ("Olmo2Config", dict(COMMON, num_key_value_heads=2)),
    "phi3": ("Phi3Config", dict(COMMON, num_key_value_heads=2)),
    "gemma2": ("Gemma2Config", dict(COMMON, **GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3_text": ("Gemma3TextConfig", dict(COMMON, **GEMMA)),
    "gpt_neox": ("GPTNeoXConfig", dict(COMMON, use_parallel_residual=True)),  # partial rotary: 0.25 of head_dim
    "gpt2": ("GPT2Config", dict(SPECIAL, n_embd=64, n_layer=4, n_head=4, n_positions=256)),
}
NEW_FAMILIES = ["granite", "olmo2", "phi3", "gemma2", "gemma3_text", "gpt_neox", "gpt2"]


def tiny_model(model_type: str, seed: int = 0):
    class_name, fields = FAMILY_CONFIGS[model_type]
    config = getattr(transformers, class_name)(**fields)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def students_for(model, layers, mixer="gated_deltanet", perturb=True):
    students = {i: build_student(mixer, model.config, i, teacher_attention=attention_module(model, i)) for i in layers}
    if perturb:  # away from the initial gates, so a wrong state path cannot hide behind near-identity gates
        with torch.no_grad():
            for student in students.values():
                for param in student.parameters():
                    param.add_(0.02 * torch.randn_like(param))
    return students


def test_every_table_family_has_a_tiny_model_here():
    assert sorted(FAMILIES) == sorted(set(FAMILY_CONFIGS) | {"mistral", "qwen2", "qwen3"})  # those: test_hybrid.py


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_empty_swap_is_bit_identical(family):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (2, 17))
    with torch.no_grad():
        expected = model(ids).logits
        assert swap_layers(model, {}) == {}
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
        hybrid = make_hybrid(model, {})
        assert layer_map(hybrid) == ["full"] * 4
        torch.testing.assert_close(hybrid(ids).logits, expected, rtol=0, atol=0)


# How transformers' own attention splits each fused projection (independent of dtr_core.families): (B, T, hidden)
# -> q, k, v, each (B, T, heads * head_dim).
def _split_fused(family, attention, x):
    if family == "phi3":
        q_width = attention.config.num_attention_heads * attention.head_dim
        kv_width = attention.config.num_key_value_heads * attention.head_dim
        return attention.qkv_proj(x).split([q_width, kv_width, kv_width], dim=-1)
    if family == "gpt_neox":
        qkv = attention.query_key_value(x).view(*x.shape[:-1], -1, 3 * attention.head_size)
        return [part.flatten(-2) for part in qkv.chunk(3, dim=-1)]
    if family == "gpt2":
        return attention.c_attn(x).split(attention.split_size, dim=-1)
    return [getattr(attention, f"{name}_proj")(x) for name in ("q", "k", "v")]


@pytest.mark.parametrize("mixer", sorted(MIXERS))
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_teacher_initialised_student_copies_the_projections_and_runs(family, mixer):
    model = tiny_model(family)
    attention = attention_module(model, 1)
    student = build_student(mixer, model.config, 1, teacher_attention=attention)
    x = torch.randn(2, 9, model.config.hidden_size)
    with torch.no_grad():
        projected = student.in_proj(x)
        for name, teacher_part in zip(("q", "k", "v"), _split_fused(family, attention, x)):
            torch.testing.assert_close(projected[..., student.input_rows(name)], teacher_part)
        output_projection = getattr(attention, get_family(model.config).output)
        y = torch.randn(2, 9, student.o_proj.in_features)
        torch.testing.assert_close(student.o_proj(y), output_projection(y))
        swap_layers(model, {1: student})
        logits = model(torch.randint(0, 256, (2, 11)), use_cache=False).logits
    assert logits.shape == (2, 11, TINY_VOCAB) and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_hybrid_exports_loads_and_generates_with_its_cache(tmp_path, family):
    """Layers 0 (sliding-window on Gemma) and 1 linear; 5 + 12 tokens run past Gemma's window of 6."""
    model = tiny_model(family)
    hybrid = make_hybrid(model, students_for(model, [0, 1]))
    info = save_export(hybrid, byte_tokenizer(), tmp_path / "export", key="k", mixer="gated_deltanet")
    assert read_export_info(tmp_path / "export") == info and info["linear_layers"] == [0, 1]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert type(loaded).__name__ == type(hybrid).__name__ and loaded.config.model_type == f"dtr_{family}"
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, hybrid(ids).logits, rtol=0, atol=0)
        prompt = ids[:1, :5]
        generated = loaded.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        expected = prompt
        for _ in range(12):
            logits = loaded(expected, use_cache=False).logits[:, -1]
            logits[:, loaded.config.eos_token_id] = -float("inf")  # as min_new_tokens does
            next_id = logits.argmax(-1, keepdim=True)
            expected = torch.cat([expected, next_id], dim=1)
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_sliding_window_layers_hold_a_bounded_cache(family):
    model = tiny_model(family)
    hybrid = make_hybrid(model, students_for(model, [2]))
    with torch.no_grad():
        out = hybrid(torch.randint(0, 256, (1, 20)), use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    held = 0
    for index, layer in enumerate(cache.layers):
        if hasattr(layer, "recurrent_states"):  # the recurrent state and the short convolution's inputs
            held += sum(t.numel() * t.element_size() for states in (layer.recurrent_states, layer.conv_states or {})
                        for t in states.values() if t is not None)
        else:
            positions = 5 if layer_type(hybrid.config, index) == "sliding_attention" else 20  # window 6 keeps 5
            assert layer.keys.shape[-2] == positions
            held += layer.keys.numel() * layer.keys.element_size() * 2
    assert held == cache_bytes(hybrid, context_len=20)


def toy_task():
    examples = [Example(uid=f"c{i}", text=t, label="x" if i % 3 else "y") for i, t in enumerate(toy_texts(60, 0))]
    return ClassificationTask(name="toy-cls", load=lambda: examples, validation_size=40, test_size=4,
                              template="{text} =", verbalisers={"x": "A", "y": "B"})


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_fast_search_equals_the_reference_listing(tmp_path, family):
    model, tokenizer = tiny_model(family), byte_tokenizer()
    corpus = Corpus(write_corpus(tmp_path / "corpus.txt"), tokenizer)
    config = DistillConfig(steps=2, batch_size=2, seq_lens=(16,), eval_sequences=2, warmup_steps=1, log_every=1,
                           max_normalized_loss=1e9)  # every layer stays a candidate: the search is under test
    task = toy_task()
    reference = run_reference(model, tokenizer, corpus, task, "gla", tmp_path, config, tolerance=0.5)
    students = load_students(tmp_path / "students", model)
    assert sorted(students) == [0, 1, 2, 3]
    losses = read_layer_results(tmp_path / "students")
    first_hint = {layer: -losses[layer].normalized_loss for layer in students}
    result, teacher, _ = run_greedy_search(model, task, encode_split(task, tokenizer), students,
                                           Tolerance("relative", 0.5), first_hint=first_hint)
    assert teacher.score == reference["teacher_score"]
    assert list(result.swap_order) == reference["swap_order"]
    assert list(result.best_layers) == reference["best_layers"]
    assert list(result.opt_layers) == reference["opt_layers"]
    assert [r.score for r in result.rounds] == [r["score"] for r in reference["rounds"]]


# --- families outside the table ----------------------------------------------------------------------------


def test_a_family_with_the_llama_layout_is_tried_and_verified(tmp_path):
    config = transformers.OlmoConfig(**COMMON, num_key_value_heads=2)  # OLMo 1: not in the table
    assert config.model_type not in FAMILIES
    model = AutoModelForCausalLM.from_config(config).eval()
    verify_family(model)  # the no-swap hybrid reproduces the teacher bit for bit
    assert get_family(config).model_type == "olmo"
    hybrid = make_hybrid(model, students_for(model, [1]))
    hybrid.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, hybrid(ids).logits, rtol=0, atol=0)


def test_a_llama_layout_family_whose_hybrid_differs_is_refused_before_any_work(monkeypatch, tmp_path):
    import dtr_core.hybrid.model as hybrid_model
    from dtr_core.hybrid.build import build_hybrid

    model = AutoModelForCausalLM.from_config(transformers.OlmoConfig(**COMMON, num_key_value_heads=2)).eval()
    make = hybrid_model.make_hybrid

    def slightly_off(teacher, students, mixer_config=None):  # what a layout difference the probe misses does
        hybrid = make(teacher, students, mixer_config)
        with torch.no_grad():
            hybrid.lm_head.weight.add_(1e-3)
        return hybrid

    monkeypatch.setattr(hybrid_model, "make_hybrid", slightly_off)
    message = "architecture 'olmo' has the Llama attention layout but its dtr hybrid does not reproduce it exactly"
    with pytest.raises(ValueError, match=message):
        verify_family(model)
    with pytest.raises(ValueError, match=message):
        build_hybrid(model, [1], "gla")


def test_a_family_without_the_llama_layout_keeps_the_clear_error():
    config = transformers.OPTConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                    num_attention_heads=2, word_embed_proj_dim=32)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"unsupported architecture 'opt'; dtr supports decoder families: .*gpt2.*"
                                         r"add an entry to dtr_core/families.py"):
        swap_layers(model, {})
    with pytest.raises(ValueError, match="unsupported architecture 'opt'"):
        verify_family(model)


# --- sliding-window layers in the cost model and the speed report ------------------------------------------


def test_cost_model_and_speed_report_count_sliding_window_layers_as_bounded():
    from benchmarks import cost_model as cm
    from dtr_core.speed import cache_nbytes, decode, replacement_savings, rewind, synthetic_cache

    model = tiny_model("gemma2")  # layers 0 and 2 slide over a window of 6, 1 and 3 are global
    profile = cm.profile_model(model, build_student("gated_deltanet", model.config, 0))
    assert profile.sliding_layers == (0, 2) and profile.sliding_window == 6
    full = ["full"] * 4
    assert cm.cache_bytes(profile, full, 100) == cache_bytes(model, 100)
    kv = [cm.kv_bytes_per_layer(profile, positions) for positions in (5, 100, 5, 100)]
    assert cm.cache_bytes(profile, full, 100) == sum(kv)
    by_layer = {entry["layer"]: entry for entry in cm.replacement_savings(profile, full, 100)}
    assert by_layer[0]["cache_bytes_saved"] == kv[0] - profile.linear_state_bytes
    assert by_layer[1]["cache_bytes_saved"] == kv[1] - profile.linear_state_bytes
    assert by_layer[1]["decode_bytes_saved"] > by_layer[0]["decode_bytes_saved"]
    assert by_layer[0]["sliding_window"] and not by_layer[1]["sliding_window"]

    report = replacement_savings(model, 100)
    assert [entry["layer_type"] for entry in report] == ["sliding_attention", "full_attention"] * 2
    for entry in report:  # what the hybrid with that one layer replaced really holds
        hybrid = make_hybrid(model, students_for(model, [entry["layer"]], perturb=False))
        assert entry["cache_bytes_saved"] == cache_bytes(model, 100) - cache_bytes(hybrid, 100)

    hybrid = make_hybrid(model, students_for(model, [1]))
    with torch.no_grad():
        cache = synthetic_cache(hybrid, 40, torch.Generator().manual_seed(0))
    assert cache_nbytes(cache) == cache_bytes(hybrid, 40) and cache.get_seq_length() == 40
    with torch.no_grad():
        decode(hybrid, cache, torch.tensor([[5]]), 3)  # decodes from it; sliding layers stay at their window
    assert cache.get_seq_length() == 43
    assert [layer.keys.shape[-2] for layer in cache.layers if hasattr(layer, "keys")] == [5, 5, 43]
    rewind(cache, 40)
    assert cache.get_seq_length() == 40
    assert [layer.keys.shape[-2] for layer in cache.layers if hasattr(layer, "keys")] == [5, 5, 40]


# --- the fla kernels (GPU) -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mixer", ["gla", "gated_deltanet"])
@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_fla_path_matches_the_torch_path(family, mixer):
    pytest.importorskip("fla.ops.gla", reason="needs flash-linear-attention")
    model = tiny_model(family).cuda()
    logits = {}
    for backend in ("fla", "torch"):
        students = {i: build_student(mixer, model.config, i, MixerConfig(backend=backend), attention_module(model, i))
                    for i in (0, 1)}
        with torch.no_grad():
            logits[backend] = make_hybrid(model, students)(torch.arange(3, 40, device="cuda")[None]).logits.float()
    error = (logits["fla"] - logits["torch"]).norm() / logits["torch"].norm()
    assert error < 5e-3  # fla computes in tf32 tiles (tests/test_ops_gpu.py)


def test_search_logs_what_each_replacement_saves():
    """The replace flow's per-layer lines: a sliding-window layer saves less than a global one."""
    from flows.replace import SAVINGS_CONTEXT, replacement_savings_lines

    model = tiny_model("gemma2")
    kinds = [layer_type(model.config, index) for index in range(model.config.num_hidden_layers)]
    sliding, full = kinds.index("sliding_attention"), kinds.index("full_attention")
    lines = replacement_savings_lines(model, "gated_deltanet", [sliding, full])
    assert [line.split(" (")[0] for line in lines] == [f"layer {sliding}", f"layer {full}"]
    assert "(sliding_attention)" in lines[0] and "(full_attention)" in lines[1]
    saved = [float(line.split("saves ")[1].split(" KiB")[0].replace(",", "")) for line in lines]
    assert saved[0] < saved[1] and saved[1] > 0 and all(f"at {SAVINGS_CONTEXT:,} tokens" in line for line in lines)
