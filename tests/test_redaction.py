"""Credentials never reach output: URL user info and secret query values are masked."""

import pytest

from dtr_core.redaction import redact


@pytest.mark.parametrize("text, expected", [
    ("https://user:secret@mlflow.example:5000/", "https://***@mlflow.example:5000/"),
    ("connect postgresql://me:s3cret@db/mlflow failed", "connect postgresql://***@db/mlflow failed"),
    ("https://token123@host/path", "https://***@host/path"),
    ("http://host/?token=abc&x=1", "http://host/?token=***&x=1"),
    ("http://host/?x=1&api_key=zzz", "http://host/?x=1&api_key=***"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("tcp://127.0.0.1:8786", "tcp://127.0.0.1:8786"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
])
def test_redact(text, expected):
    assert redact(text) == expected
    assert "secret" not in redact(text) and "s3cret" not in redact(text)


def test_redact_none():
    assert redact(None) is None
