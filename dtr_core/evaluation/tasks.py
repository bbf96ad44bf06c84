"""Tasks: what the DtR search measures a hybrid on.

Two kinds, both frozen dataclasses whose data is read lazily on first use:
- `ClassificationTask`: a prompt template and one verbaliser (continuation string) per label; a decoder
  LM predicts the label whose continuation it finds most likely (see `scoring.py`). Score = accuracy.
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

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from dtr_core.evaluation import metrics
from dtr_core.evaluation.splits import SPLIT_NAMES, assigned_split, stratified_split, stratified_order

KINDS = ("classification", "language_modeling")


@dataclass(frozen=True)
class Example:
    """One labelled text. `uid` is stable across runs (splits are keyed on it); `label` is the class name
    (for language modelling, an optional stratum such as the article's topic); `split` is set only when
    the data fixes its own split."""

    uid: str
    text: str
    label: str | None = None
    split: str | None = None


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
        """The task score from per-example values (see `EvalResult.per_example`); used for bootstrap."""
        return metrics.aggregate_score(self.kind, per_example, weights)


@dataclass(frozen=True)
class ClassificationTask(Task):
    """Classification by label likelihood.

    `template` holds `{text}`; `verbalisers` maps label -> continuation (its order is the label order),
    e.g. `{"positive": " positive", "negative": " negative"}`. The prompt is
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

    kind: ClassVar[str] = "classification"
    metric: ClassVar[str] = "accuracy"

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
