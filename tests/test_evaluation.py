"""Task evaluation: splits, label-likelihood scoring against a slow reference, perplexity, errors, CLI."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from dtr_core.evaluation import (
    TASKS, ClassificationTask, EvalResult, Example, LanguageModelingTask, TaskSpec, accuracy, aggregate_score,
    encode, evaluate, get_task, macro_f1, model_logits, score_logits, score_upper_bound, stratified_split,
)

WORDS = ["the film", "a slow, tired plot", "wonderful acting and a sharp script", "dull", "I loved it",
         "an utterly forgettable two hours of nothing", "bright", "never again", "fine", "a small gem of a movie"]


_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and do not fight parallel test runs for the cores)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(_THREADS)


def _examples(n: int, labels: tuple[str, ...]) -> list[Example]:
    return [Example(uid=f"x{i}", text=f"{WORDS[i % len(WORDS)]} #{i}", label=labels[(i * 7) % len(labels)])
            for i in range(n)]


def _task(verbalisers: dict[str, str], n: int = 30, **kwargs) -> ClassificationTask:
    examples = _examples(n, tuple(verbalisers))
    return ClassificationTask(name="toy", load=lambda: examples, validation_size=10, test_size=10,
                              template="Review: {text}\nVerdict:", verbalisers=verbalisers, **kwargs)


# ---- splits ------------------------------------------------------------------------------------

def test_split_is_deterministic_disjoint_and_stratified():
    labels = ("a", "b", "c")
    examples = [Example(uid=f"u{i}", text=str(i), label=labels[0 if i % 10 < 6 else 1 if i % 10 < 9 else 2])
                for i in range(1000)]  # 60% / 30% / 10%
    first = stratified_split(examples, validation_size=100, test_size=200, seed=0)
    again = stratified_split(list(reversed(examples)), validation_size=100, test_size=200, seed=0)
    assert first == again  # independent of input order
    other = stratified_split(examples, validation_size=100, test_size=200, seed=1)
    assert other["test"] != first["test"]
    uids = {name: {e.uid for e in split} for name, split in first.items()}
    assert len(uids["validation"]) == 100 and len(uids["test"]) == 200 and len(uids["train"]) == 700
    assert not (uids["train"] & uids["validation"] or uids["train"] & uids["test"] or uids["validation"] & uids["test"])
    for split, size in (("validation", 100), ("test", 200)):
        counts = Counter(e.label for e in first[split])
        for label, share in zip(labels, (0.6, 0.3, 0.1)):
            assert abs(counts[label] - share * size) <= 1
    prefix = Counter(e.label for e in first["validation"][:20])  # prefixes are stratified too
    assert abs(prefix["a"] - 12) <= 1 and abs(prefix["b"] - 6) <= 1


def test_split_too_small_and_empty_splits_raise():
    examples = _examples(10, ("p", "n"))
    with pytest.raises(ValueError, match=r"fewer than validation_size \(5\) \+ test_size \(5\) \+ 1 for training = 11"):
        stratified_split(examples, validation_size=5, test_size=5, seed=0)
    task = ClassificationTask(name="t", load=lambda: examples, validation_size=0, test_size=3,
                              verbalisers={"p": " p", "n": " n"})
    with pytest.raises(ValueError, match="split 'validation' of task 't' is empty"):
        task.split("validation")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        task.split("dev")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_builtin_tasks_split_disjoint_and_stable(name):
    task = get_task(name)
    splits = {s: task.split(s) for s in ("train", "validation", "test")}
    uids = {s: {e.uid for e in examples} for s, examples in splits.items()}
    texts = {s: {e.text for e in examples} for s, examples in splits.items()}
    assert sum(map(len, uids.values())) == len(set().union(*uids.values()))
    assert not (texts["test"] & (texts["train"] | texts["validation"]))  # de-duplicated data
    assert len(splits["validation"]) == task.validation_size and len(splits["test"]) == task.test_size
    rebuilt = TASKS[name]()  # a fresh object splits identically
    assert [e.uid for e in rebuilt.split("test")] == [e.uid for e in splits["test"]]
    if isinstance(task, ClassificationTask):
        assert set(e.label for e in splits["validation"]) == set(task.labels)


def test_builtin_data_and_few_shot_demonstrations_come_from_train():
    assert len(get_task("sentiment").split("train")) + 700 == 10566
    trec = dataclasses.replace(get_task("trec"), num_shots=8)
    shots = trec.demonstrations
    assert [e.label for e in shots] == list(trec.labels) + list(trec.labels[:2])
    train = {e.uid for e in trec.split("train")}
    assert all(e.uid in train for e in shots)
    prompt = trec.prompt(trec.split("test")[0])
    assert prompt.endswith("\nAnswer type:") and prompt.count("Question:") == 9
    assert prompt.startswith(trec.instruction + "\n\nQuestion: " + shots[0].text + "\nAnswer type: abbreviation\n\n")
    assert get_task("trec").demonstrations == ()
    assert get_task("sentiment").prompt(Example("u", "Great.", "positive")) == \
        "Movie review: Great.\nSentiment (positive or negative):"
    held_out_lm = {e.uid for s in ("validation", "test") for e in get_task("bbc-lm").split(s)}
    held_out_topic = {e.uid for s in ("validation", "test") for e in get_task("bbc-topic").split(s)}
    assert held_out_lm <= held_out_topic  # nested held-out blocks (splits.py)


def test_get_task_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown task 'nope'; choose one of: bbc-lm, bbc-topic, sentiment, trec"):
        get_task("nope")
    assert get_task("sentiment") is get_task("sentiment")


# ---- scoring against the slow reference ----------------------------------------------------------

def _reference_label_logprobs(model, tokenizer, task, examples) -> list[list[float]]:
    """Plain loop: one unpadded forward per (example, label), summed continuation log-probabilities."""
    out = []
    for example in examples:
        prompt = [tokenizer.bos_token_id] + tokenizer(task.prompt(example), add_special_tokens=False)["input_ids"]
        row = []
        for _, continuation in task.verbalisers:
            cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + cont])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            row.append(sum(logprobs[len(prompt) - 1 + j, token].item() for j, token in enumerate(cont)))
        out.append(row)
    return out


MULTI_TOKEN = {"pos": " positive", "neg": " negative", "mixed": " mixed"}  # 9, 9, 6 tokens (byte tokenizer)


def _divisors(verbalisers: dict[str, str], scoring: str) -> torch.Tensor:
    """What the plain reference divides each label's summed log-likelihood by (byte tokenizer: 1 token = 1 byte)."""
    if scoring == "sum":
        return torch.ones(len(verbalisers), dtype=torch.float64)
    return torch.tensor([float(len(c.encode("utf-8"))) for c in verbalisers.values()], dtype=torch.float64)


