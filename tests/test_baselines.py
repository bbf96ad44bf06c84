"""Placement baselines (dtr_core/search/baselines.py): valid, sized, deterministic layer sets."""

from __future__ import annotations

import pytest

from dtr_core.search.baselines import distill_loss_layers, local_importance_layers, random_layers, uniform_layers


def _valid(layers, k, num_layers, pool=None):
    assert len(layers) == k and list(layers) == sorted(set(layers))
    assert all(layer in (pool if pool is not None else range(num_layers)) for layer in layers)


@pytest.mark.parametrize("num_layers,k", [(30, 10), (30, 1), (30, 30), (7, 3), (4, 0), (28, 27)])
def test_uniform_and_random_are_valid(num_layers, k):
    _valid(uniform_layers(num_layers, k), k, num_layers)
    _valid(random_layers(num_layers, k, seed=5), k, num_layers)


def test_uniform_interleaves():
    assert uniform_layers(30, 10) == (1, 4, 7, 10, 13, 16, 19, 22, 25, 28)
    assert uniform_layers(8, 4) == (1, 3, 5, 7)
    assert uniform_layers(10, 2, available=[0, 1, 2, 3, 9]) == (1, 3)  # spread over the available ones


def test_random_is_seeded():
    assert random_layers(30, 8, seed=1) == random_layers(30, 8, seed=1)
    assert random_layers(30, 8, seed=1) != random_layers(30, 8, seed=2)
    picks = random_layers(10, 3, seed=0, available=[2, 4, 6, 8])
    _valid(picks, 3, 10, pool=[2, 4, 6, 8])


def test_rankings():
    scores = {0: 0.5, 1: 0.9, 2: 0.8, 3: 0.9, 4: 0.1}
    assert local_importance_layers(scores, 2, 5) == (1, 3)
    assert local_importance_layers(scores, 3, 5) == (1, 2, 3)
    losses = {0: 0.3, 1: 0.1, 2: 0.1, 3: 0.7}  # layer 4 failed: never chosen
    assert distill_loss_layers(losses, 1, 5) == (1,)  # tie 1/2 -> lower layer
    assert distill_loss_layers(losses, 4, 5) == (0, 1, 2, 3)


@pytest.mark.parametrize(
    "call",
    [
        lambda: uniform_layers(10, 11),
        lambda: uniform_layers(10, -1),
        lambda: uniform_layers(10, 2.0),
        lambda: random_layers(10, 3, available=[1, 2]),
        lambda: random_layers(10, 1, available=[10]),
        lambda: local_importance_layers({0: 1.0}, 2, 4),
        lambda: distill_loss_layers({0: 1.0, 1: 2.0}, True, 4),
        lambda: uniform_layers(0, 0),
    ],
)
def test_bad_k_raises(call):
    with pytest.raises(ValueError):
        call()
