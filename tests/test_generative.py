"""Generative tasks: left-padded batched generation through the hybrid cache, text metrics, user files, CLI."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

from dtr_core.evaluation import GenerativeTask, TaskSpec, evaluate, get_task, with_options
from dtr_core.evaluation import text_metrics
from dtr_core.evaluation.generation import encode_prompts, generate_greedy, layer_map_of
from dtr_core.evaluation.tasks import Example
from dtr_core.hybrid.model import make_hybrid
from dtr_core.mixers import MixerConfig, build_student
from dtr_core.models import byte_tokenizer, random_model

PUBLISHED = MixerConfig(gate="swish_norm", qk_activation="silu", short_conv=True, value_kernel="channel")


def perturbed(student, seed: int):
    """Move the student's parameters off their initial values, so its gates depend on the data."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return student


def tiny_hybrid(mixers: dict[int, str], mixer_config: MixerConfig = MixerConfig()):
    teacher = random_model("tiny-llama")
    students = {layer: perturbed(build_student(name, teacher.config, layer, mixer_config,
                                               teacher.model.layers[layer].self_attn), layer)
                for layer, name in mixers.items()}
    return make_hybrid(teacher, students, mixer_config)


def _task(n: int = 12, **kwargs) -> GenerativeTask:
    examples = [Example(uid=f"q{i}", text=f"What is {i} plus {i}?" + " Think." * (i % 4),
                        references=(str(2 * i), f"{2 * i}.0")) for i in range(n)]
    return GenerativeTask(name="sums", load=lambda: examples, validation_size=4, test_size=4, **kwargs)


# ---- batched generation ----------------------------------------------------------------------------

@pytest.mark.parametrize("mixers,mixer_config", [
    ({1: "gla", 2: "gated_deltanet"}, MixerConfig()),
    ({0: "jetblock", 2: "gla", 3: "gated_deltanet"}, PUBLISHED),
    ({0: "gla", 1: "jetblock", 2: "gated_deltanet", 3: "gla"}, PUBLISHED),  # every layer linear
])
def test_batched_left_padded_generation_equals_one_row_at_a_time(mixers, mixer_config):
    model = tiny_hybrid(mixers, mixer_config)
    tokenizer = byte_tokenizer()
    task = _task(max_new_tokens=12, stop=("\n\n",))
    examples = task.split("train")[:5]
    (batch,) = encode_prompts(task, examples, tokenizer, batch_size=8)
    assert batch.attention_mask[:, 0].tolist().count(0) >= 3  # rows of different lengths: left padding
    together = generate_greedy(model, tokenizer, batch.input_ids, batch.attention_mask, 12, task.stop)
    for row in range(batch.num_examples):
        real = batch.attention_mask[row].bool()
        alone = generate_greedy(model, tokenizer, batch.input_ids[row:row + 1, real],
                                batch.attention_mask[row:row + 1, real], 12, task.stop)
        assert together[row] == alone[0]
    assert len(set(together)) > 1  # the answers depend on the prompt


def test_hugging_face_generate_on_a_left_padded_batch_equals_each_row_alone():
    model = tiny_hybrid({0: "jetblock", 2: "gla", 3: "gated_deltanet"}, PUBLISHED)
    tokenizer = byte_tokenizer()
    task = _task()
    (batch,) = encode_prompts(task, task.split("train"), tokenizer, batch_size=8)
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    together = model.generate(batch.input_ids, attention_mask=batch.attention_mask, **options)[:, -8:]
    for row in range(batch.num_examples):
        real = batch.attention_mask[row].bool()
        alone = model.generate(batch.input_ids[row:row + 1, real], **options)[:, -8:]
        assert together[row].tolist() == alone[0].tolist()


def test_generation_uses_the_hybrid_cache_and_equals_a_full_forward_argmax():
    model = tiny_hybrid({1: "gated_deltanet", 3: "jetblock"}, PUBLISHED)
    tokenizer = byte_tokenizer()
    assert layer_map_of(model) == ["full", "gated_deltanet", "full", "jetblock"]
    prompt = torch.tensor([[tokenizer.bos_token_id] + list(b"Hello there")])
    (answer,) = generate_greedy(model, tokenizer, prompt, torch.ones_like(prompt), 6)
    ids = prompt
    with torch.no_grad():  # no cache: one full forward per token
        for _ in range(6):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert answer == tokenizer.decode(ids[0, prompt.shape[1]:])


