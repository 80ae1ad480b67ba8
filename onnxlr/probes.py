"""Random probes of a tensor and the unbiased estimate of ``diag(JᵀJ)`` from central differences — the
math of :mod:`onnxlr.runtimes.sensitivity`, plain numpy.

Estimator and why it is unbiased. Write u for the concatenation of all scaled probes ``step_ℓ v_ℓ``
and c_i = J e_i for the column of element i (of any listed tensor, with scale s_i = its step). As
the v's are independent standard normals, ``E[v_i,p z_p] = Σ_a E[v_i,p v_a,p] s_a c_a = s_i c_i``:
each probe gives an unbiased estimate of the column, and two *different* probes are independent, so

    E[v_i,p v_i,q z_pᵀ z_q] = s_i² ‖c_i‖²    for p ≠ q.

The estimate of ``(JᵀJ)_ii`` is the U-statistic over all pairs of probes,
``Σ_{p≠q} v_i,p v_i,q G_pq / (P (P−1) s_i²)`` with ``G = Zᵀ Z`` the (P, P) Gram matrix of the
central differences — exactly unbiased for the linearized model whatever the other tensors do
(their contributions to z are independent of v_i and average out), then summed over the rows of y
and over batches. Sums of unbiased terms stay unbiased; only the final total is clamped at 0 (the
estimate of a unit the output ignores fluctuates around 0).

The textbook forward-only diagonal estimator ``E[(v_i² − 1) ‖z‖²] = 2 (JᵀJ)_ii`` (the fourth
Gaussian moment; the cross terms vanish in expectation) is also unbiased, but it only sees the
length of z, not its direction, so its noise scales with the *total* output energy ‖J u‖² of every
element of every tensor. Its noise is several times the pairwise one at the same cost (docs/benchmarks.md). Hence the U-statistic.

Probe structure (``probe_rows``)
--------------------------------
``"independent"`` (default): v has an independent N(0, 1) per element, as above. Each row's probes
are fresh, so the per-probe noise averages over rows as well as probes; but the pairwise noise grows
with the number of elements probed.

``"shared"``: probe p is ``sign_r · w_(j,p)`` — one N(0, I_n) vector w_p over the units, shared by
every row, times a random ±1 per row drawn once per batch (0 on masked rows). The same U-statistic on
the w's estimates ``‖Σ_r sign_r c_(r,j)‖²`` per unit, whose expectation over the signs is
``Σ_r ‖c_(r,j)‖² = d_j`` (the cross-row terms have zero-mean sign products): still unbiased, with
only n unknowns per tensor instead of rows × n, but no averaging over rows, plus a noise floor from
the signs when rows feed the same outputs (none when they reach disjoint outputs; for a plain mean
pool it is one factor common to all units of a sample, so it leaves their ratios alone).

Which wins depends on elements versus probes (the measured comparison is in docs/benchmarks.md).

Like any random-probe estimate, the noise is absolute (a fraction of the overall scale, growing with
the number of elements — or units, for "shared" — of *all* tensors probed together), so small units
are known relatively less precisely than large ones, and precision grows with probes and batches:
probing many tensors at once with few probes gives noise, not ranking.

Memory: "independent" probes are regenerated from per-(seed, batch, tensor, row-chunk, probe)
generators instead of being stored, so a batch holds one probe per listed tensor, the P central
differences (P × output size) and P × 2¹⁶-element chunks while estimating; "shared" stores P × n
per tensor. The draw for a tensor depends only on its name, not on which other tensors are listed,
so estimating tensors together or apart differs only by the other tensors' share of the noise.
"""

from __future__ import annotations

import numpy as np

_GEN_ELEMENTS = 2**16   # probes are drawn (and redrawn) in row chunks of about this many elements
_PRODUCT_ELEMENTS = 2**22  # bound on the float64 (P, columns) temporary of the quadratic form
_SHARED_KEY = 2**40  # seed component of the shared-rows draws (row chunk indices never reach it)


