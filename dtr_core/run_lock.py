"""One dtr process per run folder: an OS-level file lock on `runs/<run_id>/.lock`.

Two conversions with the same parameters land in the same run folder (its name hashes them); without a lock
both would distil every layer and both would register. `run_folder_lock(folder)` takes `filelock.FileLock`
on `<folder>/.lock` without waiting and holds it until the block ends; a second process gets `RunInUse` at
once (a `ValueError`: the CLI prints it as one `error:` line). The holder's pid and start time are kept in
`<folder>/.lock.json`, only for that message.

The lock is `flock(2)` on Linux: the kernel drops it when its process dies, kill -9 included, so a lock left
by a killed run never blocks the next one (tested with a real SIGKILL). The lock file itself may stay
behind; it means nothing without a live holder. `check_free(folder)` is the same test without holding the
lock: the input checks run it, so a second conversion is refused before any work (exit code 2).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from dtr_core.artifacts import write_json

LOCK_NAME = ".lock"
HOLDER_NAME = ".lock.json"

logger = logging.getLogger(__name__)


class RunInUse(ValueError):
    """Another live dtr process holds the run folder."""


def _holder(folder: Path) -> str:
    """`pid N, started ...` of the holder, as recorded beside the lock (it may be mid-write: retry briefly)."""
    for _ in range(10):
        try:
            info = json.loads((folder / HOLDER_NAME).read_text(encoding="utf-8"))
            host = "" if info.get("host") == socket.gethostname() else f" on {info.get('host')}"
            return f"pid {info['pid']}{host}, started {info['started']}"
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    return "pid unknown"


def _acquire(folder: Path) -> FileLock:
    """The lock of run folder `folder`, taken without waiting; `RunInUse` naming the holder if it is taken."""
    lock = FileLock(folder / LOCK_NAME, blocking=False, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise RunInUse(f"run {folder.name} is in use by another dtr process ({_holder(folder)}); wait for it to "
                       "finish, or pass another --run-id") from None
    return lock


@contextlib.contextmanager
def run_folder_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold the lock of run folder `folder` (created if needed) for the block; `RunInUse` if it is taken."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = _acquire(folder)
    try:
        write_json(folder / HOLDER_NAME, {"pid": os.getpid(), "host": socket.gethostname(),
                                          "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        yield folder
    finally:
        try:
            (folder / HOLDER_NAME).unlink(missing_ok=True)  # before the release: the next holder writes its own
        except OSError as error:  # a folder turned read-only or a full disk: the block's own error matters
            logger.warning("could not remove %s: %s", folder / HOLDER_NAME, error)
        finally:
            lock.release()


def check_free(folder: str | os.PathLike) -> None:
    """`RunInUse` when a live process holds the lock of run folder `folder`; creates nothing."""
    folder = Path(folder)
    if not (folder / LOCK_NAME).is_file():
        return
    _acquire(folder).release()
