"""Properties of the calibrated (data-aware) factorizations in ``onnxlr.linalg``.

Orientation: ``Y = X @ W`` with ``X`` (N, k) and ``W`` (k, n); ``G = X^T X``. Random inputs are
correlated (``X = Z @ L`` with a mixing ``L`` whose singular values decay over 1.5 decades) and, when
``deficient`` is drawn, have fewer rows than columns and/or a dead feature, so ``G`` is singular.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxlr import linalg

SETTINGS = settings(max_examples=40, deadline=None)


def correlated_inputs(rng: np.random.Generator, N: int, k: int, *, offset: float = 0.0) -> np.ndarray:
    """(N, k) rows with correlated columns: ``Z @ L`` with ``L = Q1 diag(10**-linspace(0, 1.5)) Q2^T``."""
    Q1, _ = np.linalg.qr(rng.standard_normal((k, k)))
    Q2, _ = np.linalg.qr(rng.standard_normal((k, k)))
    L = (Q1 * 10.0 ** -np.linspace(0.0, 1.5, k)) @ Q2.T
    return rng.standard_normal((N, k)) @ L + offset * rng.standard_normal(k)


def objective(W, A, B, G) -> float:
    """Squared calibrated error ``tr((W - AB)^T G (W - AB))``."""
    E = W - A @ B
    return float(np.sum(E * (G @ E)))


@st.composite
def problems(draw, *, deficient=None, min_dim=1, max_dim=10):
    """(W, X) with W (k, n) standard normal and X correlated; optionally rank-deficient."""
    k = draw(st.integers(min_dim, max_dim))
    n = draw(st.integers(min_dim, max_dim))
    seed = draw(st.integers(0, 2**32 - 1))
    if deficient is None:
        deficient = draw(st.booleans())
    rng = np.random.default_rng(seed)
    if deficient:
        N = draw(st.integers(1, max(1, k - 1)))
        X = correlated_inputs(rng, N, k)
        if k > 1 and draw(st.booleans()):
            X[:, draw(st.integers(0, k - 1))] = 0.0  # a dead feature
    else:
        N = draw(st.integers(2 * k + 2, 4 * k + 8))
        X = correlated_inputs(rng, N, k)
    W = rng.standard_normal((k, n))
    return W, X


def all_methods(W, X, rank):
    """Every factorization method under test, each returning (A, B)."""
    G = X.T @ X
    mean_abs = np.abs(X).mean(axis=0)
    rng = np.random.default_rng(1234)
    row_w = rng.uniform(0.1, 2.0, W.shape[0])
    col_w = rng.uniform(0.1, 2.0, W.shape[1])
    row_w[0] = 0.0  # exercise the zero-weight guard
    A_i, B_i, _ = linalg.isvt(W, G, rank)
    return {
        "svd": linalg.truncated_svd(W, rank),
        "whitened": linalg.whitened_svd(W, G, rank),
        "asvd": linalg.asvd(W, mean_abs, rank),
        "fisher": linalg.fisher_svd(W, rank, row_weights=row_w, col_weights=col_w),
        "isvt": (A_i, B_i),
    }


# -- full rank ------------------------------------------------------------------------------------


@SETTINGS
@given(problem=problems())
def test_full_rank_every_method_reproduces_W(problem):
    W, X = problem
    r = min(W.shape)
    for name, (A, B) in all_methods(W, X, r).items():
        assert A.shape == (W.shape[0], r) and B.shape == (r, W.shape[1]), name
        assert np.all(np.isfinite(A)) and np.all(np.isfinite(B)), name
        np.testing.assert_allclose(A @ B, W, rtol=0, atol=1e-7 * max(1.0, np.abs(W).max()), err_msg=name)


# -- whitening ------------------------------------------------------------------------------------


@SETTINGS
@given(problem=problems(deficient=True), rel_eps=st.sampled_from([1e-3, 1e-6, 1e-9]))
def test_whitening_factor_handles_singular_gram(problem, rel_eps):
    _, X = problem
    G = X.T @ X
    k = G.shape[0]
    S, S_inv = linalg.whitening_factor(G, rel_eps=rel_eps)
    assert np.all(np.isfinite(S)) and np.all(np.isfinite(S_inv))
    np.testing.assert_allclose(S_inv @ S, np.eye(k), atol=1e-8)
    lam, Q = np.linalg.eigh(G)
    top = lam.max()
    G_clamped = (Q * np.maximum(lam, rel_eps * top)) @ Q.T
    np.testing.assert_allclose(S @ S.T, G_clamped, atol=1e-10 * top)
    # the clamp moves G by at most rel_eps * max eigenvalue (plus round-off) and only upwards
    delta = np.linalg.eigvalsh(S @ S.T - G)
    assert delta.max() <= rel_eps * top * (1 + 1e-6) + 1e-12 * top
    assert delta.min() >= -1e-12 * top
    assert np.linalg.eigvalsh(S @ S.T).min() > 0.5 * rel_eps * top  # strictly positive definite


def test_whitening_factor_zero_and_dead_feature_grams():
    S, S_inv = linalg.whitening_factor(np.zeros((3, 3)))
    np.testing.assert_array_equal(S, np.eye(3))
    np.testing.assert_array_equal(S_inv, np.eye(3))
    G = np.diag([4.0, 0.0, 1.0])  # a dead feature
    S, S_inv = linalg.whitening_factor(G, rel_eps=1e-6)
    np.testing.assert_allclose(S @ S.T, np.diag([4.0, 4e-6, 1.0]), atol=1e-15)
    with pytest.raises(ValueError):
        linalg.whitening_factor(G, rel_eps=0.0)
    with pytest.raises(ValueError):
        linalg.whitening_factor(np.full((2, 2), np.nan))


@SETTINGS
@given(problem=problems(deficient=False, min_dim=2), data=st.data())
def test_whitened_svd_reaches_closed_form_optimum(problem, data):
    W, X = problem
    G = X.T @ X
    r = data.draw(st.integers(1, min(W.shape)))
    A, B = linalg.whitened_svd(W, G, r, rel_eps=1e-12)
    s = linalg.whitened_spectrum(W, G, rel_eps=1e-12)
    XW = X @ W
    scale = np.sum(XW**2)
    err2 = np.sum((X @ (W - A @ B)) ** 2)
    # optimum = discarded calibrated spectrum; the calibrated spectrum is the spectrum of X W
    assert err2 == pytest.approx(np.sum(s[r:] ** 2), rel=1e-7, abs=1e-10 * scale)
    np.testing.assert_allclose(s, np.linalg.svd(XW, compute_uv=False)[: s.size], rtol=1e-7, atol=1e-9 * np.sqrt(scale))
    # brute force: X has full column rank, so the best rank-r approximation of X W is reachable
    U, sv, Vt = np.linalg.svd(XW, full_matrices=False)
    best2 = np.sum((XW - (U[:, :r] * sv[:r]) @ Vt[:r]) ** 2)
    assert err2 == pytest.approx(best2, rel=1e-7, abs=1e-10 * scale)
    # and B is already the least-squares output factor for this A
    B_ls = np.linalg.lstsq(X @ A, XW, rcond=None)[0]
    assert err2 == pytest.approx(np.sum((XW - X @ A @ B_ls) ** 2), rel=1e-7, abs=1e-10 * scale)
    assert linalg.calibration_error(W, A, B, G) == pytest.approx(math.sqrt(err2 / scale), rel=1e-6, abs=1e-7)
    assert linalg.relative_error_at_rank(s, r) == pytest.approx(math.sqrt(err2 / scale), rel=1e-6, abs=1e-7)


def test_whitened_spectrum_with_identity_gram_is_plain_spectrum():
    W = np.random.default_rng(3).standard_normal((7, 5))
    np.testing.assert_allclose(linalg.whitened_spectrum(W, np.eye(7)), np.linalg.svd(W, compute_uv=False))


@SETTINGS
@given(problem=problems())
def test_whitened_is_never_worse_than_other_methods(problem):
    W, X = problem
    G = X.T @ X
    rel_eps = 1e-6
    top = max(np.linalg.eigvalsh(G).max(), 0.0)
    scale = np.sum((X @ W) ** 2)
    for r in range(1, min(W.shape) + 1):
        methods = all_methods(W, X, r)
        ours = objective(W, *methods["whitened"], G)
        for name in ("svd", "asvd", "fisher"):
            A, B = methods[name]
            theirs = objective(W, A, B, G)
            # whitened is exactly optimal for the clamped Gram G + E, 0 <= E <= rel_eps * top; on the raw
            # G it can lose at most rel_eps * top * ||W - AB||^2 (zero when G is non-singular)
            slack = rel_eps * top * np.sum((W - A @ B) ** 2) + 1e-9 * scale + 1e-12
            assert ours <= theirs + slack, (name, r, ours, theirs)


# -- output-factor refit ------------------------------------------------------------------------------


@SETTINGS
@given(problem=problems())
def test_refit_never_increases_the_objective(problem):
    W, X = problem
    G = X.T @ X
    top = max(np.linalg.eigvalsh(G).max(), 0.0)
    for r in range(1, min(W.shape) + 1):
        for name, (A, B) in all_methods(W, X, r).items():
            B_new = linalg.refit_output_factor(W, A, G)
            assert B_new.shape == B.shape and np.all(np.isfinite(B_new))
            before = objective(W, A, B, G)
            after = objective(W, A, B_new, G)
            # round-off of the G-only objective grows with ||W - AB|| along directions G does not see
            noise = 1e-10 * top * (np.sum((W - A @ B_new) ** 2) + np.sum(W**2)) + 1e-12
            assert after <= before + noise, (name, r, before, after)
            # explicit check with X: the refit is the least-squares solution
            B_ls = np.linalg.lstsq(X @ A, X @ W, rcond=None)[0]
            assert np.sum((X @ (W - A @ B_new)) ** 2) <= np.sum((X @ (W - A @ B_ls)) ** 2) + noise


@pytest.mark.parametrize("seed", range(8))
def test_refit_strictly_improves_plain_svd_on_correlated_data(seed):
    rng = np.random.default_rng(seed)
    k, n = 12, 9
    X = correlated_inputs(rng, 200, k)
    W = rng.standard_normal((k, n))
    G = X.T @ X
    for r in (1, 3, 6):
        A, B = linalg.truncated_svd(W, r)
        before = linalg.calibration_error(W, A, B, G)
        after = linalg.calibration_error(W, A, linalg.refit_output_factor(W, A, G), G)
        assert after < before * (1 - 1e-3), (r, before, after)
        # but the refit of plain SVD's A stays above the calibrated optimum
        assert after >= linalg.calibration_error(W, *linalg.whitened_svd(W, G, r), G) - 1e-12


@SETTINGS
@given(problem=problems(), data=st.data())
def test_refit_cross_equals_plain_when_inputs_match(problem, data):
    W, X = problem
    G = X.T @ X
    r = data.draw(st.integers(1, min(W.shape)))
    A, _ = linalg.truncated_svd(W, r)
    B_plain = linalg.refit_output_factor(W, A, G)
    B_cross = linalg.refit_output_factor_cross(W, A, G, G)
    # both are the minimum-norm least-squares factor; agreement is limited by the conditioning of X A
    np.testing.assert_allclose(B_cross, B_plain, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(B_plain).max()))
    np.testing.assert_allclose(X @ A @ B_cross, X @ A @ B_plain, atol=1e-9 * max(1.0, np.abs(X @ W).max()))


@SETTINGS
@given(problem=problems(deficient=False, min_dim=2), data=st.data())
def test_refit_cross_matches_the_original_output(problem, data):
    W, X = problem
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    X_hat = X + 0.1 * rng.standard_normal(X.shape)  # the compressed model's (perturbed) input
    r = data.draw(st.integers(1, min(W.shape)))
    A, _ = linalg.truncated_svd(W, r)
    B = linalg.refit_output_factor_cross(W, A, X_hat.T @ X_hat, X_hat.T @ X)
    B_ls = np.linalg.lstsq(X_hat @ A, X @ W, rcond=None)[0]
    XW = X @ W
    got = np.sum((XW - X_hat @ A @ B) ** 2)
    best = np.sum((XW - X_hat @ A @ B_ls) ** 2)
    assert got == pytest.approx(best, rel=1e-7, abs=1e-10 * np.sum(XW**2))
    # and it beats ignoring the input drift (refitting against X_hat's own output)
    B_naive = linalg.refit_output_factor(W, A, X_hat.T @ X_hat)
    assert got <= np.sum((XW - X_hat @ A @ B_naive) ** 2) + 1e-10 * np.sum(XW**2)


def test_input_factor_refit_is_data_independent():
    """The docstring's claim: with B fixed, A = W B^T (B B^T)^-1 is stationary for every G."""
    rng = np.random.default_rng(5)
    W = rng.standard_normal((8, 6))
    _, B = linalg.truncated_svd(W, 3)
    A = W @ B.T @ np.linalg.inv(B @ B.T)
    for seed in range(3):
        X = correlated_inputs(np.random.default_rng(seed), 40, 8)
        G = X.T @ X
        np.testing.assert_allclose(G @ (W - A @ B) @ B.T, 0.0, atol=1e-9 * np.abs(G).max())


