"""Activation statistics collected with ONNX Runtime: Gram matrices, sums and index histograms.

:func:`collect` gathers what :mod:`onnxlr.statistics` requests ask for; :func:`collect_stats` and
:func:`collect_unfolded_stats` are its forms for tensor names and for rows unfolded by a function. It exposes the requested intermediate tensors as extra graph outputs of a *copy* of the
model, runs it on the CPU provider over calibration batches, and folds every activation into running
float64 sums as soon as it comes out — activations are never stored. For a tensor x of shape
(..., k) the rows are ``x.reshape(-1, k)``; its `TensorStats` hold the (k, k) Gram matrix
``sum_rows r rᵀ``, the (k,) sums of r and of |r|, and the row count.

Padding rows are skipped with an attention mask: when ``mask_input`` is given (a model input of shape
(batch, seq), 0 = padding) and an activation's leading dimensions equal the mask's shape — or the
activation is 2-D with ``batch * seq`` rows, i.e. the tokens already flattened — only the rows where
the mask is non-zero count. Other activations (e.g. pooled (batch, k)) count every row.

Integer index tensors (token ids feeding an embedding ``Gather``) can be histogrammed instead:
``counts={"input_ids": vocab_size}`` returns ``np.bincount`` of their values (masked the same way),
used to weight embedding-table factorization by token frequency.

Memory and passes
-----------------
Exposing a tensor costs, per pass, its Gram (k·k·8 bytes) plus its activation for one batch (ORT
returns all requested outputs together). Shapes come from ONNX shape inference, with symbolic
dimensions resolved from the first batch; unknown sizes are assumed large (see ``UNKNOWN_*``). Tensors
are packed into as few passes as keep each pass under ``memory_budget`` (a tensor over budget on its
own gets a pass to itself). Model inputs are read straight from the feeds (no ORT output, collected
in the first pass) and graph outputs are fetched, not duplicated.

When more than one pass is needed the batches are read once per pass (:mod:`onnxlr.runtimes.exposed`
says what ``batches`` may be); every pass must see the same batches: a different number of batches or
samples between passes is an `OnnxlrError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import chain
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper

from onnxlr import progress
from onnxlr.errors import OnnxlrError
from onnxlr.statistics import (HISTOGRAM_BINS, Activation, ActivationStats, ChannelRows, Patches, Rows, TensorStats,
                               TokenCounts, channel_rows)
from onnxlr.feeds import model_inputs
from onnxlr.runtimes.exposed import (Batch, BatchesLike, BatchSource, TensorNames, fed, output_info, row_mask,
                                     run_batch, working_copy)
from onnxlr.runtimes.providers import make_session

# Conservative sizes assumed when shape inference leaves a dimension unknown.
UNKNOWN_K = 2048          # last dimension (Gram size)
UNKNOWN_DIM = 1024        # any other dimension
UNKNOWN_ELEMENTS = 2**22  # elements of one batch's activation when even the rank is unknown

def collect_unfolded_stats(model: onnx.ModelProto, specs: Mapping[str, tuple[str, Callable[[np.ndarray], np.ndarray]]],
                           batches: BatchesLike, *, threads: int = 2) -> dict[str, TensorStats]:
    """Statistics of rows derived from activations, e.g. the im2col patches a Conv multiplies.

    specs: key -> (tensor name, ``rows(activation) -> (m, d)`` array), applied to one sample at a time
    (bounding the unfolded rows' memory); every key's Gram (d*d*8 bytes) is held while its pass runs.
    """
    return collect(model, [_Item(tensor, key, rows=rows) for key, (tensor, rows) in specs.items()], batches,
                   threads=threads)


def collect_stats(model: onnx.ModelProto, tensors: Sequence[str], batches: BatchesLike, *,
                  mask_input: str | None = None, threads: int = 2, memory_budget: int = 2**30,
                  counts: Mapping[str, int] | None = None,
                  ) -> tuple[dict[str, TensorStats], dict[str, np.ndarray]]:
    """Statistics of the rows of ``tensors`` and histograms of ``counts`` over ``batches`` (see the
    module docstring).

    tensors: names of node outputs or model inputs of shape (..., k).
    counts: index tensor name -> table size; histograms are int64 arrays of that length.
    Returns ({tensor: TensorStats}, {index tensor: (table size,) int64 counts}), in the order asked.
    """
    for name, size in (counts or {}).items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise OnnxlrError(f"table size for index tensor {name!r} must be a positive integer, got {size!r}")
    tensors = list(dict.fromkeys(tensors))
    found = collect(model, [*(Rows(t) for t in tensors), *(TokenCounts(n, s) for n, s in (counts or {}).items())],
                    batches, mask_input=mask_input, threads=threads, memory_budget=memory_budget)
    return {t: found[t] for t in tensors}, {n: found[n] for n in (counts or {})}


def collect(model: onnx.ModelProto, requests: Sequence, batches: BatchesLike, *, mask_input: str | None = None,
            threads: int = 2, memory_budget: int = 2**30) -> dict[str, TensorStats | np.ndarray]:
    """What ``requests`` (:class:`~onnxlr.statistics.Rows`, ``ChannelRows``, ``Patches``, ``TokenCounts``, ``Activation``)
    ask for, over ``batches``, keyed by ``request.key``: every tensor exposed in as few ONNX Runtime
    passes as ``memory_budget`` allows (see the module docstring).

    batches: feeds ``{input name: array}``; a callable returning a fresh iterable, a re-iterable, or a
        one-shot iterator (kept in memory only if several passes are needed).
    mask_input: model input (batch, seq), 0 = padding row to skip (rows and counts).
    ``model`` is not modified.
    """
    items = list(dict.fromkeys(_item(r) for r in requests))
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, np.integer)) or memory_budget < 1:
        raise OnnxlrError(f"memory budget must be a positive number of bytes, got {memory_budget!r}")
    graph = TensorNames(model)
    for item in items:
        graph.require(item.tensor)
    if mask_input is not None and mask_input not in graph.inputs:
        raise OnnxlrError(f"mask input {mask_input!r} is not a model input (inputs: {', '.join(graph.inputs) or 'none'})")
    if not items:
        return {}

    source = BatchSource(batches)
    first_iter = iter(source.first())
    first = next(first_iter, None)
    if first is None:
        raise OnnxlrError("no calibration batches")
    work, types = working_copy(model, first)  # free dims sized by the first batch
    sizes = _dim_values(model, first)
    # Leading dimensions shape inference cannot name (e.g. generated symbols inside a transformer)
    # are guessed from the first batch: no activation row count exceeds the largest input's size.
    rows_guess = max((int(np.asarray(v).size) for v in first.values()), default=UNKNOWN_DIM)
    costs = {item: _cost(types.get(item.tensor), sizes, HISTOGRAM_BINS if item.activation else item.size, rows_guess,
                         item.width if item.rows else None)
             for item in items}
    passes = _plan(items, costs, graph.inputs, memory_budget)
    source.keep = len(passes) > 1

    found: dict[str, TensorStats | np.ndarray] = {item.key: np.zeros(item.size, dtype=np.int64)
                                                  for item in items if item.size is not None}
    signature = None
    for index, group in enumerate(passes):
        batch_iter = chain([first], first_iter) if index == 0 else iter(source.again())
        record = source.record if index == 0 else None
        sig = _run_pass(work, graph, types, group, batch_iter, record, mask_input, threads, found)
        if signature is not None and sig != signature:
            raise OnnxlrError(f"calibration batches changed between passes ({signature[0]} batches of "
                              f"{signature[1]} samples, then {sig[0]} of {sig[1]}); pass the same data each time")
        signature = sig
    return {item.key: found[item.key] for item in items}


class _Item(NamedTuple):
    """One statistic to gather from ``tensor``: its rows (masked), rows of one sample at a time through
    ``rows`` (unfolded), or a histogram of a table of ``size`` rows; filed under ``key``."""

    tensor: str
    key: str
    rows: Callable[[np.ndarray], np.ndarray] | None = None
    size: int | None = None
    width: Callable[[list], int | None] | None = None  # the unfolded rows' length from the tensor's dims
    activation: bool = False  # ActivationStats (per-channel range and mean, value histogram)


def _channels(dims: list) -> int | None:
    return dims[1]


class _PatchWidth(NamedTuple):
    taps: int

    def __call__(self, dims: list) -> int | None:
        return None if dims[1] is None else dims[1] * self.taps


def _item(request) -> _Item:
    if isinstance(request, _Item):
        return request
    if isinstance(request, Rows):
        return _Item(request.tensor, request.key)
    if isinstance(request, TokenCounts):
        return _Item(request.tensor, request.key, size=int(request.size))
    if isinstance(request, ChannelRows):
        return _Item(request.tensor, request.key, rows=channel_rows, width=_channels)
    if isinstance(request, Activation):
        return _Item(request.tensor, request.key, activation=True)
    if isinstance(request, Patches):
        return _Item(request.tensor, request.key, rows=request.rows, width=_PatchWidth(int(np.prod(request.kernel))))
    raise TypeError(f"not a statistics request: {request!r}")


# ----------------------------------------------------------------------------------------- planning


def _dim_values(model: onnx.ModelProto, feeds: Batch) -> dict[str, int]:
    """Symbolic dimension name -> its size in ``feeds`` (from the model inputs' declared shapes)."""
    sizes = {}
    for spec in model_inputs(model):
        value = feeds.get(spec.name)
        if value is None:
            continue
        shape = np.shape(value)
        for dim, got in zip(spec.shape, shape):
            if isinstance(dim, str):
                sizes.setdefault(dim, int(got))
    return sizes


def _cost(type_proto: onnx.TypeProto | None, sizes: Mapping[str, int], table: int | None,
          rows_guess: int = UNKNOWN_DIM, unfolded: Callable[[list], int | None] | None = None) -> int:
    """Estimated bytes one pass needs for an item: its accumulator (a Gram, or a histogram of ``table``
    rows) plus one batch's activation.

    rows_guess: assumed product of the leading dimensions when some of them are unknown.
    unfolded: for rows unfolded from the activation, their length from its dims (None: unknown).
    """
    itemsize = 4
    dims = None
    if type_proto is not None:
        tensor_type = type_proto.tensor_type
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 4
        if tensor_type.HasField("shape"):
            dims = []
            for dim in tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value >= 0:  # -1: a free axis (paddle2onnx)
                    dims.append(int(dim.dim_value))
                else:
                    dims.append(sizes.get(dim.dim_param) if dim.dim_param else None)
    if dims is None:
        elements, k = UNKNOWN_ELEMENTS, UNKNOWN_K
    else:
        k = dims[-1] if dims and dims[-1] is not None else (UNKNOWN_K if dims else 1)
        leading = dims[:-1]
        rows = rows_guess if any(d is None for d in leading) else int(np.prod(leading, dtype=np.float64))
        elements = rows * k
    if table is not None:
        return table * 8 + elements * itemsize
    if unfolded is not None:  # the unfolded rows' length, when the tensor's dims tell it
        k = (unfolded(dims) if dims and len(dims) > 1 else None) or UNKNOWN_K
    return (k * k + 2 * k) * 8 + elements * itemsize


def _plan(items: list[tuple], costs: Mapping, inputs: Sequence[str], budget: int) -> list[list]:
    """Group items into passes under ``budget`` (first fit, largest first). Model inputs need no ORT
    output: they ride along with the first pass and do not count against it (their accumulators are
    held for the whole run anyway)."""
    fed = [item for item in items if item[0] in inputs]
    exposed = sorted((item for item in items if item[0] not in inputs), key=lambda item: -costs[item])
    passes: list[list] = []
    loads: list[int] = []
    for item in exposed:
        for i, load in enumerate(loads):
            if load + costs[item] <= budget:
                passes[i].append(item)
                loads[i] += costs[item]
                break
        else:
            passes.append([item])
            loads.append(costs[item])
    if not passes:
        return [fed]
    passes[0] = fed + passes[0]
    return passes


# ------------------------------------------------------------------------------------------ running


def _run_pass(work, graph: TensorNames, types, group: list[_Item], batch_iter: Iterator[Batch], record, mask_input,
              threads, found: dict) -> tuple[int, int]:
    """One pass over the batches for the items in ``group``, folded into ``found``; returns (batches,
    samples) seen. ``record`` (first pass only) is called with every batch."""
    fetch = list(dict.fromkeys(item.tensor for item in group if item.tensor not in graph.inputs))
    session = None
    if fetch:
        added = [name for name in fetch if name not in graph.outputs]
        base = len(work.graph.output)
        work.graph.output.extend(output_info(name, types) for name in added)
        try:
            session = make_session(work.SerializeToString(), "CPUExecutionProvider", threads)
        finally:
            del work.graph.output[base:]
    n_batches = n_samples = 0
    for index, batch in enumerate(progress.bar(batch_iter, desc="calibration", unit="batch")):
        if record is not None:
            record(batch)
        mask = None
        if mask_input is not None:
            if mask_input not in batch:
                raise OnnxlrError(f"calibration batch {index} has no array for mask input {mask_input!r}")
            mask = np.asarray(batch[mask_input]) != 0
        values = {}
        if session is not None:
            feeds = {name: np.asarray(value) for name, value in batch.items()}
            values = dict(zip(fetch, run_batch(session, fetch, feeds, index)))
        for item in group:
            value = values[item.tensor] if item.tensor in values else fed(batch, item.tensor, index)
            if item.size is not None:
                _count(item.tensor, value, mask, item.size, found[item.key], index)
            elif item.activation:
                _accumulate_activation(item.key, value, found)
            elif item.rows is not None:
                for sample in np.asarray(value):  # one sample at a time bounds the unfolded rows' memory
                    _accumulate(item.key, item.rows(sample[None]), None, found, index)
            else:
                _accumulate(item.key, value, mask, found, index)
        n_batches += 1
        first = next(iter(batch.values()), None)
        n_samples += int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1
    if n_batches == 0:
        raise OnnxlrError("no calibration batches")
    return n_batches, n_samples


def rows_of(value: np.ndarray, mask) -> np.ndarray:
    """The rows (m, k) of a tensor (..., k), padding rows left out where the mask applies."""
    value = np.asarray(value)
    if value.ndim == 0:
        value = value.reshape(1)
    rows = value.reshape(-1, value.shape[-1])
    keep = row_mask(mask, value.shape[:-1])
    return rows if keep is None else rows[keep]


def _accumulate(name: str, value: np.ndarray, mask, stats: dict, index: int) -> None:
    rows = rows_of(value, mask)
    k = rows.shape[1]
    current = stats.get(name)
    if current is None:
        current = stats[name] = TensorStats.zeros(k)
    elif current.k != k:
        raise OnnxlrError(f"tensor {name!r} has last dimension {k} in calibration batch {index}, "
                          f"but {current.k} before; its statistics need a fixed size")
    current.update(rows)


def _accumulate_activation(name: str, value: np.ndarray, stats: dict) -> None:
    value = np.asarray(value)
    current = stats.get(name)
    if current is None:
        current = stats[name] = ActivationStats.zeros(value.shape[1] if value.ndim >= 2 else 1)
    current.update(value)


def _count(name: str, value: np.ndarray, mask, size: int, hist: np.ndarray, index: int) -> None:
    value = np.asarray(value)
    if not (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_):
        raise OnnxlrError(f"tensor {name!r} has dtype {value.dtype}; index counts need an integer tensor")
    keep = row_mask(mask, value.shape)
    flat = value.reshape(-1)
    if keep is not None:
        flat = flat[keep]
    flat = flat.astype(np.int64)
    outside = (flat < -size) | (flat >= size)
    if outside.any():
        bad = flat[outside][0]
        raise OnnxlrError(f"tensor {name!r} has index {bad} in calibration batch {index}, outside a table of {size} rows")
    flat = np.where(flat < 0, flat + size, flat)  # Gather accepts negative indices, counted from the end
    hist += np.bincount(flat, minlength=size)
