"""Tasks: what the DtR search measures a hybrid on.

Two kinds, both frozen dataclasses whose data is read lazily on first use:
- `ClassificationTask`: a prompt template and one verbaliser (continuation string) per label; a decoder
  LM predicts the label whose continuation it finds most likely (see `scoring.py`; `verbaliser_scoring`:
  summed, per-token or per-byte log-likelihood). Score = the task's `metric`: accuracy (default), macro_f1,
  balanced_accuracy or recall:<class> (`metrics.py`).
- `GenerativeTask`: the model answers a prompt by greedy generation (`generation.py`: batched, left-padded,
  with the hybrid cache); score = the mean over examples of the best `metric` against the example's reference
  answers: exact_match, f1, rouge_l or regex_match (`text_metrics.py`), each in [0, 1].
- `LanguageModelingTask`: perplexity of held-out documents. Score = 1 / perplexity
  = exp(-mean token NLL), the geometric-mean probability of the next token. Why not -perplexity: the
  search's threshold `P_min = 0.95 * P_base` is relative and needs a positive higher-is-better score;
  with 1/perplexity "5% worse" means perplexity up by 5.3%. The score is also an exact monotone function
  of the summed NLL, which early rejection needs (`metrics.score_upper_bound`).

Every task splits deterministically into train / validation / test (`splits.py`); the search uses
`validation`, `test` is for the final report only, and few-shot demonstrations come from `train`.
The registry of built-in and user tasks lives in `registry.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from dtr_core.evaluation import metrics
from dtr_core.evaluation.splits import SPLIT_NAMES, assigned_split, stratified_split, stratified_order

KINDS = ("classification", "language_modeling", "generative")
# How verbaliser continuations are compared (`scoring.py`): summed log-likelihood, or divided by the
# continuation's number of tokens (lm-eval's acc_norm) or of UTF-8 bytes. None: `sum` when every verbaliser
# tokenises to the same number of tokens, else `per_token` (logged once).
VERBALISER_SCORINGS = ("sum", "per_token", "per_byte")


@dataclass(frozen=True)
class Example:
    """One labelled text. `uid` is stable across runs (splits are keyed on it); `label` is the class name
    (for language modelling, an optional stratum such as the article's topic); `split` is set only when
    the data fixes its own split."""

    uid: str
    text: str
    label: str | None = None
    split: str | None = None
    references: tuple[str, ...] = ()  # generative tasks: the accepted answers


@dataclass(frozen=True)
class Task:
    """Common part of every task: a name, a loader and how to split it.

    `load` returns every example; it is called once, on the first `split()`.
    """

    name: str
    load: Callable[[], Sequence[Example]] = field(repr=False, compare=False)
    validation_size: int = 200  # ~16 s per full SmolLM2-135M pass on 2 CPU cores (STACK_NOTES.md)
    test_size: int = 500  # +-2 points standard error at 75% accuracy
    seed: int = 0
    description: str = ""

    kind: ClassVar[str]
    metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True  # of `score`; true for every task

    @functools.cached_property
    def _splits(self) -> dict[str, tuple[Example, ...]]:
        examples = list(self.load())
        if not examples:
            raise ValueError(f"task '{self.name}' has no examples; check its data file")
        self._check_examples(examples)
        if any(example.split is not None for example in examples):
            return assigned_split(examples, self.name)
        return stratified_split(examples, self.validation_size, self.test_size, self.seed, self.name)

    def _check_examples(self, examples: Sequence[Example]) -> None:
        """Subclasses raise `ValueError` on examples they cannot score."""

    def split(self, name: str) -> list[Example]:
        """The examples of split `name` (`train`, `validation` or `test`), in a fixed stratified order."""
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split '{name}'; choose one of: {', '.join(SPLIT_NAMES)}")
        examples = self._splits[name]
        if not examples:
            raise ValueError(f"split '{name}' of task '{self.name}' is empty; give it examples "
                             f"(validation_size / test_size, or rows with that split value)")
        return list(examples)

    def aggregate(self, per_example: Sequence[float], weights: Sequence[float]) -> float:
        """Accuracy or 1 / perplexity from per-example values (see `EvalResult.per_example`); the task score
        when `metric` is accuracy or perplexity (bootstrap acceptance needs this, `metrics.BOOTSTRAP_METRICS`)."""
        return metrics.aggregate_score(self.kind, per_example, weights)


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Classification by label likelihood.

    `template` holds `{text}`; `verbalisers` maps label -> continuation (its order is the label order),
    e.g. `{"positive": " positive", "negative": " negative"}`. `metric`: the search metric
    (`metrics.CLASSIFICATION_METRICS`); `verbaliser_scoring`: one of `VERBALISER_SCORINGS`, or None (see
    there). The prompt is
    `instruction + demonstrations + template.format(text=...)`, where each of the `num_shots`
    demonstrations (drawn from `train`, one label after another) is `template.format(text) + verbaliser`
    followed by `shot_separator`.
    """

    template: str = "{text}\nAnswer:"
    verbalisers: tuple[tuple[str, str], ...] = ()
    num_shots: int = 0
    instruction: str = ""
    shot_separator: str = "\n\n"
    add_bos: bool = True  # prepend the tokenizer's BOS token (when it has one) to every prompt
    metric: str = metrics.DEFAULT_METRICS["classification"]
    verbaliser_scoring: str | None = None

    kind: ClassVar[str] = "classification"

    def __post_init__(self) -> None:
        if isinstance(self.verbalisers, Mapping):
            object.__setattr__(self, "verbalisers", tuple(self.verbalisers.items()))
        if len(self.verbalisers) < 2:
            raise ValueError(f"task '{self.name}' needs at least two verbalisers (label -> continuation)")
        continuations = [continuation for _, continuation in self.verbalisers]
        if any(not c for c in continuations) or len(set(continuations)) != len(continuations):
            raise ValueError(f"task '{self.name}': verbalisers must be non-empty and distinct, got {continuations}")
        if "{text}" not in self.template:
            raise ValueError(f"task '{self.name}': template must contain {{text}}, got {self.template!r}")
        try:
            self.template.format(text="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"task '{self.name}': template {self.template!r} is not a format string with only "
                             f"{{text}} ({error}); double literal braces as {{{{ }}}}") from None
        if self.num_shots < 0:
            raise ValueError(f"task '{self.name}': num_shots must be >= 0, got {self.num_shots}")
        try:
            metrics.parse_metric(self.metric, self.kind, self.labels)
        except ValueError as error:
            raise ValueError(f"task '{self.name}': {error}") from None
        if self.verbaliser_scoring is not None and self.verbaliser_scoring not in VERBALISER_SCORINGS:
            raise ValueError(f"task '{self.name}': unknown verbaliser scoring '{self.verbaliser_scoring}'; choose "
                             f"one of: {', '.join(VERBALISER_SCORINGS)}")

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(label for label, _ in self.verbalisers)

    @property
    def verbaliser(self) -> dict[str, str]:
        return dict(self.verbalisers)

    def _check_examples(self, examples: Sequence[Example]) -> None:
        missing = sorted({str(e.label) for e in examples} - set(self.labels))
        if missing:
            raise ValueError(f"task '{self.name}': labels {missing} have no verbaliser; add them to verbalisers "
                             f"(known: {list(self.labels)})")

    def check_metric_defined(self, examples: Sequence[Example], where: str) -> None:
        """One-line ValueError when `metric` is undefined on `examples` (recall of a class they do not hold)."""
        target = metrics.metric_class(self.metric)
        if target is not None:
            if not any(example.label == target for example in examples):
                raise ValueError(f"task '{self.name}': metric '{self.metric}' is undefined on {where}, which holds "
                                 f"no example of class '{target}'; score more examples or choose another metric")

    @functools.cached_property
    def demonstrations(self) -> tuple[Example, ...]:
        """`num_shots` examples from the train split, cycling through the labels in verbaliser order."""
        if self.num_shots == 0:
            return ()
        pool = stratified_order(self.split("train"), self.seed + 1)
        by_label = {label: [e for e in pool if e.label == label] for label in self.labels}
        shots: list[Example] = []
        depth = 0
        while len(shots) < self.num_shots and depth < len(pool):
            for label in self.labels:
                if depth < len(by_label[label]) and len(shots) < self.num_shots:
                    shots.append(by_label[label][depth])
            depth += 1
        return tuple(shots)

    @functools.cached_property
    def _prefix(self) -> str:
        parts = [self.instruction] if self.instruction else []
        verbaliser = self.verbaliser
        parts += [self.template.format(text=e.text) + verbaliser[e.label] for e in self.demonstrations]
        return "".join(part + self.shot_separator for part in parts)

    def prompt(self, example: Example) -> str:
        """The text the model reads before the label continuation."""
        return self._prefix + self.template.format(text=example.text)


@dataclass(frozen=True)
class LanguageModelingTask(Task):
    """Perplexity of documents, each cut to `max_tokens` tokens (BOS included) and scored on all tokens
    after the BOS. Perplexity = exp(total NLL / total scored tokens) over the split."""

    max_tokens: int = 512
    add_bos: bool = True

    kind: ClassVar[str] = "language_modeling"
    metric: ClassVar[str] = "perplexity"

    def __post_init__(self) -> None:
        if self.max_tokens < 2:
            raise ValueError(f"task '{self.name}': max_tokens must be >= 2, got {self.max_tokens}")


@dataclass(frozen=True)
class GenerativeTask(Task):
    """Answers generated greedily and compared with each example's `references` (`Example.references`).

    The prompt is `instruction + demonstrations + template.format(text=...)`, each of the `num_shots`
    demonstrations (drawn from `train` with the task's seed) being `template.format(text) + answer_prefix +
    its first reference` followed by `shot_separator`. Generation stops after `max_new_tokens` tokens, at
    the tokenizer's EOS, or at the first of the `stop` strings (cut from the answer). `metric`: one of
    `text_metrics.GENERATIVE_METRICS`; `regex_match` needs `answer_regex` (its first group is the answer).
    """

    template: str = "{text}"
    num_shots: int = 0
    instruction: str = ""
    shot_separator: str = "\n\n"
    answer_prefix: str = " "
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    answer_regex: str | None = None
    add_bos: bool = True
    metric: str = "exact_match"

    kind: ClassVar[str] = "generative"

    def __post_init__(self) -> None:
        from dtr_core.evaluation import text_metrics

        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if "{text}" not in self.template:
            raise ValueError(f"task '{self.name}': template must contain {{text}}, got {self.template!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"task '{self.name}': max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_shots < 0:
            raise ValueError(f"task '{self.name}': num_shots must be >= 0, got {self.num_shots}")
        if any(not s for s in self.stop):
            raise ValueError(f"task '{self.name}': stop strings must be non-empty, got {list(self.stop)}")
        try:
            metrics.parse_metric(self.metric, self.kind)
            text_metrics.scorer(self.metric, self.answer_regex)
        except ValueError as error:
            raise ValueError(f"task '{self.name}': {error}") from None

    def _check_examples(self, examples: Sequence[Example]) -> None:
        empty = [e.uid for e in examples if not e.references]
        if empty:
            raise ValueError(f"task '{self.name}': examples {empty[:3]} have no reference answer; give every row "
                             "at least one non-empty reference")

    @functools.cached_property
    def demonstrations(self) -> tuple[Example, ...]:
        """`num_shots` examples of the train split, in a seeded order."""
        if self.num_shots == 0:
            return ()
        return tuple(stratified_order(self.split("train"), self.seed + 1)[: self.num_shots])

    @functools.cached_property
    def _prefix(self) -> str:
        parts = [self.instruction] if self.instruction else []
        parts += [self.template.format(text=e.text) + self.answer_prefix + e.references[0]
                  for e in self.demonstrations]
        return "".join(part + self.shot_separator for part in parts)

    def prompt(self, example: Example) -> str:
        """The text the model continues; its answer follows `answer_prefix`."""
        return self._prefix + self.template.format(text=example.text) + self.answer_prefix

    def example_scores(self, generations: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """Per-example scores in [0, 1]: the best `metric` of each generation against its references."""
        from dtr_core.evaluation import text_metrics

        score = text_metrics.scorer(self.metric, self.answer_regex)
        return [text_metrics.best_over_references(score, g, e.references) for g, e in zip(generations, examples)]


def with_options(task: Task, metric: str | None = None, verbaliser_scoring: str | None = None) -> Task:
    """`task` searched on `metric` and comparing verbalisers by `verbaliser_scoring` (None keeps the task's).

    One-line ValueError when they do not fit the task: an unknown metric, one of another task kind,
    `recall:<class>` naming a class the task does not have, verbaliser scoring on a perplexity task.
    """
    if isinstance(task, GenerativeTask):
        if verbaliser_scoring is not None:
            raise ValueError(f"task '{task.name}' is a generative task, which has no verbalisers; leave "
                             "verbaliser scoring unset")
        if metric is None:
            return task
        try:
            return dataclasses.replace(task, metric=metric)
        except ValueError as error:
            raise ValueError(str(error)) from None
    if isinstance(task, ClassificationTask):
        if metric is None and verbaliser_scoring is None:
            return task
        return dataclasses.replace(task, metric=metric or task.metric,
                                   verbaliser_scoring=verbaliser_scoring or task.verbaliser_scoring)
    if metric is not None:
        try:
            metrics.parse_metric(metric, task.kind)
        except ValueError as error:
            raise ValueError(f"task '{task.name}': {error}") from None
    if verbaliser_scoring is not None:
        raise ValueError(f"task '{task.name}' is a perplexity task, which has no verbalisers; leave "
                         "verbaliser scoring unset")
    return task
