"""`dtr bench inference` on tiny models: well-formed output, exact cache accounting, the cost model (not speed)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import harness
from benchmarks import cost_model as cm
from benchmarks import inference
from dtr_core.hybrid.model import cache_bytes as dtr_cache_bytes
from dtr_core.hybrid.model import make_hybrid
from dtr_core.mixers import build_student
from dtr_core.models import load_model

TINY_ARGS = ["--model", "tiny-llama", "--contexts", "64,128", "--repeats", "1", "--decode-tokens", "2",
             "--prefill-max", "128", "--balance-mb", "8", "--threads", "1"]


def _hybrid(teacher, mixer: str, layers: tuple[int, ...]):
    students = {i: build_student(mixer, teacher.config, i, teacher_attention=teacher.model.layers[i].self_attn)
                for i in layers}
    return make_hybrid(teacher, students)


def test_tiny_run_writes_well_formed_report_json_and_plots(tmp_path, capsys):
    assert inference.main(TINY_ARGS + ["--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "inference.json").read_text()) == result
    for name in ("decode_speedup.png", "prefill_speedup.png", "cache_memory.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(result["files"]) == {"inference.md", "inference.json", "decode_speedup.png", "prefill_speedup.png",
                                    "cache_memory.png"}

    names = [c["name"] for c in result["contenders"]]
    assert names == ["teacher", "k=0", "k=1", "k=2", "k=3", "k=4"]  # tiny-llama: L = 4
    assert [len(c["linear_layers"]) for c in result["contenders"]] == [0, 0, 1, 2, 3, 4]
    for phase, timing in (("decode", "time_per_token_s"), ("prefill", "time_s")):
        rows = result[phase]
        assert {(r["contender"], r["context"]) for r in rows} == {(n, t) for n in names for t in (64, 128)}
        for r in rows:
            t = r[timing]
            assert t["repeats"] == 1 and 0 < t["min"] <= t["median"] <= t["max"]
            cache = r["cache"]
            assert cache["exact"] and cache["measured"] == cache["formula"] == cache["dtr_cache_bytes"]
            assert r["ideal_speedup"] > 0 and r["measured_over_ideal"] > 0
            if r["contender"] == "teacher":
                assert r["speedup"]["median"] == pytest.approx(1.0) and r["ideal_speedup"] == pytest.approx(1.0)
    assert result["targets"]["cache_exact"]["met"] is True
    assert result["targets"]["speedup_vs_ideal"]["met"] is None  # no context >= 8K in a tiny run
    assert result["targets"]["headline"]["met"] is None
    assert result["prefill_skipped"] == []
    assert result["machine"]["torch_threads"] == 1 and result["machine"]["cpu_model"]
    assert result["commands"]["dtr"].startswith("dtr bench inference --model tiny-llama")

    report = (tmp_path / "inference.md").read_text()
    for heading in ("## Decode speed-up vs the teacher", "## Decode details", "## Prefill", "## Memory", "## Targets"):
        assert heading in report
    assert report.count(result["commands"]["dtr"]) >= 5  # the exact command beside every table
    assert "| k=2/4 |" in report and "**MET**" in report

    rerendered = tmp_path / "again"
    assert inference.main(["--from-json", str(tmp_path / "inference.json"), "--out", str(rerendered)]) == 0
    assert (rerendered / "inference.md").read_text() == report  # same numbers, same report


def test_skipped_prefill_is_reported_with_a_reason(tmp_path, capsys):
    argv = TINY_ARGS[: TINY_ARGS.index("--prefill-max")]
    argv += ["--prefill-max", "64", "--fractions", "0.5", "--threads", "1", "--balance-mb", "8", "--out", str(tmp_path)]
    assert inference.main(argv) == 0
    report = capsys.readouterr().out
    result = json.loads((tmp_path / "inference.json").read_text())
    assert {r["context"] for r in result["prefill"]} == {64}
    assert {r["context"] for r in result["decode"]} == {64, 128}
    [skip] = result["prefill_skipped"]
    assert skip["context"] == 128 and skip["teacher_estimate_s"] > 0
    assert "- skipped: prefill at T=128 not run" in report
    assert "not run" in report.split("## Memory")[1]  # memory table marks the missing prefill


@pytest.mark.parametrize("mixer", ["gated_deltanet", "jetblock"])
def test_synthetic_cache_has_the_structure_and_size_of_a_real_prefill(mixer):
    teacher, _ = load_model("tiny-llama")
    context = 40
    for model in (teacher, _hybrid(teacher, mixer, (0, 2))):
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            ids = torch.randint(0, model.config.vocab_size, (1, context), generator=generator)
            real = model(ids, use_cache=True, logits_to_keep=1).cache
            fake = inference.synthetic_cache(model, context, generator)
            assert fake.get_seq_length() == real.get_seq_length() == context
            assert [type(layer) for layer in fake.layers] == [type(layer) for layer in real.layers]
            for a, b in zip(real.layers, fake.layers, strict=True):
                for name in ("keys", "values"):
                    if isinstance(getattr(a, name, None), torch.Tensor):
                        assert getattr(a, name).shape == getattr(b, name).shape
                        assert getattr(a, name).dtype == getattr(b, name).dtype
                for states in ("conv_states", "recurrent_states"):
                    for index, tensor in (getattr(a, states, None) or {}).items():
                        other = getattr(b, states)[index]
                        assert (tensor is None) == (other is None)
                        if tensor is not None:
                            assert tensor.shape == other.shape and tensor.dtype == other.dtype
            assert inference.cache_nbytes(fake) == inference.cache_nbytes(real) == dtr_cache_bytes(model, context)
            token = inference.decode(model, fake, ids[:, -1:], 3)
            assert token.shape == (1, 1)
            inference.rewind(fake, context)
            assert fake.get_seq_length() == context


@pytest.mark.parametrize("mixer", ["gated_deltanet", "jetblock", "gla"])
def test_cost_model_cache_formula_equals_dtr_and_ratios_behave(mixer):
    teacher, _ = load_model("tiny-llama")
    L = len(teacher.model.layers)
    profile = cm.profile_model(teacher, build_student(mixer, teacher.config, 0))
    hybrid = _hybrid(teacher, mixer, (1, 3))
    kinds = inference.layer_kinds(hybrid)
    assert kinds == ["full", mixer, "full", mixer]
    for context in (1, 100, 4096):
        assert cm.cache_bytes(profile, kinds, context) == dtr_cache_bytes(hybrid, context)
        assert cm.cache_bytes(profile, ["full"] * L, context) == dtr_cache_bytes(teacher, context)
    full = ["full"] * L
    assert cm.ideal_decode_speedup(profile, full, 1000) == 1.0
    assert cm.ideal_prefill_speedup(profile, full, 1000) == 1.0
    ratios = [cm.ideal_decode_speedup(profile, kinds, t) for t in (256, 4096, 65536, 2**24)]
    assert ratios == sorted(ratios) and ratios[-1] == pytest.approx(L / 2, rel=0.02)  # KV dominates: L / full layers
    assert cm.ideal_decode_speedup(profile, kinds, 65536, "concat") > ratios[2]
    params = sum(p.numel() for p in teacher.parameters())  # tied embedding counted once
    bytes_teacher = cm.decode_cost(profile, full, 0).bytes
    hidden = teacher.config.hidden_size
    weights = params - teacher.config.vocab_size * hidden + profile.lm_head_params + hidden
    assert bytes_teacher == weights * 4 + L * cm.kv_bytes_per_layer(profile, 1)  # weights once + the new K/V written


def test_smollm2_shaped_profile_gives_the_documented_headline_ideal():
    # SmolLM2-135M in float32 with gated_deltanet students: counts as `profile_model` reads them
    profile = cm.ModelProfile(num_layers=30, heads=9, kv_heads=3, head_dim=64, element_bytes=4,
                              rest_params=30 * (3 * 576 * 1536 + 2 * 576) + 576 + 49152 * 576 + 576,
                              lm_head_params=49152 * 576, embedding_row=576,
                              full_attention_params=2 * 576 * 576 + 2 * 576 * 192,
                              linear_params=5 * 576 * 576 + 576 + 2 * 9 * 576 + 3 * 9 + 64,
                              linear_state_bytes=9 * 64 * 64 * 4, mixer="gated_deltanet", chunk_size=64, conv_size=0)
    half = ["full", "gated_deltanet"] * 15
    ideal = cm.ideal_decode_speedup(profile, half, 32768)
    assert 1.45 < ideal < 1.6  # below the 1.6x headline target even in the ideal
    assert cm.ideal_decode_speedup(profile, half, 2048) < 1.0  # students' full-width k/v/g weights cost more
    intensity = cm.decode_cost(profile, ["full"] * 30, 32768).intensity
    assert intensity < 1.5  # FLOPs per byte: memory-bound on any CPU


def test_contender_plans_uniform_and_greedy(tmp_path):
    plan = inference.plan_contenders(30, inference.DEFAULT_FRACTIONS)
    assert [c.k for c in plan] == [None, 0, 7, 15, 22, 30]
    assert plan[3].linear_layers == tuple(range(1, 30, 2))  # half: every other layer
    assert all(len(c.linear_layers) == (c.k or 0) for c in plan)

    greedy = {"rounds": [{"chosen": 5}, {"chosen": 9}, {"chosen": 2}], "swap_order": [5, 9]}
    path = tmp_path / "trajectory.json"
    path.write_text(json.dumps(greedy))
    order = inference.read_greedy_order(path)
    assert order == [5, 9, 2]
    plan = inference.plan_contenders(12, (0.0, 0.25, 0.5), order)
    assert [(c.k, c.linear_layers, c.placement) for c in plan[1:]] == [
        (0, (), "greedy"), (3, (2, 5, 9), "greedy"), (6, plan[3].linear_layers, "greedy+uniform")]
    assert {2, 5, 9} < set(plan[3].linear_layers) and len(plan[3].linear_layers) == 6
    path.write_text(json.dumps({"score": 1}))
    with pytest.raises(ValueError, match="rounds"):
        inference.read_greedy_order(path)


def test_harness_timing_helpers():
    timing = harness.Timing.from_samples([harness.Sample(3.0, 6.0), harness.Sample(1.0, 2.0),
                                          harness.Sample(2.0, 4.0)])
    assert (timing.median, timing.min, timing.max, timing.cpu_per_wall) == (2.0, 1.0, 3.0, 2.0)
    assert harness.ratio_of(timing, timing.scaled(0.5))["median"] == 2.0

    order = []
    tasks = {name: (lambda name=name: order.append(name) or harness.Sample(1.0, 1.0)) for name in "abc"}
    timings = harness.interleave(tasks, repeats=3, warmup=1)
    assert order == list("abc") + list("abc") + list("bca") + list("cab")  # rotated every round
    assert all(t.samples == (1.0, 1.0, 1.0) for t in timings.values())

    assert harness.markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---:|\n| 1 | 2 |"
    with pytest.raises(ValueError):
        harness.markdown_table(["a", "b"], [[1]])


def test_peak_rss_sees_a_large_allocation():
    if not harness.peak_rss_supported():
        pytest.skip("needs Linux /proc/self/clear_refs")
    with harness.PeakRSS() as peak:
        buffer = torch.ones(32 * 2**20 // 4)  # 32 MiB, touched
        del buffer
    assert 30 * 2**20 <= peak.peak_bytes <= 64 * 2**20


def test_registered_as_dtr_bench_inference(tmp_path):
    import typer
    from typer.testing import CliRunner

    from dtr.commands import bench

    assert bench.BENCHMARKS["inference"][0] == "benchmarks.inference"
    app = typer.Typer()
    bench.register(app)
    argv = TINY_ARGS + ["--fractions", "1", "--contexts", "32", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, ["bench", "inference", *argv])
    assert result.exit_code == 0, result.output
    assert "## Decode speed-up vs the teacher" in result.output and (tmp_path / "inference.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--help"])
    assert exit_info.value.code == 0
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--mixer", "nope", "--out", str(tmp_path / "never")])
    assert exit_info.value.code == 2 and not (tmp_path / "never").exists()  # refused before any work


def test_bfloat16_run_keeps_exact_cache_accounting(tmp_path, capsys):
    argv = TINY_ARGS + ["--fractions", "0.5,1", "--dtype", "bfloat16", "--out", str(tmp_path), "--json"]
    assert inference.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["dtype"] == "bfloat16" and result["profile"]["element_bytes"] == 2
    rows = result["prefill"] + result["decode"]
    assert rows and all(r["cache"]["exact"] for r in rows)
    assert "(CPU, batch 1)" in (tmp_path / "inference.md").read_text()


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        inference.main(TINY_ARGS + ["--device", "cuda", "--out", str(tmp_path / "never")])
    assert exit_info.value.code == 2 and not (tmp_path / "never").exists()
    assert "error: --device cuda needs a CUDA GPU" in capsys.readouterr().err


def test_a_missing_greedy_order_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--layers-from", str(tmp_path / "none.json"), "--out", str(tmp_path / "never")])
    assert exit_info.value.code == 2 and not (tmp_path / "never").exists()
    assert f"error: --layers-from {tmp_path / 'none.json'} is not a file" in capsys.readouterr().err