@pytest.mark.parametrize("verbalisers, scoring, resolved", [
    (MULTI_TOKEN, "sum", "sum"),
    (MULTI_TOKEN, None, "per_token"),  # lengths differ: the default normalises per token
    (MULTI_TOKEN, "per_token", "per_token"),
    (MULTI_TOKEN, "per_byte", "per_byte"),
    ({"pos": "A", "neg": "B", "mixed": "C"}, None, "sum"),  # single-token: one row per example
], ids=["multi_token-sum", "multi_token-default", "multi_token-per_token", "multi_token-per_byte", "single_token"])
def test_label_likelihood_matches_reference(tiny_llama, verbalisers, scoring, resolved):
    model, tokenizer = tiny_llama
    task = _task(verbalisers, verbaliser_scoring=scoring)
    examples = task.split("train")[:9]
    expected = torch.tensor(_reference_label_logprobs(model, tokenizer, task, examples), dtype=torch.float64)
    expected_predictions = (expected / _divisors(verbalisers, resolved)).argmax(dim=1)
    batches = encode(task, examples, tokenizer, batch_size=4)  # several right-padded batches
    assert any((b.attention_mask == 0).any() for b in batches)
    assert batches[0].input_ids.shape[0] == (3 if len(verbalisers["pos"]) > 1 else 4)
    assert {b.verbaliser_scoring for b in batches} == {resolved}
    with torch.inference_mode():
        for batch in batches:
            for logits in (model_logits(model, batch),  # (R, P, V) via logits_to_keep
                           model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits):  # (R, T, V)
                scores = score_logits(batch, logits)
                torch.testing.assert_close(scores.label_logprobs, expected[batch.example_index], atol=1e-4, rtol=0)
                assert torch.equal(scores.predictions, expected_predictions[batch.example_index])

    result = evaluate(model, tokenizer, task, split="train", limit=9, batch_size=4)
    assert result.verbaliser_scoring == resolved
    torch.testing.assert_close(torch.tensor(result.label_logprobs, dtype=torch.float64), expected, atol=1e-4, rtol=0)
    gold = [e.label for e in examples]
    predicted = [task.labels[i] for i in expected_predictions.tolist()]
    assert list(result.predictions) == predicted
    assert list(result.per_example) == [float(g == p) for g, p in zip(gold, predicted)]
    assert result.score == pytest.approx(accuracy(gold, predicted))
    assert result.metrics["macro_f1"] == pytest.approx(macro_f1(gold, predicted))
    assert result.n == 9 and result.metric == "accuracy" and result.higher_is_better


