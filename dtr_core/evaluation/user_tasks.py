"""User tasks from local csv / jsonl / parquet files, described by a `TaskSpec`.

    spec = TaskSpec(path="reviews.csv", text_column="review", label_column="stars",
                    template="Review: {text}\nGood or bad?", verbalisers={"1": " bad", "5": " good"})
    task = spec.build()          # or get_task(spec), or get_task("reviews_task.json")

`label_column=None` makes a language-modelling (perplexity) task over `text_column`. `reference_columns` (one
or more columns of accepted answers; empty cells are skipped) makes a generative task instead: the model answers
`template.format(text=...) + answer_prefix` greedily (`max_new_tokens`, `stop` strings, `answer_regex` for
regex_match) and is scored by `metric` (exact_match by default, f1, rouge_l, regex_match;
`tasks.GenerativeTask`). `metric` and
`verbaliser_scoring` choose the search metric and how verbalisers are compared (`tasks.py`). Labels are compared
as strings (csv is read as text, other formats are cast with `str`). Rows with an empty text or label are
dropped (logged). A `split_column` with values train / validation / test replaces the automatic split.
A task spec file is a JSON object with the fields of `TaskSpec`; a relative `path` is read relative to it.

Every problem is a one-line `ValueError` naming the fix, raised when the spec is made or built (before any
model work): a field of the wrong type (`"validation_size": "twenty"`: the field, the expected type and the
value), verbalisers that are not an object label -> continuation, a data file that is not UTF-8 text, empty,
missing a column (the columns it has are listed), with fewer than two distinct labels, or too small for
`validation_size` + `test_size` + 1 training row.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from dtr_core.evaluation.metrics import DEFAULT_METRICS
from dtr_core.evaluation.tasks import (
    ClassificationTask, Example, GenerativeTask, LanguageModelingTask, Task, with_options,
)
from dtr_core.evaluation.text_metrics import GENERATIVE_METRICS

logger = logging.getLogger(__name__)

TABLE_FORMATS = (".csv", ".jsonl", ".parquet")
TEXT_FORMATS = (".csv", ".jsonl")  # read as text: must be UTF-8


def check_utf8(path: Path) -> None:
    """One-line ValueError naming the first byte that is not UTF-8 (line and offset)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} at line {line}, offset "
                         f"{error.start}); re-save it as UTF-8") from None


def read_table(path: str | Path, columns: list[str]) -> list[dict]:
    """Rows of a csv / jsonl / parquet file as dicts holding `columns` (missing values as None).

    Raises `FileNotFoundError` for a missing file, `ValueError` for another format or a missing column.
    """
    import pandas as pd  # only needed for user files

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise ValueError(f"cannot read {path}: format '{suffix}' is not one of {', '.join(TABLE_FORMATS)}")
    if path.stat().st_size == 0 or (suffix in TEXT_FORMATS and not path.read_bytes().strip()):
        raise ValueError(f"data file {path} is empty; it needs a header row (or JSON objects) with the columns "
                         f"{', '.join(repr(c) for c in columns)} and one row per example")
    if suffix in TEXT_FORMATS:
        check_utf8(path)
    try:
        if suffix == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        elif suffix == ".jsonl":
            frame = pd.read_json(path, lines=True, dtype=False, encoding="utf-8")
        else:
            frame = pd.read_parquet(path)
    except (ValueError, pd.errors.ParserError, OSError) as error:  # EmptyDataError is a ValueError
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot read {path} as {suffix[1:]} ({reason}); check the file's format") from None
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{path} has no column {', '.join(repr(c) for c in missing)} (columns: "
                         f"{', '.join(map(str, frame.columns))}); set the column names in the task spec")
    frame = frame[columns].astype(object).where(frame[columns].notna(), None)
    return frame.to_dict(orient="records")


_STR, _OPT_STR, _INT = "a string", "a string or null", "an integer"
# field -> what it must be (the JSON spelling, for messages); verbalisers are checked on their own
FIELD_TYPES: dict[str, str] = {
    "path": _STR, "text_column": _STR, "label_column": _OPT_STR, "template": _STR, "name": _OPT_STR,
    "split_column": _OPT_STR, "id_column": _OPT_STR, "validation_size": _INT, "test_size": _INT, "seed": _INT,
    "num_shots": _INT, "instruction": _STR, "max_tokens": _INT, "metric": _OPT_STR, "verbaliser_scoring": _OPT_STR,
    "max_new_tokens": _INT, "answer_regex": _OPT_STR, "answer_prefix": _STR,
}
_STRINGS = "a list of strings"
LIST_FIELDS = {"reference_columns": "a list of column names", "stop": _STRINGS}  # stored as tuples
_NON_NEGATIVE = ("validation_size", "test_size", "num_shots", "seed")


def _type_ok(value: object, expected: str) -> bool:
    if expected == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str) or (expected == _OPT_STR and value is None)


