"""The task's train split as language-modelling text for healing (`HealConfig.task_lm_weight` > 0).

Each train example becomes one document: a classification example its prompt and its label's answer
(`template.format(text=...)` + the verbaliser, what the task scores), a generative example its prompt and its
first reference answer (`template.format(text=...)` + `answer_prefix` + the answer), a perplexity task's
example its text.
`TaskTextCorpus` streams them as packed token rows exactly as `dtr_core.distill.corpus.Corpus` does a file
(each document after the tokenizer's BOS, else EOS; epoch after epoch), and its `identity` hashes the texts,
so the heal's reuse key changes with the data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dtr_core.artifacts import hash_json
from dtr_core.distill.corpus import Corpus, tokenizer_fingerprint
from dtr_core.evaluation.tasks import ClassificationTask, GenerativeTask, Task


def task_lm_texts(task: Task) -> list[str]:
    """The train split's prompts with their answers (classification, generative) or texts (perplexity)."""
    examples = task.split("train")
    if isinstance(task, ClassificationTask):
        verbaliser = task.verbaliser
        return [task.template.format(text=example.text) + verbaliser[example.label] for example in examples]
    if isinstance(task, GenerativeTask):
        return [task.template.format(text=example.text) + task.answer_prefix + example.references[0]
                for example in examples if example.references]
    return [example.text for example in examples if example.text.strip()]


class TaskTextCorpus(Corpus):
    """In-memory documents as a `Corpus` (`rows(position)`: the same packed, endless, resumable stream)."""

    repeat_log_level = logging.DEBUG  # the task's train text repeats by design: healing outlasts it

    def __init__(self, texts: Sequence[str], tokenizer, name: str = "task"):
        texts = [text for text in texts if text and text.strip()]
        if not texts:
            raise ValueError(f"task {name!r} has no train text for healing; give it train examples or set "
                             "task_lm_weight 0")
        self.source, self.tokenizer, self.text_column, self.texts = f"task:{name}", tokenizer, "text", texts
        self.identity = {"task_texts": hash_json(texts), "tokenizer": tokenizer_fingerprint(tokenizer)}

    def _texts(self) -> Sequence[str]:
        return self.texts