def test_single_token_path_equals_multi_token_path(tiny_llama):
    model, tokenizer = tiny_llama
    task = _task({"pos": "A", "neg": "B"})
    examples = task.split("validation")
    results = {}
    with torch.inference_mode():
        for mode in ("single", "multi"):
            batches = encode(task, examples, tokenizer, batch_size=6, mode=mode)
            scores = [score_logits(b, model_logits(model, b)) for b in batches]
            order = torch.argsort(torch.cat([s.example_index for s in scores]))
            results[mode] = torch.cat([s.label_logprobs for s in scores])[order]
    torch.testing.assert_close(results["single"], results["multi"], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="mode 'single' needs one distinct token"):
        encode(_task({"pos": " yes", "neg": " no"}), examples, tokenizer, mode="single")


def test_perplexity_equals_exp_mean_nll_by_hand(tiny_llama):
    model, tokenizer = tiny_llama
    docs = [Example(uid=f"d{i}", text=("Some text about markets. " * (i + 1))[: 15 + 9 * i]) for i in range(12)]
    task = LanguageModelingTask(name="toy-lm", load=lambda: docs, validation_size=5, test_size=3, max_tokens=40)
    examples = task.split("validation")
    total_nll, total_tokens, per_doc = 0.0, 0, []
    for example in examples:
        ids = ([tokenizer.bos_token_id] + tokenizer(example.text, add_special_tokens=False)["input_ids"])[:40]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        nll = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        per_doc.append(nll)
        total_nll += nll
        total_tokens += len(ids) - 1
    result = evaluate(model, tokenizer, task, split="validation", batch_size=2)
    assert result.metrics["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens), rel=1e-5)
    assert result.score == pytest.approx(1.0 / result.metrics["perplexity"])
    assert result.per_example == pytest.approx(per_doc, rel=1e-5)
    assert sum(result.weights) == total_tokens and max(result.weights) == 39  # truncated to 40 with BOS
    assert task.aggregate(result.per_example, result.weights) == pytest.approx(result.score)


def test_evaluate_restores_training_flag_and_checks_limit(tiny_llama):
    model, tokenizer = tiny_llama
    task = _task({"pos": "A", "neg": "B"})
    model.train()
    result = evaluate(model, tokenizer, task, limit=3)
    assert model.training and result.n == 3
    assert isinstance(result, EvalResult) and "per_example" not in result.to_dict()
    with pytest.raises(ValueError, match="limit must be >= 1"):
        evaluate(model, tokenizer, task, limit=0)


# ---- metrics -------------------------------------------------------------------------------------

def test_metrics_by_hand_and_bounds():
    gold = ["a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "a"]
    # F1: a = 2*1/(2+1+1) = 0.5, b = 2*2/(4+1+0) = 0.8, c = 0
    assert macro_f1(gold, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert accuracy(gold, pred) == pytest.approx(0.6)
    values, weights = [1, 0, 1, 1, 0], [1] * 5
    for k in range(6):
        bound = score_upper_bound("classification", values[:k], weights[:k], total_weight=5)
        assert bound >= aggregate_score("classification", values, weights) - 1e-12
    assert score_upper_bound("classification", values, weights, 5) == pytest.approx(0.6)
    nll, tokens = [10.0, 4.0, 7.5], [5, 3, 4]
    final = aggregate_score("language_modeling", nll, tokens)
    assert final == pytest.approx(math.exp(-21.5 / 12))
    for k in range(4):
        assert score_upper_bound("language_modeling", nll[:k], tokens[:k], total_weight=12) >= final - 1e-12
    with pytest.raises(ValueError, match="unknown task kind"):
        aggregate_score("regression", [1.0], [1.0])


# ---- user tasks ---------------------------------------------------------------------------------

def _write_rows(tmp_path, suffix, rows):
    import pandas as pd

    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame(rows)
    {".csv": lambda: frame.to_csv(path, index=False), ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_user_task_from_file(tmp_path, suffix):
    rows = [{"review": f"review number {i}", "stars": 1 if i % 3 else 5} for i in range(40)]
    path = _write_rows(tmp_path, suffix, rows)
    spec = TaskSpec(path=str(path), text_column="review", label_column="stars", template="R: {text}\nGood?",
                    verbalisers={"1": " no", "5": " yes"}, validation_size=8, test_size=10)
    task = get_task(spec)
    assert task.name == "data" and task.labels == ("1", "5")
    assert len(task.split("validation")) == 8 and len(task.split("train")) == 22
    lm = TaskSpec(path=str(path), text_column="review", label_column=None, validation_size=4, test_size=4).build()
    assert isinstance(lm, LanguageModelingTask) and len(lm.split("test")) == 4


def test_user_task_errors(tmp_path):
    path = _write_rows(tmp_path, ".csv", [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(30)])
    with pytest.raises(ValueError, match=r"has no column 'txt' \(columns: text, label\)"):
        TaskSpec(path=str(path), text_column="txt", verbalisers={"a": " a", "b": " b"}).build()
    with pytest.raises(ValueError, match=r"labels \['b'\] have no verbaliser"):
        TaskSpec(path=str(path), verbalisers={"a": " a", "c": " c"}, validation_size=5, test_size=5).build()
    with pytest.raises(ValueError, match="has 30 usable rows, fewer than validation_size"):
        TaskSpec(path=str(path), verbalisers={"a": " a", "b": " b"}).build()
    with pytest.raises(ValueError, match=r"field 'verbalisers' must be an object label -> continuation"):
        TaskSpec(path=str(path), verbalisers=[" a", " b"])
    with pytest.raises(ValueError, match=r"field 'validation_size' must be an integer, got '5' \(str\)"):
        TaskSpec(path=str(path), verbalisers={"a": " a", "b": " b"}, validation_size="5")
    one_class = _write_rows(tmp_path, ".jsonl", [{"text": f"t{i}", "label": "a"} for i in range(30)])
    with pytest.raises(ValueError, match=r"single label \('a'\)"):
        TaskSpec(path=str(one_class), verbalisers={"a": " a", "b": " b"}, validation_size=5, test_size=5).build()
    with pytest.raises(ValueError, match="needs verbalisers"):
        TaskSpec(path=str(path))
    with pytest.raises(ValueError, match="template must contain"):
        TaskSpec(path=str(path), template="no slot", verbalisers={"a": " a", "b": " b"}, validation_size=5, test_size=5).build()
    with pytest.raises(FileNotFoundError):
        TaskSpec(path=str(tmp_path / "missing.csv"), verbalisers={"a": " a", "b": " b"}).build()
    bad = tmp_path / "data.xlsx"
    bad.write_text("x")
    with pytest.raises(ValueError, match="format '.xlsx' is not one of"):
        TaskSpec(path=str(bad), verbalisers={"a": " a", "b": " b"}).build()


def test_user_task_split_column_and_spec_file(tmp_path):
    rows = [{"text": f"t{i}", "label": "a" if i % 2 else "b", "part": ["train", "validation", "test"][i % 3]}
            for i in range(30)]
    _write_rows(tmp_path, ".jsonl", rows)
    spec_file = tmp_path / "task.json"
    spec_file.write_text(json.dumps({"path": "data.jsonl", "split_column": "part", "name": "mine",
                                     "verbalisers": {"a": " a", "b": " b"}}))
    task = get_task(str(spec_file))
    assert task.name == "mine" and {e.text for e in task.split("test")} == {f"t{i}" for i in range(2, 30, 3)}
    spec_file.write_text(json.dumps({"path": "data.jsonl", "colour": "red"}))
    with pytest.raises(ValueError, match="unknown: colour"):
        get_task(str(spec_file))


# ---- CLI ------------------------------------------------------------------------------------------

def test_eval_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    from dtr.commands import evaluate as evaluate_command

    app = typer.Typer()
    evaluate_command.register(app)
    app.command("noop")(lambda: None)  # a second command keeps `eval` a sub-command
    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--model", "tiny-llama", "--task", "sentiment", "--limit", "4", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output.strip().splitlines()[-1])
    assert data["task"] == "sentiment" and data["n"] == 4 and 0.0 <= data["score"] <= 1.0
    assert data["metric"] == "accuracy" and data["score"] == data["metrics"]["accuracy"]
    result = runner.invoke(app, ["eval", "--model", "tiny-llama", "--task", "sentiment", "--limit", "4",
                                 "--metric", "recall:negative", "--verbaliser-scoring", "per_byte"])
    assert result.exit_code == 0, result.output
    assert "sentiment/validation (n=4" in result.output and "recall:negative " in result.output
    assert "verbalisers compared per_byte" in result.output
    result = runner.invoke(app, ["eval", "--model", "tiny-llama", "--task", "nope"])
    assert isinstance(result.exception, ValueError) and "choose one of" in str(result.exception)


# ---- the real model (slow) ---------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_sentiment_validation_accuracy():
    """SmolLM2-135M zero-shot on movie-review sentiment: ~0.755 reference (ASSETS.md); 0.80 seen here."""
    from dtr_core.models import load_model

    torch.set_num_threads(_THREADS)
    model, tokenizer = load_model("smollm2-135m")
    result = evaluate(model, tokenizer, "sentiment", split="validation", limit=200, batch_size=16)
    assert result.n == 200
    assert 0.65 <= result.score <= 0.85
