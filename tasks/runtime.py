"""Per-process state of the tasks: models, tasks, students and greedy-round scorers, cached by path/name.

Tasks exchange paths and names, never models or tensors; each process (the flow's own for threads, each
pool process or Dask worker otherwise) loads what it needs once and keeps it here. Caches are guarded by
locks, so concurrent threads load a thing once. Only the latest round scorer is kept (rounds are
sequential; each holds a copy of the model and the round's hidden states).

Threads: torch's intra-op pool oversubscribes 2 cores when several tasks run at once (and spins badly on
a busy machine), so a task that runs in parallel with others uses one torch thread (`torch_threads(1)`);
the serial steps (export, speed) use `serial_threads()`, the machine's cores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from tasks.params import TaskParams

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_key_locks: dict[Any, threading.Lock] = {}
_cache: dict[Any, Any] = {}
_round: dict[str, Any] = {}  # {"key": ..., "scorer": dtr_core.search.scorer.RoundScorer}


def _default_threads() -> int:
    """torch's default (one per core), or 1 when other work already keeps the cores busy at start-up:
    torch's spinning intra-op threads then run several times slower than a single thread (measured on a
    shared 2-core machine: a 100-example SmolLM2 evaluation took 82 s with 2 threads, 29 s with 1)."""
    cores = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0] >= 0.75 * (os.cpu_count() or cores)
    except OSError:
        busy = False
    return 1 if busy else cores


_DEFAULT_THREADS = _default_threads()


def _key_lock(key: Any) -> threading.Lock:
    with _lock:
        return _key_locks.setdefault(key, threading.Lock())


def cached(key: Any, build: Callable[[], Any]) -> Any:
    """`build()` once per process for `key` (concurrent callers wait for the first)."""
    with _key_lock(key):
        if key not in _cache:
            _cache[key] = build()
        return _cache[key]


def clear() -> None:
    """Forget everything (tests; after a run to free memory)."""
    with _lock:
        _cache.clear()
        _round.clear()


def serial_threads() -> int:
    """Torch threads for a step that runs alone: $DTR_TORCH_THREADS, else `_default_threads()` (decided once,
    when the process starts, so our own parallel tasks never count as "busy")."""
    return int(os.environ.get("DTR_TORCH_THREADS", _DEFAULT_THREADS))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the body with `count` torch intra-op threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def teacher(source: str):
    """(model, tokenizer) of a model source, loaded once per process. Never modify it."""
    from dtr_core.models import load_model

    return cached(("model", source), lambda: load_model(source))


def num_layers(source: str) -> int:
    """The decoder layers of a model source, from its config (the model is not loaded)."""
    from dtr_core.preflight import check_model_source

    return cached(("num_layers", source), lambda: check_model_source(source, check_values=False).num_layers)


def task(task_params: TaskParams):
    """The `dtr_core.evaluation.Task` of a `TaskParams` (built once per process)."""
    return cached(("task", task_params.model_dump_json()), task_params.build)


def students(students_dir: str, source: str, mixer: str) -> dict[int, torch.nn.Module]:
    """The distilled students of a run, loaded once per process (eval mode, shared read-only)."""
    from dtr_core.distill.training import load_students

    model, _ = teacher(source)
    return cached(("students", students_dir, source, mixer), lambda: load_students(students_dir, model, mixer))


def validation_batches(source: str, task_params: TaskParams, split: str, limit: int | None):
    from dtr_core.search.greedy_search import encode_split

    _, tokenizer = teacher(source)
    return cached(("batches", source, task_params.model_dump_json(), split, limit),
                  lambda: encode_split(task(task_params), tokenizer, split, limit=limit))


def round_scorer(source: str, task_params: TaskParams, students_dir: str, mixer: str, committed: tuple[int, ...],
                 limit: int | None, split: str = "validation"):
    """The round scorer (`dtr_core.search.scorer.RoundScorer`; for a generative task a
    `generation_scorer.GenerationRoundScorer`) of the round that has `committed` layers linear (built once per
    process, on a private copy of the teacher with those layers swapped, traced over the batches)."""
    from dtr_core.search.generation_scorer import GenerationRoundScorer
    from dtr_core.search.scorer import CommittedHybrid, RoundScorer

    key = (source, task_params.model_dump_json(), students_dir, mixer, tuple(committed), limit, split)
    with _key_lock("round"):
        if _round.get("key") != key:
            _round.clear()  # free the previous round's model copy and hidden states first
            model, _ = teacher(source)
            if task(task_params).kind == "generative":  # scored by generation, no prefix reuse
                _round["scorer"] = GenerationRoundScorer(model, validation_batches(source, task_params, split, limit),
                                                         students(students_dir, source, mixer), committed,
                                                         task(task_params), split)
                _round["key"] = key
                return _round["scorer"]
            hybrid = CommittedHybrid(model, validation_batches(source, task_params, split, limit),
                                     students(students_dir, source, mixer), committed)
            _round["scorer"] = RoundScorer(hybrid, task(task_params), split=split)
            _round["key"] = key
            logger.info("round scorer for committed=%s ready in %.1fs", list(committed), hybrid.trace_seconds)
        return _round["scorer"]
