"""Deterministic, stratified train / validation / test splits.

The search (phase 2 of DtR) scores candidate hybrids on `validation`; `test` is reported once at the
end and never seen by the search, so the two must be disjoint and reproducible.

How: every example gets a key from its position inside its own class, `(rank + 0.5) / class_size`,
where `rank` orders the class by `sha256(f"{seed}:{uid}")`. Sorting all examples by that key
interleaves the classes in proportion, so *every prefix* of the ordering is stratified to within one
example per class. `test` is the first `test_size` examples, `validation` the next `validation_size`,
`train` the rest. Consequences worth knowing:
- a prefix of `validation` (`evaluate(..., limit=n)`) is itself stratified;
- the split depends only on (seed, uids, labels): never on file order or on global RNG state;
- two tasks over the same uids with the same seed (`bbc-topic`, `bbc-lm`) nest: the smaller held-out
  block is a subset of the larger one.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dtr_core.evaluation.tasks import Example

SPLIT_NAMES = ("train", "validation", "test")


def _hash_key(seed: int, uid: str) -> str:
    return hashlib.sha256(f"{seed}:{uid}".encode()).hexdigest()


def stratified_order(examples: Sequence[Example], seed: int) -> list[Example]:
    """All examples in the stratified interleaved order described in the module docstring."""
    by_label: dict[str | None, list[Example]] = defaultdict(list)
    for example in examples:
        by_label[example.label].append(example)
    keyed = []
    for members in by_label.values():
        members = sorted(members, key=lambda e: _hash_key(seed, e.uid))
        size = len(members)
        for rank, example in enumerate(members):
            keyed.append(((rank + 0.5) / size, _hash_key(seed, example.uid), example))
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [example for _, _, example in keyed]


def stratified_split(
    examples: Sequence[Example], validation_size: int, test_size: int, seed: int, task_name: str = "task"
) -> dict[str, tuple[Example, ...]]:
    """`{"train", "validation", "test"}` -> disjoint tuples of examples (see module docstring).

    Raises `ValueError` when the sizes are negative, uids repeat, or the examples cannot fill
    validation + test and still leave at least one training example.
    """
    if validation_size < 0 or test_size < 0:
        raise ValueError(f"task '{task_name}': validation_size and test_size must be >= 0, "
                         f"got {validation_size} and {test_size}")
    uids = [example.uid for example in examples]
    if len(set(uids)) != len(uids):
        raise ValueError(f"task '{task_name}': example uids are not unique; give every row its own id")
    needed = validation_size + test_size + 1
    if len(examples) < needed:
        raise ValueError(
            f"task '{task_name}' has {len(examples)} examples, fewer than validation_size ({validation_size}) + "
            f"test_size ({test_size}) + 1 for training = {needed}; lower the task's validation_size / test_size "
            "or add examples"
        )
    order = stratified_order(examples, seed)
    return {
        "test": tuple(order[:test_size]),
        "validation": tuple(order[test_size:test_size + validation_size]),
        "train": tuple(order[test_size + validation_size:]),
    }


def assigned_split(examples: Sequence[Example], task_name: str = "task") -> dict[str, tuple[Example, ...]]:
    """Splits given by the data itself (`Example.split`, e.g. a user file's split column)."""
    splits: dict[str, list[Example]] = {name: [] for name in SPLIT_NAMES}
    for example in examples:
        if example.split not in splits:
            raise ValueError(f"task '{task_name}': split value {example.split!r} of example {example.uid} is not "
                             f"one of {', '.join(SPLIT_NAMES)}; fix the split column")
        splits[example.split].append(example)
    return {name: tuple(members) for name, members in splits.items()}
