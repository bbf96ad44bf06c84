"""Placement baselines the greedy search is compared against (paper Fig. 4 / Table 4), as pure functions.

Each returns a sorted tuple of k layer indices to make linear. `available` restricts the choice to layers
with a usable student (default: all). Rankings break ties by the lower layer index, like the greedy search.
- `uniform_layers`: spread k layers evenly over the available ones (interleaving full and linear).
- `random_layers`: k layers drawn without replacement from a seeded `random.Random`.
- `local_importance_layers`: rank once by the single-swap score in the base model (highest = least drop);
  the paper's "local layer importance" baseline. Takes the single-swap scores (round 0 of the greedy search).
- `distill_loss_layers`: the k layers with the lowest normalised distillation loss (phase 1 only, no evaluation).
The paper's fourth baseline (static "Impact Score" from linear probes) is not implemented.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

__all__ = ["distill_loss_layers", "local_importance_layers", "random_layers", "uniform_layers"]


def _pool(num_layers: int, available: Iterable[int] | None) -> list[int]:
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    pool = sorted(set(range(num_layers) if available is None else (int(layer) for layer in available)))
    if any(not 0 <= layer < num_layers for layer in pool):
        raise ValueError(f"available layers {pool} out of range for a {num_layers}-layer model")
    return pool


def _check_k(k: int, size: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {k!r}")
    if not 0 <= k <= size:
        raise ValueError(f"k must be in [0, {size}] (layers available), got {k}")


def uniform_layers(num_layers: int, k: int, available: Iterable[int] | None = None) -> tuple[int, ...]:
    """Evenly interleaved: position floor((i + 1/2) * n / k) of the n available layers, i = 0..k-1."""
    pool = _pool(num_layers, available)
    _check_k(k, len(pool))
    n = len(pool)
    # (2i + 1) * n // (2k) is floor((i + 1/2) * n / k) in exact integers: strictly increasing for k <= n.
    return tuple(pool[(2 * i + 1) * n // (2 * k)] for i in range(k))


def random_layers(num_layers: int, k: int, seed: int = 0, available: Iterable[int] | None = None) -> tuple[int, ...]:
    """k layers sampled without replacement with `random.Random(seed)`."""
    pool = _pool(num_layers, available)
    _check_k(k, len(pool))
    return tuple(sorted(random.Random(seed).sample(pool, k)))


def _top_k(values: Mapping[int, float], k: int, num_layers: int, higher_is_better: bool) -> tuple[int, ...]:
    pool = _pool(num_layers, values.keys())
    _check_k(k, len(pool))
    sign = -1.0 if higher_is_better else 1.0
    ranked = sorted(pool, key=lambda layer: (sign * float(values[layer]), layer))
    return tuple(sorted(ranked[:k]))


def local_importance_layers(single_swap_scores: Mapping[int, float], k: int, num_layers: int) -> tuple[int, ...]:
    """The k layers whose single swap into the full model scores highest (smallest drop)."""
    return _top_k(single_swap_scores, k, num_layers, higher_is_better=True)


def distill_loss_layers(normalised_losses: Mapping[int, float], k: int, num_layers: int) -> tuple[int, ...]:
    """The k layers whose students reached the lowest normalised distillation loss."""
    return _top_k(normalised_losses, k, num_layers, higher_is_better=False)
