"""`dtr bench placements` on tiny-llama: well-formed report, JSON and plots; students reused by content hash."""

from __future__ import annotations

import json

import pytest

from benchmarks import placements

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--model", "tiny-llama", "--tasks", "sentiment", "--val-limit", "8", "--test-limit", "8",
        "--distill-tokens", "512", "--distill-seq-len", "32", "--distill-steps", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("placements")
    work = tmp_path_factory.mktemp("work")
    argv = TINY + ["--ks", "1-3", "--out", str(out), "--work-dir", str(work), "--json"]
    assert placements.main(argv) == 0
    return out, work, json.loads((out / "placements.json").read_text())


def test_tiny_run_writes_report_json_and_plots(tiny_run):
    out, work, result = tiny_run
    assert set(result["files"]) == {"placements.md", "placements.json", "placements_sentiment.png",
                                    "gap_sentiment.png"}
    for name in result["files"]:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG
    assert result["students"]["source"] == "distilled here"
    assert result["students"]["layers"] == [0, 1, 2, 3]
    assert sorted(result["students"]["distilled"]) == [0, 1, 2, 3]
    assert result["commands"]["dtr"].startswith("dtr bench placements --model tiny-llama")
    assert result["machine"]["cpu_model"] and result["machine"]["torch_threads"] == 1

    t = result["tasks"]["sentiment"]
    assert t["num_layers"] == 4 and t["ks"] == [1, 2, 3]
    assert t["teacher"]["n_test"] == 8 and t["teacher"]["n_validation"] == 8
    assert t["test_threshold"] == pytest.approx(0.95 * t["teacher"]["test"])
    assert set(t["single_swap"]) == {"0", "1", "2", "3"}
    trajectory = t["greedy_trajectory"]
    assert [r["k"] for r in trajectory] == list(range(1, len(trajectory) + 1)) and 1 <= len(trajectory) <= 3
    if t["search_stop"] == "rejected":  # stopped early only when the search collapsed to the majority class
        assert trajectory[-1]["validation"] <= t["chance_validation"]
    else:
        assert t["search_stop"] == "cap" and len(trajectory) == 3
    assert set(t["curves"]) == set(placements.STRATEGIES)
    for strategy, curve in t["curves"].items():
        assert curve and curve[0]["k"] == 1  # every strategy is scored at k = 1
        for row in curve:
            assert 0.0 <= row["min"] <= row["mean"] <= row["max"] <= 1.0
            assert row["n"] == (3 if strategy == "random" else 1)
        collapsed = t["collapsed"].get(strategy)
        assert collapsed is None or collapsed == curve[-1]["k"]
    for point in t["points"]:
        assert len(point["layers"]) == point["k"] and set(point["layers"]) <= {0, 1, 2, 3}
    greedy_sets = [p["layers"] for p in t["points"] if p["strategy"] == "greedy"]
    order = [r["layer"] for r in t["greedy_trajectory"]]
    assert greedy_sets == [sorted(order[:k]) for k in range(1, len(greedy_sets) + 1)]
    for mode in ("point", "bootstrap"):
        a = t["acceptance"][mode]
        if "error" in a:
            assert a["error"] == "the search collapsed before this rule stopped"
            continue
        assert 0 <= a["k"] <= 3 and len(a["opt_layers"]) == a["k"]
        assert a["opt_layers"] == sorted(order[: a["k"]])  # both stop on the one greedy path
        assert a["test_margin"] == pytest.approx(a["test"] - a["test_threshold"])
    if "k" in t["acceptance"]["bootstrap"] and "k" in t["acceptance"]["point"]:
        assert t["acceptance"]["bootstrap"]["k"] <= t["acceptance"]["point"]["k"]  # bootstrap is stricter

    report = (out / "placements.md").read_text()
    assert "## sentiment: test accuracy vs number of linear layers" in report
    assert "| linear layers k | greedy | uniform | random | local importance | distill loss |" in report
    assert "### sentiment: validation-to-test gap at 5% relative tolerance" in report
    assert "| strategy | largest k within 5% of the teacher (test) |" in report
    assert "- greedy best or tied-best at " in report
    assert report.count(result["commands"]["dtr"]) >= 3  # top block + beside each of the two tables


def test_students_are_reused_and_report_rerenders(tiny_run, tmp_path, capsys):
    from dtr_core.models import load_model

    out, _, _ = tiny_run
    model, tokenizer = load_model("tiny-llama")
    first = placements.ensure_students(model, tokenizer, "tiny-llama", "gated_deltanet", tmp_path, [1, 3], 512, 32, 2)
    again = placements.ensure_students(model, tokenizer, "tiny-llama", "gated_deltanet", tmp_path, [1, 3], 512, 32, 2)
    assert first["distilled"] == [1, 3] and first["reused"] == [] and first["teacher_ran"]
    assert again["distilled"] == [] and again["reused"] == [1, 3] and not again["teacher_ran"]
    assert again["dir"] == first["dir"] == str(tmp_path / "tiny-llama-gated_deltanet-t512-s32-n2" / "students")

    before = (out / "placements.md").read_text()
    assert placements.main(["--from-json", str(out / "placements.json")]) == 0
    assert (out / "placements.md").read_text() == before
    assert capsys.readouterr().out.startswith("# Placements")


@pytest.mark.parametrize(("argv", "message"), [(["--val-limit", "0"], "--val-limit must be >= 1, got 0"),
                                               (["--ks", "one"], "argument --ks: expected integers")])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        placements.main(argv + ["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")])
    assert exit_info.value.code == 2 and f"error: {message}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_rerun_reuses_finished_work_and_extends_k(tiny_run, tmp_path):
    out, work, first = tiny_run
    argv = TINY + ["--out", str(tmp_path), "--work-dir", str(work), "--ks", "1-4", "--students",
                   first["students"]["dir"]]
    assert placements.main(argv) == 0
    again = json.loads((tmp_path / "placements.json").read_text())
    t, t0 = again["tasks"]["sentiment"], first["tasks"]["sentiment"]
    assert t["cache"]["dir"] == t0["cache"]["dir"]
    assert t["cache"]["reused"]["validation"] == 2  # teacher validation + single-swap scores
    assert t["cache"]["reused"]["rounds"] == len(t0["greedy_trajectory"])
    assert t["cache"]["reused"]["test"] >= len({tuple(p["layers"]) for p in t0["points"]})
    assert t["greedy_trajectory"][: len(t0["greedy_trajectory"])] == t0["greedy_trajectory"]
    assert t["teacher"] == t0["teacher"] and t["single_swap"] == t0["single_swap"]
    assert t["ks"] == [1, 2, 3, 4] and again["students"]["source"] == "given"
