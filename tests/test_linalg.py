"""Properties of the plain-numpy factorization math (no ONNX)."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxlr import linalg


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 24), n=st.integers(1, 24), seed=st.integers(0, 2**16))
def test_full_rank_factorization_is_exact(k, n, seed):
    W = np.random.default_rng(seed).standard_normal((k, n))
    A, B = linalg.truncated_svd(W, min(k, n))
    assert A.shape == (k, min(k, n)) and B.shape == (min(k, n), n)
    np.testing.assert_allclose(A @ B, W, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(2, 20), n=st.integers(2, 20), seed=st.integers(0, 2**16), data=st.data())
def test_truncation_error_matches_discarded_spectrum(k, n, seed, data):
    W = np.random.default_rng(seed).standard_normal((k, n))
    r = data.draw(st.integers(1, min(k, n)))
    A, B = linalg.truncated_svd(W, r)
    s = np.linalg.svd(W, compute_uv=False)
    # Eckart–Young: the error is exactly the norm of the discarded singular values
    assert np.linalg.norm(W - A @ B) == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)), abs=1e-9)
    assert linalg.relative_error_at_rank(s, r) == pytest.approx(np.linalg.norm(W - A @ B) / np.linalg.norm(W), abs=1e-9)


def test_factors_share_the_singular_values_evenly():
    W = np.diag([9.0, 4.0, 1.0])
    A, B = linalg.truncated_svd(W, 2)
    np.testing.assert_allclose(np.linalg.norm(A, axis=0), [3.0, 2.0])
    np.testing.assert_allclose(np.linalg.norm(B, axis=1), [3.0, 2.0])


def test_break_even_and_savings():
    assert linalg.break_even_rank(384, 384) == 192
    assert not linalg.saves_parameters(384, 384, 192)
    assert linalg.saves_parameters(384, 384, 191)
    assert linalg.saves_parameters(384, 1536, 307) and not linalg.saves_parameters(384, 1536, 308)


@pytest.mark.parametrize("k,n,ratio,expected", [(384, 1536, 0.5, 192), (10, 7, 0.1, 1), (10, 7, 1.0, 7),
                                                 (100, 30, 0.34, 11), (5, 5, 0.01, 1)])
def test_rank_for_ratio(k, n, ratio, expected):
    assert linalg.rank_for_ratio(k, n, ratio) == expected == max(1, math.ceil(ratio * min(k, n)))


def test_rank_for_energy_is_the_smallest_rank_reaching_the_share():
    s = np.array([3.0, 2.0, 1.0, 0.0])  # squared: 9, 4, 1 of 14
    assert linalg.rank_for_energy(s, 9 / 14) == 1
    assert linalg.rank_for_energy(s, 9 / 14 + 1e-6) == 2
    assert linalg.rank_for_energy(s, 0.99) == 3
    assert linalg.rank_for_energy(s, 1.0) == 3  # the zero singular value is never needed


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_invalid_ratio_and_energy_are_rejected(bad):
    with pytest.raises(ValueError):
        linalg.rank_for_ratio(4, 4, bad)
    with pytest.raises(ValueError):
        linalg.rank_for_energy(np.ones(3), bad)


def test_rank_out_of_range_is_rejected():
    with pytest.raises(ValueError):
        linalg.truncated_svd(np.ones((3, 4)), 4)
