"""The greedy rank allocator on hand-made spectra."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxlr.allocate import LayerCurve, greedy_ranks


def test_budget_goes_to_the_layer_whose_spectrum_is_flat():
    steep = LayerCurve(64, 64, 0.5 ** np.arange(64))  # almost all energy in a few values
    flat = LayerCurve(64, 64, np.ones(64))
    ranks = greedy_ranks([steep, flat], budget=0.75 * 2 * 64 * 64, step=4)
    assert ranks[1] == 64  # the flat layer stays dense
    assert ranks[0] < 32
    assert steep.cost(ranks[0]) + flat.cost(ranks[1]) <= 0.75 * 2 * 64 * 64


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 1000), frac=st.floats(0.2, 0.99))
def test_budget_is_met_and_ranks_are_valid(seed, frac):
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(rng.integers(1, 6)):
        k, n = rng.integers(4, 40, size=2)
        layers.append(LayerCurve(int(k), int(n), np.sort(rng.random(min(k, n)))[::-1]))
    dense = sum(layer.k * layer.n for layer in layers)
    budget = frac * dense
    if sum(layer.cost(1) for layer in layers) > budget:
        with pytest.raises(ValueError):
            greedy_ranks(layers, budget)
        return
    ranks = greedy_ranks(layers, budget, step=2)
    assert sum(layer.cost(r) for layer, r in zip(layers, ranks)) <= budget
    assert all(1 <= r <= layer.dense_rank for layer, r in zip(layers, ranks))


def test_full_budget_keeps_everything_dense():
    layers = [LayerCurve(10, 20, np.ones(10)), LayerCurve(30, 5, np.ones(5))]
    assert greedy_ranks(layers, budget=10 * 20 + 30 * 5) == [10, 5]
