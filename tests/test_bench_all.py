"""`dtr bench all` and the benchmarks it adds (distill, recall) on tiny configurations: well-formed output only."""

from __future__ import annotations

import json
import random

import pytest

from benchmarks import all as bench_all
from benchmarks import harness
from benchmarks import distill_cost, recall, students

PNG = b"\x89PNG\r\n\x1a\n"


def test_distill_cost_tiny_run(tmp_path, capsys):
    argv = ["--model", "tiny-llama", "--layers", "2", "--steps", "2", "--tokens", "256", "--seq-len", "32",
            "--repeats", "1", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--json"]
    assert distill_cost.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "out" / "distill.json").read_text()) == result
    assert (tmp_path / "out" / "distill_throughput.png").read_bytes()[:8] == PNG
    assert result["layers"] == [1, 3] and result["num_layers"] == 4
    assert result["tokens_per_layer"] == 2 * 4 * 32
    assert [r["name"] for r in result["rows"]] == [c.name for c in distill_cost.CONFIGS]
    for row in result["rows"]:
        wall = row["wall_per_layer_s"]
        assert wall["repeats"] == 1 and 0 < wall["min"] <= wall["median"] <= wall["max"]
        assert row["tokens_per_s"]["median"] == pytest.approx(result["tokens_per_layer"] / wall["median"])
        assert row["speedup"]["low"] <= row["speedup"]["median"] <= row["speedup"]["high"]
    assert result["rows"][0]["speedup"]["median"] == pytest.approx(1.0)
    assert not list((tmp_path / "work").glob("distill-cost-*"))  # scratch folders removed
    report = (tmp_path / "out" / "distill.md").read_text()
    assert "| configuration | wall per layer | training tokens/s |" in report
    assert "2 workers x 1 thread" in report and "- fastest: " in report
    assert result["commands"]["dtr"] in report


def test_recall_prompts_have_exact_length_and_the_needle():
    from dtr_core.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    prompts = recall.make_prompts(tokenizer, recall.PROBES, (160, 300), samples=3, seed=1)
    assert len(prompts) == 2 * 2 * 3
    assert prompts == recall.make_prompts(tokenizer, recall.PROBES, (160, 300), samples=3, seed=1)  # seeded
    for prompt in prompts:
        assert len(prompt.ids) == prompt.context
        text = tokenizer.decode(list(prompt.ids))
        answer = tokenizer.decode(list(prompt.answer))
        assert answer == f" {prompt.answer_text}" and text.count(prompt.answer_text) >= 1
        if prompt.probe == "passkey":
            question = "\nWhat is the pass key? The pass key is"
            assert text.startswith("<bos>The ") and text.endswith(question)
            needle = f"The pass key is {prompt.answer_text}. Remember it. {prompt.answer_text} is the pass key. "
            filler = len(text) - len("<bos>") - len(needle) - len(question)  # 1 byte = 1 token
            before = text.index(needle) - len("<bos>")
            assert before == 0 or text[: text.index(needle)].endswith(". ")  # at a sentence boundary
            assert abs(before / filler - prompt.depth) < 12 / filler  # the nearest one (sentences <= 22 bytes)
    with pytest.raises(ValueError, match="too short"):
        recall.passkey_prompt(tokenizer, 40, 0.5, random.Random(0))


def test_recall_tiny_run(tmp_path, capsys):
    argv = ["--model", "tiny-llama", "--contexts", "160,300", "--samples", "2", "--k", "2", "--quick", "--threads",
            "1", "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--distill-seq-len", "32",
            "--json"]
    assert recall.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert "in sequences of 32," in result["hybrid"]["source"]
    assert [p.name for p in (tmp_path / "work").iterdir()] == [f"tiny-llama-gated_deltanet-t"
                                                               f"{students.QUICK_DISTILL['distill_tokens']}-s32-n"
                                                               f"{students.QUICK_DISTILL['distill_steps']}"]
    assert (tmp_path / "out" / "recall_accuracy.png").read_bytes()[:8] == PNG
    assert result["hybrid"]["linear_layers"] == [1, 3] and result["hybrid"]["mixers"] == ["gated_deltanet"]
    for name in ("teacher", "hybrid"):
        rows = result["summary"][name]
        assert {(r["probe"], r["context"]) for r in rows} == {(p, t) for p in recall.PROBES for t in (160, 300)}
        for r in rows:
            assert r["n"] == 2 and 0.0 <= r["accuracy"] <= 1.0 and r["nll"] >= 0
        assert len(result["per_prompt"][name]) == 8
    report = (tmp_path / "out" / "recall.md").read_text()
    assert "| probe | context T | prompts | teacher accuracy | hybrid accuracy |" in report
    assert result["commands"]["dtr"] in report


