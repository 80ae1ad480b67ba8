"""Output sensitivity of intermediate tensors, forward only: the Fisher-like diagonal for ``fisher``.

For a layer output y of shape (..., n) and the model output f (every float graph output, flattened
and concatenated per batch), let J = ∂f/∂y over one batch (f's elements × y's elements). The
sensitivity of unit j is

    d_j = Σ_rows ‖J e_(row, j)‖² = Σ_rows (JᵀJ)_(row j, row j)

summed over every row of y (all leading dimensions: samples, tokens) and over every batch: the
expected squared change of the output when unit j is perturbed, i.e. the diagonal of the output
metric in ``KL ≈ ½ δᵀ F δ`` (FWSVD, Hsu et al. 2022, ICLR; output-divergence metric, Shumaylov et
al. 2025). `onnxlr.linalg.fisher_svd` takes ``col_weights = sqrt(d)`` for a weight whose output is y.
No gradient is taken: J is only ever applied to vectors, by finite differences in ONNX Runtime.

Method
------
A *copy* of the model reroutes every listed tensor through ``y = Add(y_unprobed, probe_y)``, where
``probe_y`` is a new graph input of y's element type and unknown rank (names never collide with
any name in the model); every consumer, and the graph output if y is one, sees the perturbed y.
Listed *model inputs* are perturbed in the feeds instead. Per batch:

1. one base run with every probe a scalar 0 (Add broadcasts it): the listed tensors are fetched
   (their shapes, and ``step_ℓ = rel_step · RMS(y_ℓ)`` over the unmasked rows; ``rel_step`` itself
   if that RMS is 0) and the float outputs identified (non-float outputs are ignored; output
   elements that are already non-finite here are left out of f);
2. for p = 1..P (``probes``): draw v_ℓ,p ~ N(0, I) of y_ℓ's shape for **every** listed tensor at
   once (zero on masked rows), run with probes ``+step_ℓ v_ℓ,p`` and ``−step_ℓ v_ℓ,p`` and take the
   central difference ``z_p = (f(+) − f(−)) / 2 = Σ_ℓ J_ℓ (step_ℓ v_ℓ,p) + O(step³)`` — the
   antithetic pair cancels the second-order (curvature) term.

Cost: **1 + 2·probes ONNX Runtime runs per batch**, one session for the whole call (a second one,
run once, only when shape inference cannot tell a tensor's element type).

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
element of every tensor. Simulated on the test's linear model (4 rows, 8 units, 6 outputs, 400
probes) its mean per-unit error is ~57 % of the mean d (25 % even with a leave-one-out baseline
subtracted from ‖z‖²), against 8 % for the pairwise U-statistic at the same cost; the gap widens
with the number of elements. Hence the U-statistic.

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

Which wins depends on elements versus probes. Measured (mean per-unit error / mean d, 10 seeds):
the tests' token-level linear model, 32 rows × 8 units, 400 probes: independent 3 %, shared 13 %;
the same model mean-pooled over 8 tokens, 4 batches × 16 samples, 200 probes: 5 % vs 14 %. On
MiniLM (64 tokens × 384 units per sentence into a pooled 384-d embedding), last FFN output alone,
2 batches × 16 sentences × 256 probes, two seeds' estimates correlate across units at 0.05 with
independent probes and 0.53 with shared ones (seed-to-seed difference 53 % vs 18 % of the mean; the
estimated spread across units there is only ~20 % of the mean, hence the modest correlation).

Like any random-probe estimate, the noise is absolute (a fraction of the overall scale, growing with
the number of elements — or units, for "shared" — of *all* tensors probed together), so small units
are known relatively less precisely than large ones, and precision grows with probes and batches.
Probing many tensors at once with few probes gives noise, not ranking. Seed-to-seed correlation of
the per-unit estimates over 64 calibration samples (batches of 8): MNIST LeNet, its two hidden Gemm
outputs probed together with the logits, 0.06 at 32 probes, 0.5 at 128, 0.91 / 0.97 at 512 (either
probe structure); MiniLM, all 36 MatMul outputs together, ~0 at 32 probes (half the units clamped
to 0). Spend probes (or group fewer tensors per call) accordingly.

Memory: "independent" probes are regenerated from per-(seed, batch, tensor, row-chunk, probe)
generators instead of being stored, so a batch holds one probe per listed tensor, the P central
differences (P × output size) and P × 2¹⁶-element chunks while estimating; "shared" stores P × n
per tensor. The draw for a tensor depends only on its name, not on which other tensors are listed,
so estimating tensors together or apart differs only by the other tensors' share of the noise.

Masks: when ``mask_input`` is given (a model input of shape (batch, seq), 0 = padding) and a tensor's
leading dimensions equal the mask's shape — or it is 2-D with batch·seq rows, the tokens already
flattened — its padding rows are never perturbed and contribute nothing (nor to the step's RMS).
``batches`` follows the `onnxlr.runtimes.stats` contract (callable, re-iterable or one-shot iterator;
read once here). ``model`` is not modified.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from itertools import chain

import numpy as np
import onnx
from onnx import helper

from onnxlr.errors import OnnxlrError
from onnxlr.runtimes.feeds import model_inputs
from onnxlr.runtimes.providers import make_session
from onnxlr.runtimes.stats import BatchesLike, _BatchSource

try:  # ORT's exception for bad feeds (wrong shape, wrong type, unknown input name)
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as _OrtInvalidArgument
except ImportError:  # pragma: no cover - layout of older onnxruntime builds
    _OrtInvalidArgument = ValueError

_GEN_ELEMENTS = 2**16   # probes are drawn (and redrawn) in row chunks of about this many elements
_PRODUCT_ELEMENTS = 2**22  # bound on the float64 (P, columns) temporary of the quadratic form
_PROBE_ROWS = ("independent", "shared")
_SHARED_KEY = 2**40  # seed component of the shared-rows draws (row chunk indices never reach it)

Batch = Mapping[str, np.ndarray]


def output_sensitivity(model: onnx.ModelProto, tensors: Sequence[str], batches: BatchesLike, *,
                       probes: int = 32, rel_step: float = 1e-3, seed: int = 0, threads: int = 2,
                       mask_input: str | None = None, probe_rows: str = "independent") -> dict[str, np.ndarray]:
    """Per-unit output sensitivity ``d_j = Σ_rows diag(JᵀJ)`` of each tensor (see module docstring).

    tensors: node outputs or float model inputs, of shape (..., n).
    batches: feeds ``{input name: array}``; a callable returning an iterable, or an iterable.
    probes: Gaussian probes per batch (at least 2); each costs two ORT runs.
    rel_step: finite-difference step relative to the RMS of each tensor on the batch.
    seed: non-negative integer; the same seed gives the same result.
    mask_input: model input (batch, seq), 0 = padding row (not perturbed, not counted).
    probe_rows: ``"independent"`` (every element its own Gaussian) or ``"shared"`` (one Gaussian over
        the units per probe, times a random sign per row fixed for the batch); see module docstring.
    Returns {tensor: (n,) float64, non-negative}, in the order asked.
    """
    _check_int(probes, "probes", 2)
    _check_int(seed, "seed", 0)
    _check_int(threads, "threads", 1)
    if isinstance(rel_step, bool) or not isinstance(rel_step, (int, float, np.floating, np.integer)) \
            or not np.isfinite(rel_step) or rel_step <= 0:
        raise OnnxlrError(f"rel_step must be a positive number, got {rel_step!r}")
    if probe_rows not in _PROBE_ROWS:
        raise OnnxlrError(f"probe_rows must be one of {', '.join(_PROBE_ROWS)}, got {probe_rows!r}")
    tensors = list(dict.fromkeys(tensors))
    specs = {spec.name: spec for spec in model_inputs(model)}
    initializers = {t.name for t in model.graph.initializer}
    produced = {name for node in model.graph.node for name in node.output if name}
    for name in tensors:
        if name in produced or name in specs:
            continue
        if name in initializers:
            raise OnnxlrError(f"tensor {name!r} is a weight (initializer), not an activation")
        raise OnnxlrError(f"tensor {name!r} is not in the model (neither a node output nor a model input)")
    if mask_input is not None and mask_input not in specs:
        raise OnnxlrError(f"mask input {mask_input!r} is not a model input (inputs: {', '.join(specs) or 'none'})")
    if not tensors:
        return {}

    fed = [name for name in tensors if name in specs]
    routed = [name for name in tensors if name not in specs]
    for name in fed:
        if not np.issubdtype(specs[name].dtype, np.floating):
            raise OnnxlrError(f"tensor {name!r} has dtype {specs[name].dtype}; only float tensors can be perturbed")

    source = _BatchSource(batches)
    batch_iter = iter(source.first())
    first = next(batch_iter, None)
    if first is None:
        raise OnnxlrError("no calibration batches")
    elem_types = _elem_types(model, routed, first, threads)
    for name in routed:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_types[name]))
        if not np.issubdtype(dtype, np.floating):
            raise OnnxlrError(f"tensor {name!r} has dtype {dtype}; only float tensors can be perturbed")
    work, probe_names = _probed_copy(model, routed, elem_types)
    session = make_session(work.SerializeToString(), "CPUExecutionProvider", threads)
    outputs = [o.name for o in model.graph.output]
    tags = _tags(tensors)

    totals: dict[str, np.ndarray] = {}
    for index, batch in enumerate(chain([first], batch_iter)):
        _one_batch(session, batch, index, tensors, fed, routed, probe_names, elem_types, outputs, tags,
                   probes, float(rel_step), int(seed), mask_input, probe_rows == "shared", totals)
    return {name: np.maximum(totals[name], 0.0) for name in tensors}


def _check_int(value, what: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise OnnxlrError(f"{what} must be an integer of at least {low}, got {value!r}")


def _tags(tensors: Sequence[str]) -> dict[str, int]:
    """A stable seed component per tensor, from its name (its index if two names collide)."""
    tags = {name: zlib.crc32(name.encode("utf-8")) for name in tensors}
    if len(set(tags.values())) < len(tags):
        tags = {name: 2**32 + i for i, name in enumerate(tensors)}
    return tags


# --------------------------------------------------------------------------------------- the graph


def _all_names(graph: onnx.GraphProto, names: set) -> set:
    """Every tensor and node name in ``graph`` and its subgraphs."""
    for group in (graph.input, graph.output, graph.value_info):
        names.update(v.name for v in group)
    names.update(t.name for t in graph.initializer)
    names.update(t.values.name for t in graph.sparse_initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _all_names(attr.g, names)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _all_names(sub, names)
    return names


def _unique(base: str, taken: set) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _elem_types(model: onnx.ModelProto, names: Sequence[str], first: Batch, threads: int) -> dict[str, int]:
    """ONNX element type of each tensor: from shape inference, else from one run exposing it."""
    types: dict[str, int] = {}
    if not names:
        return types
    for value in chain(model.graph.input, model.graph.value_info, model.graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    if any(name not in types for name in names):
        for data_prop in (True, False):
            try:
                inferred = onnx.shape_inference.infer_shapes(model, data_prop=data_prop)
            except Exception:  # noqa: BLE001 - inference is best effort (custom ops, > 2 GiB protos…)
                continue
            for value in chain(inferred.graph.value_info, inferred.graph.output):
                if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                    types.setdefault(value.name, value.type.tensor_type.elem_type)
            break
    missing = [name for name in names if name not in types]
    if missing:  # ask ONNX Runtime: expose them untyped (it infers the types) and run the first batch
        work = onnx.ModelProto()
        work.CopyFrom(model)
        present = {o.name for o in work.graph.output}
        for name in missing:
            if name not in present:
                value = onnx.ValueInfoProto()
                value.name = name
                work.graph.output.append(value)
        session = make_session(work.SerializeToString(), "CPUExecutionProvider", threads)
        values = _run(session, missing, {k: np.asarray(v) for k, v in first.items()}, 0)
        for name, value in zip(missing, values):
            types[name] = helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype)
    return {name: types[name] for name in names}


def _probed_copy(model: onnx.ModelProto, routed: Sequence[str], elem_types: Mapping[str, int]
                 ) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` with each routed tensor y recomputed as Add(y_unprobed, probe_y) and exposed
    as an output; returns it and {tensor: probe input name}."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    if not routed:
        return work, {}
    graph = work.graph
    taken = _all_names(graph, set())
    probe_names = {name: _unique(f"{name}__onnxlr_probe", taken) for name in routed}
    wanted = set(routed)
    nodes = []
    for node in graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        nodes.append(copy)
        for i, out in enumerate(copy.output):
            if out in wanted:
                pre = _unique(f"{out}__onnxlr_unprobed", taken)
                copy.output[i] = pre
                nodes.append(helper.make_node("Add", [pre, probe_names[out]], [out],
                                              name=_unique(f"{out}__onnxlr_probe_add", taken)))
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.extend(helper.make_tensor_value_info(probe_names[name], elem_types[name], None) for name in routed)
    present = {o.name for o in graph.output}
    graph.output.extend(helper.make_tensor_value_info(name, elem_types[name], None)
                        for name in routed if name not in present)
    return work, probe_names


# ------------------------------------------------------------------------------------------ running


def _run(session, fetch: list[str], feeds: Mapping[str, np.ndarray], index: int) -> list:
    try:
        return session.run(fetch, dict(feeds))
    except (_OrtInvalidArgument, ValueError) as exc:
        raise OnnxlrError(f"calibration batch {index}: {str(exc).splitlines()[0]}") from None


def _row_keep(shape: tuple, mask: np.ndarray | None) -> np.ndarray | None:
    """Boolean selector of the rows of a (..., n) tensor that count, or None (all rows count)."""
    if mask is None:
        return None
    leading = shape[:-1]
    if leading == mask.shape or (len(leading) == 1 and mask.ndim > 1 and leading[0] == mask.size):
        return mask.reshape(-1)
    return None


class _Probe:
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


def _one_batch(session, batch: Batch, index: int, tensors, fed, routed, probe_names, elem_types, outputs,
               tags, P: int, rel_step: float, seed: int, mask_input, shared: bool, totals: dict) -> None:
    """Fold one batch's estimates into ``totals``."""
    feeds = {name: np.asarray(value) for name, value in batch.items()}
    mask = None
    if mask_input is not None:
        if mask_input not in feeds:
            raise OnnxlrError(f"calibration batch {index} has no array for mask input {mask_input!r}")
        mask = feeds[mask_input] != 0
    for name in fed:
        if name not in feeds:
            raise OnnxlrError(f"calibration batch {index} has no array for model input {name!r}")
    dtypes = {name: np.dtype(helper.tensor_dtype_to_np_dtype(elem_types[name])) for name in routed}
    zeros = {probe_names[name]: np.zeros((), dtypes[name]) for name in routed}
    fetch = list(dict.fromkeys([*outputs, *routed]))
    values = dict(zip(fetch, _run(session, fetch, {**feeds, **zeros}, index)))

    floats = [o for o in outputs if np.issubdtype(np.asarray(values[o]).dtype, np.floating)]
    if not floats:
        raise OnnxlrError("the model has no float output: output sensitivity needs one")
    finite = {o: np.isfinite(np.asarray(values[o])) for o in floats}
    size = sum(int(finite[o].sum()) for o in floats)
    z_dtype = np.result_type(np.float32, *(np.asarray(values[o]).dtype for o in floats))

    state = []
    for name in tensors:
        value = np.asarray(values[name] if name in routed else feeds[name])
        shape = value.shape if value.ndim else (1,)
        probe = _Probe(name, value, _row_keep(shape, mask), rel_step, seed, index, tags[name],
                       P if shared else None)
        if name in totals and totals[name].shape[0] != probe.n:
            raise OnnxlrError(f"tensor {name!r} has last dimension {probe.n} in calibration batch {index}, "
                              f"but {totals[name].shape[0]} before; its sensitivity needs a fixed size")
        state.append(probe)

    Z = np.zeros((P, size), z_dtype)
    for p in range(P):
        plus, minus = dict(feeds), dict(feeds)
        for probe in state:
            delta = (probe.step * probe.full(p)).reshape(np.shape(values[probe.name]) if probe.name in routed
                                                         else np.shape(feeds[probe.name]))
            if probe.name in routed:
                plus[probe_names[probe.name]] = delta.astype(probe.dtype)
                minus[probe_names[probe.name]] = (-delta).astype(probe.dtype)
            else:
                base = feeds[probe.name]
                plus[probe.name] = (base + delta).astype(base.dtype)
                minus[probe.name] = (base - delta).astype(base.dtype)
        up = _run(session, floats, {**zeros, **plus}, index)
        down = _run(session, floats, {**zeros, **minus}, index)
        parts = []
        for o, a, b in zip(floats, up, down):
            keep = finite[o]
            parts.append(((np.asarray(a) - np.asarray(b)) / 2)[keep].astype(z_dtype, copy=False))
        z = np.concatenate(parts) if parts else np.zeros(0, z_dtype)
        if not np.all(np.isfinite(z)):
            raise OnnxlrError(f"calibration batch {index}: the model output became non-finite under a "
                              f"perturbation of relative size {rel_step:g}; try a smaller rel_step")
        Z[p] = z

    G = np.zeros((P, P))
    for s in range(0, size, _PRODUCT_ELEMENTS // P or 1):
        block = Z[:, s:s + (_PRODUCT_ELEMENTS // P or 1)].astype(np.float64)
        G += block @ block.T
    np.fill_diagonal(G, 0.0)
    H = G / (P * (P - 1))
    for probe in state:
        estimate = probe.estimate(H)
        totals[probe.name] = totals[probe.name] + estimate if probe.name in totals else estimate
