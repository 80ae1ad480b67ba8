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

The estimator (unbiased, a U-statistic over pairs of probes) and the probe structures are
:mod:`onnxlr.probes`.

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
from onnxlr.feeds import model_inputs
from onnxlr.probes import Probe, pair_gram
from onnxlr.runtimes.providers import make_session
from onnxlr.runtimes.exposed import Batch, BatchesLike, BatchSource, TensorNames, row_mask, run_batch

_PROBE_ROWS = ("independent", "shared")



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
    _check_arguments(probes, seed, threads, rel_step, probe_rows)
    tensors = list(dict.fromkeys(tensors))
    names = TensorNames(model)
    for name in tensors:
        names.require(name)
    if mask_input is not None and mask_input not in names.inputs:
        raise OnnxlrError(f"mask input {mask_input!r} is not a model input (inputs: {', '.join(names.inputs) or 'none'})")
    if not tensors:
        return {}
    specs = {spec.name: spec for spec in model_inputs(model)}
    fed = [name for name in tensors if name in specs]
    routed = [name for name in tensors if name not in specs]
    for name in fed:
        if not np.issubdtype(specs[name].dtype, np.floating):
            raise OnnxlrError(f"tensor {name!r} has dtype {specs[name].dtype}; only float tensors can be perturbed")

    source = BatchSource(batches)
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


def _check_arguments(probes, seed, threads, rel_step, probe_rows) -> None:
    _check_int(probes, "probes", 2)
    _check_int(seed, "seed", 0)
    _check_int(threads, "threads", 1)
    if isinstance(rel_step, bool) or not isinstance(rel_step, (int, float, np.floating, np.integer)) \
            or not np.isfinite(rel_step) or rel_step <= 0:
        raise OnnxlrError(f"rel_step must be a positive number, got {rel_step!r}")
    if probe_rows not in _PROBE_ROWS:
        raise OnnxlrError(f"probe_rows must be one of {', '.join(_PROBE_ROWS)}, got {probe_rows!r}")


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
        values = run_batch(session, missing, {k: np.asarray(v) for k, v in first.items()}, 0)
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
    values = dict(zip(fetch, run_batch(session, fetch, {**feeds, **zeros}, index)))
    floats = [o for o in outputs if np.issubdtype(np.asarray(values[o]).dtype, np.floating)]
    if not floats:
        raise OnnxlrError("the model has no float output: output sensitivity needs one")
    state = []
    for name in tensors:
        value = np.asarray(values[name] if name in routed else feeds[name])
        shape = value.shape if value.ndim else (1,)
        probe = Probe(name, value, row_mask(mask, shape[:-1]), rel_step, seed, index, tags[name],
                      P if shared else None)
        if name in totals and totals[name].shape[0] != probe.n:
            raise OnnxlrError(f"tensor {name!r} has last dimension {probe.n} in calibration batch {index}, "
                              f"but {totals[name].shape[0]} before; its sensitivity needs a fixed size")
        state.append(probe)
    H = pair_gram(_differences(session, feeds, values, zeros, state, floats, probe_names, P, rel_step, index))
    for probe in state:
        estimate = probe.estimate(H)
        totals[probe.name] = totals[probe.name] + estimate if probe.name in totals else estimate


def _differences(session, feeds, values, zeros, state, floats, probe_names, P: int, rel_step: float,
                 index: int) -> np.ndarray:
    """``Z`` (P, output elements): per probe, the central difference of the float outputs (elements
    non-finite in the unperturbed run left out)."""
    finite = {o: np.isfinite(np.asarray(values[o])) for o in floats}
    z_dtype = np.result_type(np.float32, *(np.asarray(values[o]).dtype for o in floats))
    Z = np.zeros((P, sum(int(finite[o].sum()) for o in floats)), z_dtype)
    for p in range(P):
        plus, minus = dict(feeds), dict(feeds)
        for probe in state:
            routed = probe.name in probe_names
            delta = (probe.step * probe.full(p)).reshape(np.shape(values[probe.name]) if routed
                                                         else np.shape(feeds[probe.name]))
            if routed:
                plus[probe_names[probe.name]] = delta.astype(probe.dtype)
                minus[probe_names[probe.name]] = (-delta).astype(probe.dtype)
            else:
                base = feeds[probe.name]
                plus[probe.name] = (base + delta).astype(base.dtype)
                minus[probe.name] = (base - delta).astype(base.dtype)
        up = run_batch(session, floats, {**zeros, **plus}, index)
        down = run_batch(session, floats, {**zeros, **minus}, index)
        parts = [((np.asarray(a) - np.asarray(b)) / 2)[finite[o]].astype(z_dtype, copy=False)
                 for o, a, b in zip(floats, up, down)]
        z = np.concatenate(parts) if parts else np.zeros(0, z_dtype)
        if not np.all(np.isfinite(z)):
            raise OnnxlrError(f"calibration batch {index}: the model output became non-finite under a "
                              f"perturbation of relative size {rel_step:g}; try a smaller rel_step")
        Z[p] = z
    return Z