@dataclass(frozen=True)
class TaskSpec:
    """A task over a local file. `verbalisers` (label -> continuation) is required for classification.

    Field types are checked on construction (one-line ValueError naming the field, the type and the value).
    """

    path: str
    text_column: str = "text"
    label_column: str | None = "label"  # None: a language-modelling (perplexity) task
    template: str = "{text}\nAnswer:"
    verbalisers: tuple[tuple[str, str], ...] | Mapping[str, str] = ()
    name: str | None = None  # default: the file's stem
    split_column: str | None = None
    id_column: str | None = None  # default: the row number
    validation_size: int = 200
    test_size: int = 500
    seed: int = 0
    num_shots: int = 0
    instruction: str = ""
    max_tokens: int = 512  # language modelling only
    metric: str | None = None  # None: accuracy (classification) / perplexity; see `metrics.CLASSIFICATION_METRICS`
    verbaliser_scoring: str | None = None  # None: sum, or per_token when verbalisers differ in token length
    reference_columns: tuple[str, ...] | None = None  # set: a generative task with these reference-answer columns
    max_new_tokens: int = 32  # generative only, like the four fields below
    stop: tuple[str, ...] = ("\n",)
    answer_regex: str | None = None
    answer_prefix: str = " "
    spec_file: str | None = field(default=None, compare=False, repr=False)  # the .json it came from (messages)

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        where = f"task spec {self.spec_file}" if self.spec_file else f"task spec for {self.path}"
        for name, expected in FIELD_TYPES.items():
            value = getattr(self, name)
            if not _type_ok(value, expected):
                raise ValueError(f"{where}: field '{name}' must be {expected}, got {value!r} "
                                 f"({type(value).__name__})")
        for name, expected in LIST_FIELDS.items():
            value = getattr(self, name)
            if value is None and name == "reference_columns":
                continue
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value \
                    or not all(isinstance(item, str) and item for item in value):
                raise ValueError(f"{where}: field '{name}' must be {expected} (non-empty strings, at least one), "
                                 f"got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.reference_columns is None and self.metric in GENERATIVE_METRICS:
            raise ValueError(f"{where}: metric '{self.metric}' scores generated answers, but the task has no "
                             "reference column; set reference_columns (--reference-column) to the column(s) "
                             "holding the answers")
        if self.reference_columns is not None and self.verbalisers:
            raise ValueError(f"{where}: verbalisers belong to classification tasks, reference_columns to "
                             "generative ones; set one of them")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise ValueError(f"{where}: field '{name}' must be >= 0, got {getattr(self, name)}")
        object.__setattr__(self, "verbalisers", self._checked_verbalisers(where))
        if self.label_column is not None and not self.verbalisers and self.reference_columns is None:
            raise ValueError(f"{where} needs verbalisers (label -> continuation), "
                             f"e.g. {{\"pos\": \" positive\", \"neg\": \" negative\"}}; or label_column=None for perplexity")

    def _checked_verbalisers(self, where: str) -> tuple[tuple[str, str], ...]:
        example = "e.g. {\"pos\": \" positive\", \"neg\": \" negative\"}"
        value = self.verbalisers
        if isinstance(value, Mapping):
            pairs = list(value.items())
        elif isinstance(value, (tuple, list)) and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in value):
            pairs = [tuple(p) for p in value]
        else:
            raise ValueError(f"{where}: field 'verbalisers' must be an object label -> continuation ({example}), "
                             f"got {value!r} ({type(value).__name__})")
        for label, continuation in pairs:
            if not isinstance(continuation, str):
                raise ValueError(f"{where}: verbaliser of label {label!r} must be a string continuation ({example}), "
                                 f"got {continuation!r} ({type(continuation).__name__})")
        return tuple((str(label), continuation) for label, continuation in pairs)

    @classmethod
    def from_json(cls, path: str | Path) -> TaskSpec:
        """A spec from a JSON object file; a relative `path` inside it is relative to the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"task spec {path} does not exist")
        check_utf8(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"task spec {path} is not valid JSON ({error})") from None
        known = {f.name for f in fields(cls)} - {"spec_file"}
        if not isinstance(data, dict) or "path" not in data or set(data) - known:
            unknown = sorted(set(data) - known) if isinstance(data, dict) else []
            raise ValueError(f"task spec {path} must be a JSON object with 'path' and only the fields "
                             f"{', '.join(sorted(known))}" + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
        if not isinstance(data["path"], str):
            raise ValueError(f"task spec {path}: field 'path' must be a string, got {data['path']!r} "
                             f"({type(data['path']).__name__})")
        data_path = Path(data["path"]).expanduser()
        if not data_path.is_absolute():
            data_path = path.parent / data_path
        return cls(**{**data, "path": str(data_path), "spec_file": str(path)})

    def _fix_sizes(self) -> str:
        """How to change the split sizes, in the user's terms (a spec file, or a spec made in code)."""
        if self.spec_file:
            return f"lower \"validation_size\" / \"test_size\" in {self.spec_file}"
        return ("put the file in a task spec .json with smaller \"validation_size\" / \"test_size\" and pass it "
                "as the task (--task spec.json)")

    @property
    def generative(self) -> bool:
        return self.reference_columns is not None

    def _examples(self, name: str) -> list[Example]:
        if self.generative:
            return self._generative_examples(name)
        columns = [self.text_column] + [c for c in (self.label_column, self.split_column, self.id_column) if c]
        rows = read_table(self.path, list(dict.fromkeys(columns)))
        examples, dropped = [], 0
        for number, row in enumerate(rows):
            text = row[self.text_column]
            label = row[self.label_column] if self.label_column else None
            if text is None or not str(text).strip() or (self.label_column and (label is None or str(label) == "")):
                dropped += 1
                continue
            uid = f"{name}-{row[self.id_column] if self.id_column else number}"
            split = str(row[self.split_column]) if self.split_column else None
            examples.append(Example(uid=uid, text=str(text), label=None if label is None else str(label), split=split))
        if dropped:
            logger.warning("%s: dropped %d rows with an empty text or label", self.path, dropped)
        if not examples:
            raise ValueError(f"{self.path} has no usable rows (non-empty '{self.text_column}'"
                             + (f" and '{self.label_column}'" if self.label_column else "") + "); check the file")
        return examples

    def _generative_examples(self, name: str) -> list[Example]:
        """Rows with a non-empty text and at least one non-empty reference; the others are dropped (logged)."""
        columns = [self.text_column, *self.reference_columns] + [c for c in (self.split_column, self.id_column) if c]
        rows = read_table(self.path, list(dict.fromkeys(columns)))
        examples, dropped = [], 0
        for number, row in enumerate(rows):
            text = row[self.text_column]
            references = tuple(str(row[c]) for c in self.reference_columns
                               if row[c] is not None and str(row[c]).strip())
            if text is None or not str(text).strip() or not references:
                dropped += 1
                continue
            uid = f"{name}-{row[self.id_column] if self.id_column else number}"
            split = str(row[self.split_column]) if self.split_column else None
            examples.append(Example(uid=uid, text=str(text), references=references, split=split))
        if dropped:
            logger.warning("%s: dropped %d rows with an empty text or no reference answer", self.path, dropped)
        if not examples:
            raise ValueError(f"{self.path} has no usable rows (non-empty '{self.text_column}' and at least one of "
                             f"{', '.join(repr(c) for c in self.reference_columns)}); check the file")
        return examples

    def build(self) -> Task:
        """Read the file now and return the task (errors surface here, not mid-search)."""
        name = self.name or Path(self.path).stem
        examples = tuple(self._examples(name))
        if self.label_column is not None and not self.generative:
            labels = sorted({e.label for e in examples})
            if len(labels) < 2:
                raise ValueError(f"{self.path}: column '{self.label_column}' has a single label ({labels[0]!r}) in "
                                 f"{len(examples)} rows; a classification task needs at least two labels (add rows "
                                 "of the other labels, or set label_column to null for a perplexity task)")
        if self.split_column is None:
            needed = self.validation_size + self.test_size + 1
            if len(examples) < needed:
                raise ValueError(f"{self.path} has {len(examples)} usable rows, fewer than validation_size "
                                 f"({self.validation_size}) + test_size ({self.test_size}) + 1 for training = {needed}; "
                                 f"add rows or {self._fix_sizes()}")
        common = dict(name=name, load=lambda: examples, validation_size=self.validation_size,
                      test_size=self.test_size, seed=self.seed, description=f"user task from {self.path}")
        if self.generative:
            try:
                task: Task = GenerativeTask(**common, template=self.template, num_shots=self.num_shots,
                                            instruction=self.instruction, answer_prefix=self.answer_prefix,
                                            max_new_tokens=self.max_new_tokens, stop=self.stop,
                                            answer_regex=self.answer_regex,
                                            metric=self.metric or DEFAULT_METRICS["generative"])
            except ValueError as error:
                raise ValueError(f"{self.spec_file or self.path}: {error}") from None
        elif self.label_column is None:
            task = LanguageModelingTask(**common, max_tokens=self.max_tokens)
        else:
            task = ClassificationTask(**common, template=self.template, verbalisers=self.verbalisers,
                                      num_shots=self.num_shots, instruction=self.instruction)
        task = with_options(task, self.metric, self.verbaliser_scoring)
        task.split("validation")  # splits now: missing labels, too little data, empty splits
        task.split("test")
        if self.label_column is not None and not self.generative:
            held_out = {e.label for e in task.split("validation")}
            if len(held_out) < 2:
                raise ValueError(f"{self.path}: the validation split holds a single label ({next(iter(held_out))!r}), "
                                 "so it cannot tell hybrids apart; add rows of the other labels or a larger "
                                 "\"validation_size\" in the task spec")
        return task
