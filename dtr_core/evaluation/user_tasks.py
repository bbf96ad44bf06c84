"""User tasks from local csv / jsonl / parquet files, described by a `TaskSpec`.

    spec = TaskSpec(path="reviews.csv", text_column="review", label_column="stars",
                    template="Review: {text}\nGood or bad?", verbalisers={"1": " bad", "5": " good"})
    task = spec.build()          # or get_task(spec), or get_task("reviews_task.json")

`label_column=None` makes a language-modelling (perplexity) task over `text_column`. Labels are compared
as strings (csv is read as text, other formats are cast with `str`). Rows with an empty text or label are
dropped (logged). A `split_column` with values train / validation / test replaces the automatic split.
A task spec file is a JSON object with the fields of `TaskSpec`; a relative `path` is read relative to it.
Every problem is a one-line `ValueError` naming the fix.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from dtr_core.evaluation.tasks import ClassificationTask, Example, LanguageModelingTask, Task

logger = logging.getLogger(__name__)

TABLE_FORMATS = (".csv", ".jsonl", ".parquet")


def read_table(path: str | Path, columns: list[str]) -> list[dict]:
    """Rows of a csv / jsonl / parquet file as dicts holding `columns` (missing values as None).

    Raises `FileNotFoundError` for a missing file, `ValueError` for another format or a missing column.
    """
    import pandas as pd  # only needed for user files

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif suffix == ".jsonl":
        frame = pd.read_json(path, lines=True, dtype=False)
    elif suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        raise ValueError(f"cannot read {path}: format '{suffix}' is not one of {', '.join(TABLE_FORMATS)}")
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{path} has no column {', '.join(repr(c) for c in missing)} (columns: "
                         f"{', '.join(map(str, frame.columns))}); set the column names in the task spec")
    frame = frame[columns].astype(object).where(frame[columns].notna(), None)
    return frame.to_dict(orient="records")


@dataclass(frozen=True)
class TaskSpec:
    """A task over a local file. `verbalisers` (label -> continuation) is required for classification."""

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

    def __post_init__(self) -> None:
        if isinstance(self.verbalisers, Mapping):
            object.__setattr__(self, "verbalisers", tuple((str(k), v) for k, v in self.verbalisers.items()))
        if self.label_column is not None and not self.verbalisers:
            raise ValueError(f"task spec for {self.path} needs verbalisers (label -> continuation), "
                             f"e.g. {{\"pos\": \" positive\", \"neg\": \" negative\"}}; or label_column=None for perplexity")

    @classmethod
    def from_json(cls, path: str | Path) -> TaskSpec:
        """A spec from a JSON object file; a relative `path` inside it is relative to the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"task spec {path} is not valid JSON ({error})") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or "path" not in data or set(data) - known:
            unknown = sorted(set(data) - known) if isinstance(data, dict) else []
            raise ValueError(f"task spec {path} must be a JSON object with 'path' and only the fields "
                             f"{', '.join(sorted(known))}" + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
        data_path = Path(data["path"]).expanduser()
        if not data_path.is_absolute():
            data_path = path.parent / data_path
        return cls(**{**data, "path": str(data_path)})

    def _examples(self, name: str) -> list[Example]:
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

    def build(self) -> Task:
        """Read the file now and return the task (errors surface here, not mid-search)."""
        name = self.name or Path(self.path).stem
        examples = tuple(self._examples(name))
        common = dict(name=name, load=lambda: examples, validation_size=self.validation_size,
                      test_size=self.test_size, seed=self.seed, description=f"user task from {self.path}")
        if self.label_column is None:
            task: Task = LanguageModelingTask(**common, max_tokens=self.max_tokens)
        else:
            task = ClassificationTask(**common, template=self.template, verbalisers=self.verbalisers,
                                      num_shots=self.num_shots, instruction=self.instruction)
        task.split("validation")  # splits now: missing labels, too little data, empty splits
        task.split("test")
        return task