# -- bias correction ------------------------------------------------------------------------------


@SETTINGS
@given(problem=problems(), data=st.data())
def test_bias_correction_zeroes_the_mean_output_error(problem, data):
    W, X = problem
    X = X + data.draw(st.floats(-3, 3)) * np.linspace(-1, 1, X.shape[1])  # non-zero mean input
    r = data.draw(st.integers(1, min(W.shape)))
    A, B = linalg.truncated_svd(W, r)
    b = np.linspace(-1, 1, W.shape[1])
    delta = linalg.bias_correction(W, A, B, X.mean(axis=0))
    assert delta.shape == (W.shape[1],)
    err = (X @ W + b) - (X @ A @ B + b + delta)
    np.testing.assert_allclose(err.mean(axis=0), 0.0, atol=1e-10 * max(1.0, np.abs(X @ W).max()))
    if r < min(W.shape):
        uncorrected = (X @ W) - (X @ A @ B)
        assert np.abs(err.mean(axis=0)).max() <= np.abs(uncorrected.mean(axis=0)).max() + 1e-12


# -- ISVT -----------------------------------------------------------------------------------------


@SETTINGS
@given(problem=problems(), data=st.data())
def test_isvt_converges_and_matches_whitened(problem, data):
    W, X = problem
    G = X.T @ X
    r = data.draw(st.integers(1, min(W.shape)))
    A, B, info = linalg.isvt(W, G, r)
    assert info["converged"]
    assert 1 <= info["iterations"] <= 50 and len(info["objective_history"]) == info["iterations"]
    assert info["soft_rank"] <= r
    hist = np.array(info["objective_history"])
    assert np.all(np.diff(hist) <= 1e-15)  # the soft iterates only get closer to X W
    ours = linalg.calibration_error(W, A, B, G)
    closed = linalg.calibration_error(W, *linalg.whitened_svd(W, G, r), G)
    assert ours <= closed + 1e-8