@pytest.mark.parametrize(("argv", "message"), [
    (["--k", "2", "--layers", "1,2"], "give --layers or --k, not both"),
    (["--students", "x", "--distill-steps", "3"], "--distill-steps set(s) the budget of students distilled here"),
    (["--samples", "0"], "--samples must be >= 1, got 0"),
])
def test_recall_refuses_bad_input_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        recall.main(argv + ["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    assert exit_info.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


def _fake_outputs(root):
    (root / "placements").mkdir(parents=True)
    (root / "placements" / "placements.md").write_text(
        "# Placements: title\n\nintro\n\n## sentiment: table\n\n| a |\n|---|\n| 1 |\n\n"
        "![plot](placements_sentiment.png)\n\n### sentiment: gap\n")
    (root / "placements" / "placements_sentiment.png").write_bytes(PNG)


def test_assemble_only_builds_the_document_from_existing_outputs(tmp_path, capsys):
    root, doc = tmp_path / "docs" / "bench", tmp_path / "docs" / "BENCHMARKS.md"
    _fake_outputs(root)
    assert bench_all.main(["--assemble-only", "--out-root", str(root), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# dtr benchmarks") and capsys.readouterr().out.startswith("# dtr benchmarks")
    for bench in harness.REGISTRY:
        assert f"## {bench.title}" in text
    assert "### sentiment: table" in text and "#### sentiment: gap" in text  # headings one level down
    assert "# Placements: title" not in text  # the section heading replaces the report's title
    assert "![plot](bench/placements/placements_sentiment.png)" in text  # links relative to the document
    assert "_From an earlier run" in text
    assert "Not run yet. Command: `dtr bench recall`" in text
    assert "| [placements](#quality-greedy-dtr-vs-placement-baselines) |" in text
    assert json.loads((root / "all.json").read_text())["runs"] == {}


def test_runs_selected_benchmarks_and_records_failures(tmp_path):
    root, doc, logs = tmp_path / "bench", tmp_path / "BENCHMARKS.md", tmp_path / "logs"
    argv = ["--only", "mixers,search,recall", "--out-root", str(root), "--doc", str(doc), "--logs", str(logs),
            "--extra", "mixers=--tiny --threads 1",
            "--extra", "search=--model tiny-llama --limit 8 --rounds 1 --batch-size 4 --threads 1",
            "--extra", "recall=--model tiny-llama --samples 0"]  # invalid: must be recorded as a failure
    assert bench_all.main(argv) == 1
    runs = json.loads((root / "all.json").read_text())["runs"]
    assert runs["mixers"]["status"] == "ok" and runs["search"]["status"] == "ok"
    assert runs["recall"]["status"] == "failed" and "--samples must be >= 1" in runs["recall"]["reason"]
    mixers = json.loads((root / "mixers" / "mixers.json").read_text())
    assert mixers["rows"] and (root / "mixers" / "mixers.md").read_text().startswith("# Linear-attention ops")
    assert json.loads((root / "search" / "search.json").read_text())["same_answer"] is True
    text = doc.read_text()
    assert f"dtr bench mixers --tiny --threads 1 --out {root / 'mixers'}" in text  # the exact command of its run
    assert "Greedy search cost: tiny-llama" in text
    assert "**Not completed in this run** (`dtr bench recall --model tiny-llama --samples 0 --out " in text
    assert "): failed — dtr bench recall: error: --samples must be >= 1, got 0. Log: `" in text
    assert (logs / "recall.log").is_file()


def test_a_direct_run_after_a_recorded_one_is_not_credited_to_it(tmp_path):
    record = {"commands": {"dtr": "dtr bench mixers --json"}, "started_utc": "2026-11-28 17:59:00", "seconds": 70}
    report = tmp_path / "mixers.md"
    report.write_text("- command: `dtr bench mixers --json`\n- date (UTC): 2026-11-28 17:59:50; platform x\n")
    assert bench_all._written_by(record, report)
    report.write_text("- command: `dtr bench mixers --json`\n- date (UTC): 2026-11-28 21:00:20; platform x\n")
    assert not bench_all._written_by(record, report)  # the same command, run later by hand
    report.write_text("- command: `dtr bench mixers --quick`\n- date (UTC): 2026-11-28 17:59:50; platform x\n")
    assert not bench_all._written_by(record, report)


def test_student_loss_tiny_run_reuses_finished_students(tmp_path, capsys):
    from benchmarks import student_loss

    argv = ["--model", "tiny-llama", "--layers", "0,2", "--budgets", "256,512", "--seq-len", "32",
            "--variants", "default,short_conv=false+gate=sigmoid", "--work-dir", str(tmp_path / "work"),
            "--out", str(tmp_path / "out"), "--json"]
    assert student_loss.main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert (tmp_path / "out" / "student_loss.png").read_bytes()[:8] == PNG
    assert [(r["variant"], r["tokens"]) for r in first["rows"]] == [
        ("default", 256), ("default", 512), ("short_conv=false+gate=sigmoid", 256), ("short_conv=false+gate=sigmoid", 512)]
    for row in first["rows"]:
        assert set(row["losses"]) == {"0", "2"} and all(v > 0 for v in row["losses"].values())
        assert not row["reused"]
    # the earlier options change the student: other parameters (no short convolution), other losses
    assert first["rows"][2]["student_params"] < first["rows"][0]["student_params"]
    assert first["rows"][2]["losses"] != first["rows"][0]["losses"]
    assert student_loss.main(argv) == 0  # a rerun trains nothing and reports the same numbers
    second = json.loads(capsys.readouterr().out)
    assert all(r["reused"] for r in second["rows"])
    assert [r["losses"] for r in second["rows"]] == [r["losses"] for r in first["rows"]]
    assert "| variant | training tokens per layer | steps | layer 0 | layer 2 |" in (
        tmp_path / "out" / "students.md").read_text()


def test_student_loss_refuses_an_unknown_option_before_any_work(tmp_path, capsys):
    from benchmarks import student_loss

    with pytest.raises(SystemExit) as exit_info:
        student_loss.main(["--variants", "gate=bogus", "--work-dir", str(tmp_path / "work")])
    assert exit_info.value.code == 2
    assert "variant 'gate=bogus'" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_healing_tiny_run_heals_and_scores_every_model(tmp_path, capsys):
    from benchmarks import healing
    from dtr_core.distill.block import distill_block
    from dtr_core.distill.config import RANDOM_TEACHER_MAX_NORMALIZED_LOSS, DistillConfig
    from dtr_core.distill.corpus import Corpus
    from dtr_core.models import load_model

    model, tokenizer = load_model("tiny-llama")
    config = DistillConfig.for_tokens(256, seq_lens=(32,), max_normalized_loss=RANDOM_TEACHER_MAX_NORMALIZED_LOSS)
    distill_block(model, [0, 1, 2, 3], "gated_deltanet", config, Corpus("bbc", tokenizer), tmp_path / "students")
    argv = ["--quick", "--model", "tiny-llama", "--students", str(tmp_path / "students"), "--order", "2,0,3",
            "--out", str(tmp_path / "out"), "--json"]
    assert healing.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(r["k"], r["steps"]) for r in result["rows"]] == [(0, 0), (1, 0), (1, 2), (2, 0), (2, 2)]
    for row in result["rows"]:
        assert 0 <= row["test"] <= 1 and row["perplexity"] > 1 and set(row["passkey"]) == {"160"}
    healed = [r for r in result["rows"] if r["steps"]]
    assert all(r["status"] == "ok" and r["layers"] == [2, 0][: r["k"]] for r in healed)
    assert all(r["final_kl"] != r["initial_kl"] for r in healed)  # healing trained something
    assert (tmp_path / "out" / "healing_sentiment.png").read_bytes()[:8] == PNG
    report = (tmp_path / "out" / "healing.md").read_text()
    assert "| task | k | heal steps | test score | BBC perplexity | passkey@160 |" in report
    assert f"| sentiment | 1 | 2 | {healed[0]['test']:.3f} | {healed[0]['perplexity']:.2f} |" in report


def test_healing_refuses_ks_beyond_the_order(tmp_path, capsys):
    from benchmarks import healing

    (tmp_path / "students").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        healing.main(["--students", str(tmp_path / "students"), "--order", "3,5", "--ks", "4"])
    assert exit_info.value.code == 2
    assert "--ks up to 4 needs an order of at least that many layers" in capsys.readouterr().err


def test_healing_is_wired_to_the_placements_students_and_greedy_order(tmp_path):
    placements = {"model": "smollm2-135m", "students": {"dir": str(tmp_path / "students")},
                  "tasks": {"trec": {"greedy_trajectory": [{"layer": 7}, {"layer": 3}, {"layer": 11}]}}}
    harness.write_json(tmp_path / "placements" / "placements.json", placements)
    args, why = bench_all.wiring_args("healing", tmp_path, [])
    assert args[:2] == ["--students", harness.shown(tmp_path / "students")] and args[4:] == ["--tasks", "trec"]
    assert json.loads((tmp_path / "placements" / "greedy_order_trec.json").read_text()) == {"swap_order": [7, 3, 11]}
    assert args[2:4] == ["--order", harness.shown(tmp_path / "placements" / "greedy_order_trec.json")]
    assert "trec" in why
    assert bench_all.wiring_args("healing", tmp_path, ["--students", "x"]) == ([], None)  # the user's own choice
