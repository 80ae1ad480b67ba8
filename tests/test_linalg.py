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


# --- randomized SVD (linalg.randomized_svd, LazySVD, svd_solver) ---------------------------------


def _power_law(rng, k, n, decay):
    """A (k, n) matrix with singular values i^-decay: decay 0.5 is as slow as trained weights get."""
    m = min(k, n)
    U = np.linalg.qr(rng.standard_normal((k, m)))[0]
    V = np.linalg.qr(rng.standard_normal((n, m)))[0]
    return (U * (1.0 + np.arange(m)) ** -decay) @ V.T


@pytest.mark.parametrize("shape", [(600, 900), (1024, 512)])
@pytest.mark.parametrize("decay", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("share", [0.05, 0.1, 0.2])
def test_randomized_svd_error_is_within_two_percent_of_exact(shape, decay, share):
    """Stated bound: at a rank of at most 20% of min(k, n) (where solver="auto" takes it), the
    Frobenius error is at most 1.02 x the exact truncation error (Eckart–Young; measured worst 1.005),
    the leading half of the singular values kept is within 1% of the exact ones and the last within
    8% (the sketch sees the tail of the kept range least sharply)."""
    rng = np.random.default_rng(int(decay * 10) + shape[0])
    W = _power_law(rng, *shape, decay)
    rank = max(1, int(share * min(shape)))
    U, s, Vt = linalg.randomized_svd(W, rank)
    exact = np.linalg.svd(W, compute_uv=False)
    optimum = np.sqrt(np.sum(exact[rank:] ** 2))
    assert np.linalg.norm(W - (U * s) @ Vt) <= 1.02 * optimum
    np.testing.assert_allclose(s[: rank // 2], exact[: rank // 2], rtol=0.01)
    np.testing.assert_allclose(s, exact[:rank], rtol=0.08)
    np.testing.assert_allclose(U.T @ U, np.eye(rank), atol=1e-8)  # orthonormal bases
    np.testing.assert_allclose(Vt @ Vt.T, np.eye(rank), atol=1e-8)


def test_randomized_svd_is_deterministic_for_a_seed_and_exact_on_low_rank():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((300, 20)) @ rng.standard_normal((20, 400))  # rank 20
    first, again = linalg.randomized_svd(W, 20, seed=5), linalg.randomized_svd(W, 20, seed=5)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    U, s, Vt = first
    np.testing.assert_allclose((U * s) @ Vt, W, atol=1e-9 * np.abs(W).max())


def test_solver_choice_is_automatic_and_reported():
    assert linalg.svd_solver((256, 4096), 10) == "exact"  # small side below RANDOMIZED_MIN_SIZE
    assert linalg.svd_solver((1024, 4096), 100) == "randomized"
    assert linalg.svd_solver((1024, 4096), 200) == "randomized"
    assert linalg.svd_solver((1024, 4096), 300) == "exact"  # rank above RANDOMIZED_MAX_SHARE of 1024
    assert linalg.svd_solver((1024, 4096), None) == "exact"  # the whole spectrum is wanted
    assert linalg.svd_solver((64, 64), 3, "randomized") == "randomized"
    with pytest.raises(ValueError, match="unknown SVD solver"):
        linalg.svd_solver((4, 4), 1, "lanczos")
    rng = np.random.default_rng(1)
    lazy = linalg.LazySVD(_power_law(rng, 700, 600, 0.5))
    assert lazy.solver_for(30) == "randomized"
    kept = lazy.energy_kept(30)
    exact_kept = float(np.sum(lazy.spectrum[:30] ** 2) / np.sum(lazy.spectrum ** 2))  # now exact
    assert lazy.solver_for(30) == "exact" and kept == pytest.approx(exact_kept, rel=1e-3)


def test_factorize_pass_reports_the_solver(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    import onnxlr

    rng = np.random.default_rng(2)
    W = _power_law(rng, 640, 768, 0.5).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 640])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 768])],
                          [numpy_helper.from_array(W, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for ratio, solver in ((0.05, "randomized"), (0.5, "exact")):
        _, report = onnxlr.optimize(model, rank_ratio=ratio, validate=False)
        (layer,) = report.pass_named("factorize_matmul").rewritten
        assert layer.details["svd_solver"] == solver
        optimum = np.sqrt(np.sum(np.linalg.svd(W.astype(np.float64), compute_uv=False)[layer.details["rank"]:] ** 2))
        assert layer.details["weight_error"] * np.linalg.norm(W) <= 1.02 * optimum + 1e-6