def test_isvt_reports_non_convergence():
    rng = np.random.default_rng(0)
    X = correlated_inputs(rng, 60, 10)
    W = rng.standard_normal((10, 8))
    _, _, info = linalg.isvt(W, X.T @ X, 3, max_iter=2)
    assert not info["converged"] and info["iterations"] == 2
    _, _, info = linalg.isvt(W, X.T @ X, 3)
    assert info["converged"] and info["tau"] >= linalg.whitened_spectrum(W, X.T @ X)[3]


# -- weighted SVDs and validation -----------------------------------------------------------------


@SETTINGS
@given(problem=problems(deficient=False), data=st.data())
def test_fisher_svd_is_optimal_for_its_weighted_objective(problem, data):
    W, _ = problem
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    dr = rng.uniform(0.2, 3.0, W.shape[0])
    dc = rng.uniform(0.2, 3.0, W.shape[1])
    r = data.draw(st.integers(1, min(W.shape)))
    A, B = linalg.fisher_svd(W, r, row_weights=dr, col_weights=dc)
    s = np.linalg.svd(dr[:, None] * W * dc, compute_uv=False)
    err = np.linalg.norm(dr[:, None] * (W - A @ B) * dc)
    assert err == pytest.approx(np.sqrt(np.sum(s[r:] ** 2)), rel=1e-7, abs=1e-9)
    # unit weights give plain SVD; ASVD is fisher_svd with row weights mean_abs ** alpha
    np.testing.assert_allclose(np.matmul(*linalg.fisher_svd(W, r)), np.matmul(*linalg.truncated_svd(W, r)), atol=1e-10)
    A2, B2 = linalg.asvd(W, dr**2, r, alpha=0.5)
    np.testing.assert_allclose(A2 @ B2, np.matmul(*linalg.fisher_svd(W, r, row_weights=dr)), atol=1e-9)