class Probe:
    """One tensor on one batch: its shape, rows, step and Gaussian draws (regenerated on demand)."""

    def __init__(self, name: str, value: np.ndarray, keep: np.ndarray | None, rel_step: float,
                 seed: int, batch: int, tag: int, shared: int | None = None):
        self.name = name
        self.shape = value.shape if value.ndim else (1,)
        self.dtype = value.dtype
        self.n = self.shape[-1]
        self.rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        self.keep = keep
        self.chunk_rows = max(1, _GEN_ELEMENTS // max(self.n, 1))
        self.key = (seed, batch, tag)
        rms = _rms(value.reshape(self.rows, self.n), keep)
        self.step = rel_step * rms if np.isfinite(rms) and rms > 0 else rel_step
        self.signs = self.units = None
        if shared is not None:  # probe p = signs ⊗ units[p]: a ±1 per row (0 if masked), N(0, I_n) per probe
            rng = np.random.default_rng([*self.key, _SHARED_KEY])
            self.signs = rng.choice(np.array([-1.0, 1.0], np.float32), self.rows)
            if keep is not None:
                self.signs[~keep] = 0.0
            self.units = rng.standard_normal((shared, self.n), dtype=np.float32)

    def chunks(self):
        return range(0, self.rows, self.chunk_rows)

    def draw(self, start: int, p: int) -> np.ndarray:
        """Probe p on rows [start, start + chunk_rows): (rows, n) float32, zero on masked rows."""
        stop = min(self.rows, start + self.chunk_rows)
        rng = np.random.default_rng([*self.key, start // self.chunk_rows, p])
        v = rng.standard_normal((stop - start, self.n), dtype=np.float32)
        if self.keep is not None:
            v[~self.keep[start:stop]] = 0.0
        return v

    def full(self, p: int) -> np.ndarray:
        """Probe p on the whole tensor, (rows, n) float32."""
        if self.units is not None:
            return self.signs[:, None] * self.units[p][None, :]
        v = np.empty((self.rows, self.n), np.float32)
        for start in self.chunks():
            v[start:start + self.chunk_rows] = self.draw(start, p)
        return v

    def estimate(self, H: np.ndarray) -> np.ndarray:
        """(n,) estimate for this batch: Σ_rows Σ_{p≠q} H_pq v_p v_q / step², H the normalized
        off-diagonal Gram (independent rows), or the same form on the shared unit draws."""
        P = H.shape[0]
        if self.units is not None:  # the units' U-statistic estimates ‖Σ_rows sign_r c_(row, j)‖² directly
            W = self.units.astype(np.float64)
            return np.einsum("pj,pj->j", H @ W, W) / self.step**2
        acc = np.zeros(self.n)
        width = max(self.n, (_PRODUCT_ELEMENTS // P) // self.n * self.n)
        for start in self.chunks():
            V = np.stack([self.draw(start, p).reshape(-1) for p in range(P)])
            for s in range(0, V.shape[1], width):
                block = V[:, s:s + width]
                e = np.einsum("pi,pi->i", H @ block, block)
                acc += e.reshape(-1, self.n).sum(axis=0)
        return acc / self.step**2


def _rms(rows: np.ndarray, keep: np.ndarray | None) -> float:
    if keep is not None:
        rows = rows[keep]
    if rows.size == 0:
        return 0.0
    total = 0.0
    step = max(1, _GEN_ELEMENTS // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        r = rows[start:start + step].astype(np.float64)
        total += float(np.sum(r * r))
    return float(np.sqrt(total / rows.size))




def pair_gram(Z: np.ndarray) -> np.ndarray:
    """``H``: the (P, P) Gram of the central differences ``Z`` (P, elements) with its diagonal removed,
    normalized by the P (P − 1) pairs — what :meth:`Probe.estimate` weighs the probe pairs by."""
    P = Z.shape[0]
    G = np.zeros((P, P))
    step = _PRODUCT_ELEMENTS // P or 1
    for s in range(0, Z.shape[1], step):
        block = Z[:, s:s + step].astype(np.float64)
        G += block @ block.T
    np.fill_diagonal(G, 0.0)
    return G / (P * (P - 1))