def test_full_attention_model_is_bit_identical_with_left_padding():
    teacher = random_model("tiny-llama")
    hybrid = make_hybrid(teacher, {})
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = teacher(ids, attention_mask=mask, position_ids=positions).logits
        actual = hybrid(ids, attention_mask=mask, position_ids=positions).logits
    assert torch.equal(actual, expected)


def test_stop_strings_and_max_new_tokens_end_generation():
    model = tiny_hybrid({2: "gla"})
    tokenizer = byte_tokenizer()
    prompt = torch.tensor([[tokenizer.bos_token_id] + list(b"abc")])
    mask = torch.ones_like(prompt)
    (free,) = generate_greedy(model, tokenizer, prompt, mask, 10)
    (short,) = generate_greedy(model, tokenizer, prompt, mask, 4)
    assert free.startswith(short) and len(short) < len(free)
    stop = free[3:5]
    (stopped,) = generate_greedy(model, tokenizer, prompt, mask, 10, stop=(stop,))
    assert stopped == free[:free.index(stop)]


# ---- metrics -----------------------------------------------------------------------------------------

def test_normalizer_and_exact_match_by_hand():
    assert text_metrics.normalize("  The Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert text_metrics.exact_match("the answer is: An apple.", "answer is apple") == 1.0
    assert text_metrics.exact_match("apples", "apple") == 0.0


def test_token_f1_by_hand():
    # predicted [big, red, dog], gold [red, dog, barked]: 2 common, P = 2/3, R = 2/3, F1 = 2/3
    assert text_metrics.token_f1("The big red dog", "red dog barked") == pytest.approx(2 / 3)
    # repeated words count once per occurrence: [a-less] "cat cat cat" vs "cat": P = 1/3, R = 1, F1 = 1/2
    assert text_metrics.token_f1("cat cat cat", "cat") == pytest.approx(0.5)
    assert text_metrics.token_f1("", "") == 1.0 and text_metrics.token_f1("x", "") == 0.0
    assert text_metrics.token_f1("dog", "cat") == 0.0


def test_rouge_l_by_hand():
    # [police, killed, gunman] vs [police, kill, gunman]: LCS = 2 (police, gunman), P = R = 2/3
    assert text_metrics.rouge_l("police killed the gunman", "the police kill the gunman") == pytest.approx(2 / 3)
    # LCS is order-aware where F1 is not: [c, b, a] vs [a, b, c]: LCS 1, F1 of bags 1
    assert text_metrics.rouge_l("c b x", "x b c") == pytest.approx(1 / 3)
    assert text_metrics.token_f1("c b x", "x b c") == 1.0
    assert text_metrics.longest_common_subsequence("abcbdab", "bdcaba") == 4


def test_regex_match_by_hand():
    pattern = re.compile(r"#### (-?[\d,.$]+)")
    assert text_metrics.regex_match("so 3 + 4 = 7\n#### 1,000", "#### 1000", pattern) == 1.0
    assert text_metrics.regex_match("#### $12.0", "12", pattern) == 1.0  # reference without the marker
    assert text_metrics.regex_match("#### 13", "12", pattern) == 0.0
    assert text_metrics.regex_match("the answer is 12", "12", pattern) == 0.0  # no match in the generation
    score = text_metrics.scorer("regex_match", r"answer is (\w+)")
    assert score("The answer is Paris.", "paris") == 1.0


def test_best_over_references_and_task_scores():
    task = _task()
    examples = task.split("validation")
    answers = [e.references[1] if i % 2 else "nope" for i, e in enumerate(examples)]
    assert task.example_scores(answers, examples) == [0.0, 1.0, 0.0, 1.0]


def test_metric_and_task_kind_checks():
    with pytest.raises(ValueError, match="metric 'accuracy' does not fit a generative task; choose one of: "
                                         "exact_match, f1, rouge_l, regex_match"):
        _task(metric="accuracy")
    with pytest.raises(ValueError, match="metric 'regex_match' needs an answer_regex"):
        _task(metric="regex_match")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        _task(metric="regex_match", answer_regex="(unclosed")
    with pytest.raises(ValueError, match="unknown classification metric 'rouge_l'; choose one of: accuracy"):
        with_options(get_task("sentiment"), metric="rouge_l")
    with pytest.raises(ValueError, match="generative task, which has no verbalisers"):
        with_options(_task(), verbaliser_scoring="per_token")
    assert with_options(_task(), metric="f1").metric == "f1"
    from dtr_core.evaluation.metrics import aggregate_score, check_bootstrap_metric, score_upper_bound

    check_bootstrap_metric("rouge_l")  # a mean of per-example scores: bootstrap acceptance applies
    assert aggregate_score("generative", [0.5, 1.0, 0.0], [1.0] * 3) == 0.5
    assert score_upper_bound("generative", [0.5, 0.0], [1.0, 1.0], 4) == (0.5 + 2) / 4  # unseen examples score 1


def test_few_shot_demonstrations_come_from_train_and_are_seeded():
    task = _task(n=20, num_shots=2, template="Q: {text}\nA:", stop=("\n",))
    train = {e.text for e in task.split("train")}
    assert len(task.demonstrations) == 2 and {e.text for e in task.demonstrations} <= train
    example = task.split("validation")[0]
    prompt = task.prompt(example)
    first = task.demonstrations[0]
    assert prompt.startswith(f"Q: {first.text}\nA: {first.references[0]}\n\n")
    assert prompt.endswith(f"Q: {example.text}\nA: ")
    assert _task(n=20, num_shots=2, template="Q: {text}\nA:").demonstrations == task.demonstrations
    other = _task(n=20, num_shots=2, template="Q: {text}\nA:", seed=5)
    assert other.demonstrations != task.demonstrations


# ---- user files and evaluation ----------------------------------------------------------------------

def _write(tmp_path, rows, name="qa.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows(n: int = 16):
    return [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "alt": f"{2 * i}.0" if i % 2 else ""}
            for i in range(n)]


def test_user_generative_task_from_file(tmp_path):
    path = _write(tmp_path, _rows())
    spec = TaskSpec(path=str(path), text_column="question", label_column=None, reference_columns=("answer", "alt"),
                    template="Q: {text}\nA:", validation_size=4, test_size=4, max_new_tokens=8, stop=["\n"],
                    metric="f1", num_shots=1)
    task = spec.build()
    assert isinstance(task, GenerativeTask) and task.metric == "f1" and task.stop == ("\n",)
    refs = {e.text: e.references for e in task.split("train") + task.split("validation") + task.split("test")}
    assert refs["What is 3 + 3?"] == ("6", "6.0") and refs["What is 2 + 2?"] == ("4",)  # empty cells dropped


def test_user_generative_task_errors(tmp_path):
    path = _write(tmp_path, _rows())
    with pytest.raises(ValueError, match=r"has no column 'answers'"):
        TaskSpec(path=str(path), text_column="question", label_column=None, reference_columns=("answers",),
                 validation_size=4, test_size=4).build()
    with pytest.raises(ValueError, match="field 'reference_columns' must be a list of column names"):
        TaskSpec(path=str(path), text_column="question", label_column=None, reference_columns=[])
    with pytest.raises(ValueError, match="metric 'macro_f1' does not fit a generative task"):
        TaskSpec(path=str(path), text_column="question", label_column=None, reference_columns=["answer"],
                 metric="macro_f1", validation_size=4, test_size=4).build()
    blank = _write(tmp_path, [{"question": "q", "answer": ""}] * 12, "blank.jsonl")
    with pytest.raises(ValueError, match="no usable rows"):
        TaskSpec(path=str(blank), text_column="question", label_column=None, reference_columns=["answer"],
                 validation_size=4, test_size=4).build()


def test_evaluate_generative_task_scores_the_generated_answers():
    model = tiny_hybrid({1: "gla", 3: "gated_deltanet"})
    tokenizer = byte_tokenizer()
    task = _task(max_new_tokens=6, stop=("\n",), metric="rouge_l")
    result = evaluate(model, tokenizer, task, split="train", batch_size=3)
    examples = task.split("train")
    assert result.n == len(examples) and result.metric == "rouge_l"
    assert list(result.per_example) == task.example_scores(result.predictions, examples)
    assert result.score == pytest.approx(sum(result.per_example) / result.n)
    assert set(result.metrics) == {"exact_match", "f1", "rouge_l"}
    one_by_one = [generate_greedy(model, tokenizer, b.input_ids, b.attention_mask, 6, ("\n",))[0]
                  for b in encode_prompts(task, examples, tokenizer, batch_size=1)]
    order = [b.example_index.item() for b in encode_prompts(task, examples, tokenizer, batch_size=1)]
    assert [result.predictions[i] for i in order] == one_by_one


# ---- the search ------------------------------------------------------------------------------------------

def _students(teacher, name: str = "gated_deltanet"):
    return {layer: perturbed(build_student(name, teacher.config, layer, MixerConfig(),
                                           teacher.model.layers[layer].self_attn), layer).eval()
            for layer in range(teacher.config.num_hidden_layers)}


def test_greedy_search_scores_generative_candidates_by_generation():
    from dtr_core.search.acceptance import Tolerance
    from dtr_core.search.generation_scorer import GenerationRoundScorer
    from dtr_core.search.greedy_search import PlainEvaluator, encode_split, run_greedy_search

    teacher, tokenizer = random_model("tiny-llama"), byte_tokenizer()
    task = _task(max_new_tokens=5, stop=("\n",), metric="f1")
    batches = encode_split(task, tokenizer, "validation", batch_size=3)
    students = _students(teacher)
    plain = PlainEvaluator(teacher, task, batches, students)
    scores = plain((), [0, 2])
    round_scorer = GenerationRoundScorer(teacher, batches, students, (), task)
    for layer in (0, 2):
        expected = evaluate(make_hybrid(teacher, {layer: students[layer]}), tokenizer, task, batch_size=3)
        assert scores[layer].per_example == expected.per_example
        assert round_scorer.score(layer).per_example == expected.per_example
    result, teacher_result, cost = run_greedy_search(teacher, task, batches, students, Tolerance("absolute", 0.0),
                                                     max_layers=2)
    assert teacher_result.metric == "f1" and teacher_result.n == 4
    assert len(result.opt_layers) == 2 and result.stop_reason == "cap" and cost.rejected_early == 0
    assert cost.candidate_evaluations == 4 + 3  # round 0: every layer; round 1: the three left


def test_regex_that_never_matches_the_teachers_answers_warns_with_examples():
    from dtr_core.evaluation.generation import regex_warning

    task = _task(metric="regex_match", answer_regex=r"#### (\d+)")
    warning = regex_warning(task, ["about 4", "it is 6", "no idea"])
    assert "matches none of the teacher's 3 answers" in warning and "'about 4'; 'it is 6'; 'no idea'" in warning
    assert regex_warning(task, ["about 4", "#### 6"]) is None
    assert regex_warning(_task(), ["anything"]) is None


# ---- the CLI -------------------------------------------------------------------------------------------

def _dtr(tmp_path, *args):
    from pipeline_support import cli_env

    return subprocess.run([sys.executable, "-m", "dtr.cli", *args], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=cli_env(DTR_CACHE_DIR=str(tmp_path / "cache")))


def _qa_file(tmp_path, n: int = 720):
    return _write(tmp_path, [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(n)])


def test_eval_command_on_a_generative_task_spec(tmp_path):
    _write(tmp_path, _rows())
    (tmp_path / "qa.json").write_text(json.dumps({
        "path": "qa.jsonl", "text_column": "question", "label_column": None, "reference_columns": ["answer", "alt"],
        "template": "Q: {text}\nA:", "validation_size": 4, "test_size": 4, "max_new_tokens": 5, "metric": "rouge_l"}))
    result = _dtr(tmp_path, "eval", "-m", "tiny-llama", "-t", "qa.json", "--json", "--per-example")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["task"] == "qa" and data["metric"] == "rouge_l" and data["n"] == 4
    assert len(data["predictions"]) == 4 and all(isinstance(p, str) for p in data["predictions"])
    assert set(data["metrics"]) == {"exact_match", "f1", "rouge_l"}
    assert data["score"] == sum(data["per_example"]) / 4


@pytest.mark.parametrize("args, message", [
    (["--metric", "exact_match"], "metric 'exact_match' scores generated answers, but the task has no reference "
                                  "column; pass --reference-column"),
    (["--reference-column", "answer", "--metric", "accuracy"], "metric 'accuracy' does not fit a generative task"),
    (["--reference-column", "answers"], "has no column 'answers'"),
    (["--reference-column", "answer", "--metric", "regex_match"], "metric 'regex_match' needs an answer_regex"),
], ids=["no-reference-column", "metric-kind", "missing-column", "regex-missing"])
def test_bad_generative_input_is_one_line_exit_2_before_any_work(tmp_path, args, message):
    _qa_file(tmp_path)
    result = _dtr(tmp_path, "convert", "-p", "smoke", "--data-file", "qa.jsonl", "--text-column", "question",
                  *args, "-o", str(tmp_path / "runs"))
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_smoke_conversion_searches_a_generative_task(tmp_path):
    """`dtr convert --profile smoke` end to end on a generative data file, scored by regex_match on generated
    answers; the teacher's answers never match the regex, so the run warns (with examples) before the search."""
    _qa_file(tmp_path)
    result = _dtr(tmp_path, "convert", "-p", "smoke", "--data-file", "qa.jsonl", "--text-column", "question",
                  "--reference-column", "answer", "--template", "Q: {text}\nA:", "--max-new-tokens", "4",
                  "--metric", "regex_match", "--answer-regex", r"#### (\d+)", "--val-limit", "4", "--test-limit", "4",
                  "-o", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    warning = output.index("matches none of the teacher's 4 answers")
    assert warning < output.index("greedy round 0")  # before the search's first round
    (run,) = (tmp_path / "runs").iterdir()
    teacher = json.loads((run / "reports" / "eval_teacher.json").read_text())["results"]["validation"]
    assert teacher["metric"] == "regex_match" and len(teacher["predictions"]) == 4
    assert teacher["label_logprobs"] == [[], [], [], []]  # scored by generation, not likelihood
    rounds = json.loads((run / "greedy" / "trajectory.json").read_text())["rounds"]
    assert rounds and all(c["score"] is not None and not c["rejected_early"] for c in rounds[0]["candidates"])


def test_generation_round_scorer_rejects_early_only_with_an_exact_bound():
    """References made from one candidate's own answers: it scores 1, the others fall behind and are dropped
    as soon as their bound (every unseen example right) is below it; with f1 every candidate is scored fully."""
    from dtr_core.search.generation_scorer import GenerationRoundScorer
    from dtr_core.search.greedy_search import encode_split

    teacher, tokenizer = random_model("tiny-llama"), byte_tokenizer()
    students = _students(teacher)
    probe = _task(n=20, max_new_tokens=3, stop=("\n",))
    winner = evaluate(make_hybrid(teacher, {1: students[1]}), tokenizer, probe, split="train")
    answers = dict(zip((e.uid for e in probe.split("train")), winner.predictions))
    examples = [Example(uid=e.uid, text=e.text, references=(answers[e.uid],), split="validation")
                for e in probe.split("train")]
    task = GenerativeTask(name="own-answers", load=lambda: examples, max_new_tokens=3, stop=("\n",))
    batches = encode_split(task, tokenizer, "validation", batch_size=2)
    full = {layer: evaluate(make_hybrid(teacher, {layer: students[layer]}), tokenizer, task, batch_size=2)
            for layer in (0, 1, 2, 3)}
    assert full[1].score == 1.0 and all(full[layer].score < 1.0 for layer in (0, 2, 3))
    scorer = GenerationRoundScorer(teacher, batches, students, (), task)
    results = {layer: scorer.score(layer) for layer in (1, 0, 2, 3)}  # the winner first
    assert results[1].score == 1.0 and results[1].per_example == full[1].per_example
    rejected = [layer for layer in (0, 2, 3) if results[layer].rejected_early]
    assert rejected and scorer.cost.rejected_early == len(rejected)
    for layer in rejected:
        assert full[layer].score <= results[layer].upper_bound < 1.0 and results[layer].evaluated_fraction < 1.0
    f1_scorer = GenerationRoundScorer(teacher, batches, students, (), dataclasses.replace(task, metric="f1"))
    assert not any(f1_scorer.score(layer).rejected_early for layer in (1, 0, 2, 3))