def test_validation_errors():
    W = np.ones((4, 3))
    G = np.eye(4)
    for bad_rank in (0, 4, 1.5):
        with pytest.raises(ValueError):
            linalg.whitened_svd(W, G, bad_rank)
    with pytest.raises(ValueError):
        linalg.whitened_svd(W, np.eye(3), 1)
    with pytest.raises(ValueError):
        linalg.asvd(W, -np.ones(4), 1)
    with pytest.raises(ValueError):
        linalg.fisher_svd(W, 1, col_weights=np.ones(4))
    with pytest.raises(ValueError):
        linalg.bias_correction(W, np.ones((4, 2)), np.ones((1, 3)), np.zeros(4))
    assert linalg.calibration_error(W, np.zeros((4, 1)), np.zeros((1, 3)), np.zeros((4, 4))) == 0.0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), data=st.data())
def test_output_weighted_whitened_svd_is_exact_at_full_rank_and_optimal(seed, data):
    rng = np.random.default_rng(seed)
    k, n = data.draw(st.integers(2, 10)), data.draw(st.integers(2, 10))
    X = rng.standard_normal((40, k)) @ rng.standard_normal((k, k))
    W = rng.standard_normal((k, n))
    d = rng.random(n) + 0.1
    G = X.T @ X
    fit = linalg.WhitenedSVD.fit(W, linalg.clamped_eigh(G), col_weights=d)
    A, B = fit.factors(min(k, n))
    np.testing.assert_allclose(A @ B, W, atol=1e-6 * np.abs(W).max())
    r = data.draw(st.integers(1, min(k, n)))
    A, B = fit.factors(r)
    weighted = np.linalg.norm(X @ (W - A @ B) * d)
    # optimal: equals the discarded tail of the weighted calibrated spectrum, exactly for the clamped
    # Gram the fit uses (a raw Gram with eigenvalues under the 1e-6 floor differs by ~1e-5: seed 444)
    lam, Q = linalg.clamped_eigh(G)
    clamped = np.linalg.norm(np.sqrt(lam)[:, None] * (Q.T @ (W - A @ B)) * d)
    assert clamped == pytest.approx(np.sqrt(np.sum(fit.s[r:] ** 2)), rel=1e-7, abs=1e-8)
    # the raw Gram agrees with the clamped one only when the floor clamps (almost) nothing: seed 229,
    # a near-singular mixing matrix, leaves eigenvalues under it and the two errors part by 0.3%
    raw = np.linalg.eigvalsh(G)
    if raw.min() > 1e-5 * raw.max():  # ten times the floor
        assert weighted == pytest.approx(clamped, rel=1e-4, abs=1e-8)
    # ... and no worse than the unweighted whitened factors measured the same way
    A0, B0 = linalg.whitened_svd(W, G, r)
    assert weighted <= np.linalg.norm(X @ (W - A0 @ B0) * d) * (1 + 1e-6) + 1e-9
