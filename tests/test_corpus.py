"""Distillation text sources and token packing."""

from __future__ import annotations

import pytest
import torch

from dtr_core.distill.corpus import bbc_held_out_uids, load_corpus, token_chunks
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


def test_token_chunks_pack_with_bos_between_documents():
    tokenizer = byte_tokenizer()
    bos = tokenizer.bos_token_id
    docs = ["abc", "defgh", "ij", "klmnopq"]
    chunks = token_chunks(docs, tokenizer, seq_len=5, token_budget=12)
    assert chunks.shape == (2, 5) and chunks.dtype == torch.long
    stream = []
    for doc in docs:
        stream += [bos] + tokenizer(doc, add_special_tokens=False)["input_ids"]
    assert chunks.flatten().tolist() == stream[:10]


def test_token_chunks_read_only_what_the_budget_needs_and_run_out_gracefully():
    tokenizer = byte_tokenizer()
    read = []

    def documents():
        for i in range(1000):
            read.append(i)
            yield "x" * 9

    assert token_chunks(documents(), tokenizer, seq_len=10, token_budget=30).shape == (3, 10)
    assert len(read) == 3
    assert token_chunks(["abcdefghi"] * 2, tokenizer, seq_len=10, token_budget=100).shape == (2, 10)


def test_token_chunks_errors():
    tokenizer = byte_tokenizer()
    with pytest.raises(ValueError, match="token_budget \\(0\\) must be at least seq_len"):
        token_chunks(["abc"], tokenizer, seq_len=4, token_budget=0)
    with pytest.raises(ValueError, match="less than one row"):
        token_chunks([], tokenizer, seq_len=4, token_budget=8)
    with pytest.raises(ValueError, match="less than one row"):
        token_chunks(["", "  "], tokenizer, seq_len=4, token_budget=8)
