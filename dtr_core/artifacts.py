"""Artifact helpers: atomic writes, JSON files and content hashes, and the dtr folder marker.

Every file a run leaves behind is written atomically (style point 9, as nanochat's
`checkpoint_manager.py` does): data goes to a temporary name in the same folder, is flushed and
fsynced, and is then moved into place with `os.replace`, so a crash never leaves a half-written
file under its final name. Folders are built the same way (`atomic_dir`).

dtr never replaces a folder it did not write. Every folder built by `atomic_dir` carries the marker
file `.dtr-artifact` (JSON: `writer`, `kind`, `created` in UTC; `from_pretrained` ignores it), and
`atomic_dir(path)` replaces an existing `path` only when it is a dtr artifact (`is_dtr_artifact`) or an
empty folder; anything else raises `NotADtrArtifact` (a `FileExistsError`) naming the path and the fix,
unless the caller passes `overwrite=True` (`dtr hybridize --overwrite`). Folders written before the
marker existed are recognised by the completion file dtr always wrote last into them:
`dtr_export.json` (exported hybrids, `runs/<id>/hybrids/<role>`), a `meta.json` or `manifest.json`
holding both a `format` and a `key` field (students `runs/<id>/students/layer_007`, and the stored
activation captures of earlier dtr versions), or a `config.json` whose `model_type` starts with `dtr_` (a hybrid saved by
`dtr hybridize`). So resumed runs and re-runs into an earlier output keep working without `overwrite`.

Reuse by key: every stage whose result is a record on disk (a student's
`meta.json`, an export's `dtr_export.json`, an evaluation, a greedy candidate) goes through
`reuse_or_compute`: the stored record is returned when its `key` (a hash of everything that decides the
result) matches and its files are intact, else the result is computed again and written atomically.

Hashes are hex sha256 digests. `hash_json` hashes a canonical JSON encoding (sorted keys, no
whitespace), so equal configs give equal keys whatever the dict order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB reads when hashing files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success move it onto `path`, else delete it.

    For writers that want a file name (e.g. `safetensors.torch.save_file(tensors, tmp)`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_json_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The JSON object at `path`, or None when there is none, it cannot be read or it is not an object."""
    return _read_json_object(Path(path))


def reuse_or_compute(
    path: str | os.PathLike,
    key: str,
    compute: Callable[[], dict[str, Any]],
    *,
    problem: Callable[[dict[str, Any]], str | None] | None = None,
    read: Callable[[Path], dict[str, Any] | None] = read_json_record,
    write: bool = True,
    label: str = "artifact",
    log: logging.Logger = logger,
) -> tuple[dict[str, Any], bool]:
    """`(record, reused)`: the record at `path` when its `key` matches and it is complete, else `compute()`'s.

    `read(path)` loads the stored record (None: there is none usable). `problem(record)` says why a record
    with the right key cannot be trusted (its files no longer match their hashes): it is then computed again
    and `log` warns, naming `label` and the problem. With `write` (records that are one JSON file) the
    computed record gets `key` and is written to `path` atomically; without it `compute()` writes the record
    itself, as the completion file of a folder it builds with `atomic_dir`, and returns it.
    """
    path = Path(path)
    stored = read(path)
    if stored is not None and stored.get("key") == key:
        issue = problem(stored) if problem is not None else None
        if issue is None:
            log.info("%s: reusing %s (key %s)", label, path, key[:12])
            return stored, True
        log.warning("%s: not reusing %s: %s; computing it again", label, path, issue)
    record = compute()
    if write:
        record = {**record, "key": key}
        write_json(path, record)
    return record, False


MARKER = ".dtr-artifact"
MARKER_WRITER = "dtr"
# Completion files that dtr wrote last into its folders before the marker existed (see the docstring).
_LEGACY_KEYED_FILES = ("meta.json", "manifest.json")
_LEGACY_EXPORT_FILE = "dtr_export.json"


