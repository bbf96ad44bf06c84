"""Credentials out of everything dtr prints or logs.

A tracking URI or a Dask address may carry a user name and password (`https://user:secret@host/`,
`postgresql://user:secret@db/mlflow`) or a token in its query string (`?token=...`). `redact` replaces
those parts with `***` wherever they appear in a text: error messages, log lines, MLflow params and tags.
"""

from __future__ import annotations

import re

# scheme://user:password@  or  scheme://token@  -> scheme://***@
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
# ?token=... / &password=... / &api_key=... and the like
_SECRET_QUERY = re.compile(r"(?P<key>[?&](?:[A-Za-z0-9_-]*(?:token|password|passwd|secret|key|auth)[A-Za-z0-9_-]*))="
                           r"(?P<value>[^&#\s]+)", re.IGNORECASE)

MASK = "***"


def redact(text: str | None) -> str | None:
    """`text` with URL credentials and secret query values replaced by `***` (None stays None)."""
    if text is None:
        return None
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_QUERY.sub(lambda m: f"{m['key']}={MASK}", text)
