"""Distillation text sources and token packing."""

from __future__ import annotations

import pytest
import torch

from dtr_core.distill.corpus import Corpus, bbc_held_out_uids, load_corpus, tokenizer_fingerprint
from dtr_core.evaluation import datasets_builtin, get_task
from dtr_core.models import byte_tokenizer


def test_bbc_corpus_leaves_out_task_validation_and_test_articles():
    texts = list(load_corpus("bbc"))
    held_out = bbc_held_out_uids()
    articles = datasets_builtin.load_bbc()
    assert len(texts) == len(articles) - len(held_out)
    held_texts = {e.text for e in articles if e.uid in held_out}
    assert not held_texts & set(texts)
    for task in ("bbc-topic", "bbc-lm"):
        for split in ("validation", "test"):
            assert {e.uid for e in get_task(task).split(split)} <= held_out
    topics = [next(e.label for e in articles if e.text == text) for text in texts[:50]]
    assert len(set(topics)) == 5  # interleaved: a small budget still sees every topic
    assert list(load_corpus("bbc"))[:3] == texts[:3]


def test_local_sources(tmp_path):
    import pandas as pd

    (tmp_path / "one.txt").write_text("A whole file.\nTwo lines.")
    assert list(load_corpus(str(tmp_path / "one.txt"))) == ["A whole file.\nTwo lines."]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second")
    (folder / "sub" / "a.txt").write_text("first")
    (folder / "empty.txt").write_text("  ")
    assert list(load_corpus(str(folder))) == ["second", "first"]  # sorted paths: docs/b.txt < docs/sub/a.txt
    frame = pd.DataFrame({"body": ["x one", None, "x three"], "other": [1, 2, 3]})
    frame.to_json(tmp_path / "rows.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "rows.parquet")
    for name in ("rows.jsonl", "rows.parquet"):
        assert list(load_corpus(str(tmp_path / name), text_column="body")) == ["x one", "x three"]
    with pytest.raises(ValueError, match="has no column 'text'"):
        load_corpus(str(tmp_path / "rows.parquet"))


def test_bad_sources_raise_one_line():
    with pytest.raises(ValueError, match="unknown corpus 'nowhere.txt'"):
        load_corpus("nowhere.txt")
    with pytest.raises(ValueError, match=r"hf:<dataset>\[:<config>\]:<split>"):
        load_corpus("hf:only-a-name")


def _stream(docs, tokenizer):
    bos = tokenizer.bos_token_id
    return [t for doc in docs for t in [bos] + tokenizer(doc, add_special_tokens=False)["input_ids"]]


def test_rows_pack_documents_with_bos_between_them(tmp_path):
    tokenizer = byte_tokenizer()
    docs = ["abc", "defgh", "ij", "klmnopq"]
    (tmp_path / "docs").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "docs" / f"{i}.txt").write_text(doc)
    rows = Corpus(str(tmp_path / "docs"), tokenizer).rows()
    first, second = rows.take(2, 5), rows.take(1, 3)
    assert first.shape == (2, 5) and first.dtype == torch.long and second.shape == (1, 3)
    assert first.flatten().tolist() + second.flatten().tolist() == _stream(docs, tokenizer)[:13]
    assert rows.position == 13


def test_rows_seek_to_a_position_deterministically(tmp_path):
    tokenizer = byte_tokenizer()
    (tmp_path / "text.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    corpus = Corpus(str(tmp_path / "text.txt"), tokenizer)
    rows = corpus.rows()
    rows.take(3, 16)
    expected = rows.take(2, 32)
    assert torch.equal(corpus.rows(48).take(2, 32), expected)


def test_rows_read_only_the_documents_they_need(tmp_path, monkeypatch):
    tokenizer = byte_tokenizer()
    (tmp_path / "docs").mkdir()
    for i in range(200):
        (tmp_path / "docs" / f"{i:03d}.txt").write_text("x" * 9)
    read = []
    original = datasets_builtin.read_text
    monkeypatch.setattr(datasets_builtin, "read_text", lambda path: read.append(path) or original(path))
    corpus = Corpus(str(tmp_path / "docs"), tokenizer)
    read.clear()
    assert corpus.rows().take(3, 10).shape == (3, 10)
    assert len(read) == 3  # 10 tokens a document (BOS + 9)


def test_a_short_corpus_repeats_with_a_warning_naming_the_epoch(tmp_path, caplog):
    tokenizer = byte_tokenizer()
    (tmp_path / "short.txt").write_text("abcdefghi")  # 10 tokens with the BOS
    rows = Corpus(str(tmp_path / "short.txt"), tokenizer).rows()
    with caplog.at_level("WARNING", logger="dtr_core.distill.corpus"):
        block = rows.take(3, 10)
    assert torch.equal(block[0], block[1]) and torch.equal(block[1], block[2])
    assert "repeats: epoch 2" in caplog.text and "repeats: epoch 3" in caplog.text
    assert str(tmp_path / "short.txt") in caplog.text


def test_a_corpus_without_text_raises(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": " "}\n{"text": ""}\n')
    rows = Corpus(str(tmp_path / "empty.jsonl"), byte_tokenizer()).rows()
    with pytest.raises(ValueError, match="holds no text"):
        rows.take(1, 4)


def test_tokenizer_fingerprint_tells_tokenizers_apart():
    other = byte_tokenizer()
    other.add_tokens(["<extra>"])
    assert tokenizer_fingerprint(byte_tokenizer()) == tokenizer_fingerprint(byte_tokenizer())
    assert tokenizer_fingerprint(byte_tokenizer()) != tokenizer_fingerprint(other)