class NotADtrArtifact(FileExistsError):
    """`atomic_dir` was asked to replace a non-empty folder (or a file) that dtr did not write."""


def _read_json_object(path: Path) -> dict[str, Any] | None:
    try:
        obj = read_json(path)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def is_dtr_artifact(path: str | os.PathLike) -> bool:
    """True when the folder `path` was written by dtr: it has the marker, or a pre-marker completion file."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MARKER).is_file() or (path / _LEGACY_EXPORT_FILE).is_file():
        return True
    for name in _LEGACY_KEYED_FILES:
        obj = _read_json_object(path / name)
        if obj is not None and "format" in obj and "key" in obj:
            return True
    config = _read_json_object(path / "config.json")
    return config is not None and str(config.get("model_type", "")).startswith("dtr_")


def check_replaceable(path: str | os.PathLike, overwrite: bool = False, option: str = "overwrite=True") -> None:
    """Raise `NotADtrArtifact` unless `atomic_dir(path)` may replace `path`.

    Allowed: `path` does not exist, is an empty folder, is a dtr artifact, or `overwrite` is set.
    `option` names the caller's way to force it in the message (`--overwrite` for the CLI).
    """
    path = Path(path)
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir():
        if is_dtr_artifact(path) or not any(path.iterdir()):
            return
        what = "is a folder that dtr did not write"
    else:
        what = "is a file, not a folder dtr wrote"
    raise NotADtrArtifact(f"{path} {what}; choose a new or empty folder, or pass {option} to replace it")


def write_marker(folder: str | os.PathLike, kind: str | None = None) -> None:
    """Mark `folder` as written by dtr (`atomic_dir` does it for every folder it builds); an existing marker
    is kept, so it records when dtr first wrote the folder."""
    if (Path(folder) / MARKER).is_file():
        return
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_json(Path(folder) / MARKER, {"writer": MARKER_WRITER, "kind": kind, "created": created})


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `path`; on success it replaces `path` as a whole.

    The folder gets the dtr marker (`kind` says what it holds, e.g. "hybrid"). An existing `path` must
    be empty or a dtr artifact unless `overwrite` (checked before the block runs and again before the
    swap; `NotADtrArtifact` otherwise). It is moved aside first and deleted after the swap, so readers see
    either the old complete folder or the new complete one (plus a short window with neither).
    On failure the temporary folder is removed and `path` is left as it was.
    """
    path = Path(path)
    check_replaceable(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        write_marker(tmp, kind)
        check_replaceable(path, overwrite)  # the block may have run for minutes
        old = None
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            if old.is_symlink() or not old.is_dir():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """sha256 of the canonical JSON encoding of `obj` (sorted keys, compact separators)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_tensor(tensor: "torch.Tensor") -> str:
    """sha256 over dtype, shape and raw bytes of a tensor (moved to CPU, made contiguous)."""
    import torch  # here, so the module loads without torch (the CLI's input checks use it)

    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    if path.exists():
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


# what a killed `atomic_path` / `atomic_dir` leaves: `.NAME.tmp-XXXXXXXX` (file or folder), `.NAME.old-XXXXXXXX`
_TEMPORARY = re.compile(r"^\..+\.(tmp|old)-[A-Za-z0-9_]{8}$")


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete, below the dtr folder `folder`, what killed atomic writes left (names `.NAME.tmp-XXXXXXXX` and
    `.NAME.old-XXXXXXXX`, never anything else); returns what was removed. Call it only while no other process
    writes there (the run folder lock)."""
    folder = Path(folder)
    if not is_dtr_artifact(folder) and not (folder / MARKER).is_file():
        raise NotADtrArtifact(f"{folder} is not a dtr folder; not cleaning it")
    removed = []
    for path in sorted(folder.rglob(".*"), key=lambda p: len(p.parts)):
        if not _TEMPORARY.match(path.name) or not path.exists() and not path.is_symlink():
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed
