"""Activation statistics collected with ONNX Runtime: Gram matrices, sums and index histograms.

`collect_stats` exposes the requested intermediate tensors as extra graph outputs of a *copy* of the
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

When more than one pass is needed the batches are read once per pass. ``batches`` may be:

- a **callable** returning a fresh iterable of batches (e.g.
  ``lambda: calibration_batches(path, model)``) — called once per pass; nothing is held in memory.
  Preferred for large calibration sets.
- a **re-iterable** (list, tuple, or any object whose ``iter()`` returns a new iterator) — iterated
  once per pass.
- a **one-shot iterator** (e.g. a generator) — consumed once; if more than one pass is needed its
  batches are kept in a list during the first pass and replayed from it (all batches in memory).

Every pass must see the same batches: a different number of batches or samples between passes is an
`OnnxlrError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import onnx
from onnx import helper

from onnxlr.errors import OnnxlrError
from onnxlr.runtimes.feeds import model_inputs
from onnxlr.runtimes.providers import make_session

try:  # ORT's exception for bad feeds (wrong shape, wrong type, unknown input name)
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument as _OrtInvalidArgument
except ImportError:  # pragma: no cover - layout of older onnxruntime builds
    _OrtInvalidArgument = ValueError

# Conservative sizes assumed when shape inference leaves a dimension unknown.
UNKNOWN_K = 2048          # last dimension (Gram size)
UNKNOWN_DIM = 1024        # any other dimension
UNKNOWN_ELEMENTS = 2**22  # elements of one batch's activation when even the rank is unknown
_CHUNK_ELEMENTS = 2**22   # rows are converted to float64 at most this many elements at a time (32 MiB)

Batch = Mapping[str, np.ndarray]
BatchesLike = Iterable[Batch] | Callable[[], Iterable[Batch]]


@dataclass
class TensorStats:
    """Running statistics of the rows r (length k) of one tensor.

    gram: (k, k) float64, sum of r rᵀ. sum: (k,) float64, sum of r. abs_sum: (k,) float64, sum of |r|.
    count: number of rows accumulated. low, high: (k,) float64, smallest and largest value per column
    (the range an activation quantizer must cover; ±inf before any row).
    """

    gram: np.ndarray
    sum: np.ndarray
    abs_sum: np.ndarray
    count: int = 0
    low: np.ndarray | None = None
    high: np.ndarray | None = None

    def __post_init__(self):
        if self.low is None:
            self.low = np.full_like(self.sum, np.inf)
        if self.high is None:
            self.high = np.full_like(self.sum, -np.inf)

    @property
    def abs_max(self) -> np.ndarray:
        """(k,) largest |r| per column; zeros when no row was accumulated."""
        return np.maximum(np.abs(self.low), np.abs(self.high), where=self.count > 0, out=np.zeros_like(self.sum))

    @classmethod
    def zeros(cls, k: int) -> TensorStats:
        """Empty statistics for rows of length k."""
        return cls(np.zeros((k, k)), np.zeros(k), np.zeros(k), 0)

    @property
    def k(self) -> int:
        return self.sum.shape[0]

    @property
    def mean(self) -> np.ndarray:
        """(k,) mean row; zeros when no row was accumulated."""
        return self.sum / max(self.count, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        """(k,) mean of |r|; zeros when no row was accumulated."""
        return self.abs_sum / max(self.count, 1)

    @property
    def covariance(self) -> np.ndarray:
        """(k, k) centered covariance (gram - count·mean meanᵀ) / count (population, not count - 1)."""
        mean = self.mean
        return (self.gram - self.count * np.outer(mean, mean)) / max(self.count, 1)

    @property
    def centered_gram(self) -> np.ndarray:
        """(k, k) Gram of the centered rows, ``gram - count·mean meanᵀ``: the statistic of the optimal
        affine fit (a rank-r map plus a bias), as ``count · covariance``."""
        return self.gram - self.count * np.outer(self.mean, self.mean)

    def merged(self, other: "TensorStats") -> "TensorStats":
        """Statistics of both row sets together (for a weight read by several layers)."""
        return TensorStats(self.gram + other.gram, self.sum + other.sum, self.abs_sum + other.abs_sum,
                           self.count + other.count, np.minimum(self.low, other.low), np.maximum(self.high, other.high))

    def update(self, rows: np.ndarray) -> None:
        """Accumulate rows (m, k), in float64 (BLAS ``rᵀ r``), a bounded number of rows at a time."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.k:
            raise ValueError(f"rows must have shape (m, {self.k}), got {rows.shape}")
        step = max(1, _CHUNK_ELEMENTS // max(self.k, 1))
        for start in range(0, rows.shape[0], step):
            r = np.ascontiguousarray(rows[start:start + step], dtype=np.float64)
            self.gram += r.T @ r
            self.sum += r.sum(axis=0)
            self.abs_sum += np.abs(r).sum(axis=0)
            if len(r):
                np.minimum(self.low, r.min(axis=0), out=self.low)
                np.maximum(self.high, r.max(axis=0), out=self.high)
        self.count += rows.shape[0]


@dataclass
class CrossStats:
    """Paired rows of one tensor in a reference model (rows x) and in a compressed copy of it (rows x̂)
    fed the same batches: the statistics of sequential compression.

    ref, hat: TensorStats of x and of x̂. cross: (k, k) float64, sum of x̂ xᵀ (not symmetric).
    """

    ref: TensorStats
    hat: TensorStats
    cross: np.ndarray

    @classmethod
    def zeros(cls, k: int) -> CrossStats:
        return cls(TensorStats.zeros(k), TensorStats.zeros(k), np.zeros((k, k)))

    @property
    def centered_cross(self) -> np.ndarray:
        """(k, k) cross Gram of the centered rows, ``cross - count·mean(x̂) mean(x)ᵀ``."""
        return self.cross - self.hat.count * np.outer(self.hat.mean, self.ref.mean)

    def merged(self, other: "CrossStats") -> "CrossStats":
        return CrossStats(self.ref.merged(other.ref), self.hat.merged(other.hat), self.cross + other.cross)

    def update(self, ref_rows: np.ndarray, hat_rows: np.ndarray) -> None:
        """Accumulate paired rows (m, k): row i of both comes from the same position of the same sample."""
        if np.shape(ref_rows) != np.shape(hat_rows):
            raise ValueError(f"paired rows differ in shape: {np.shape(ref_rows)} and {np.shape(hat_rows)}")
        self.ref.update(ref_rows)
        self.hat.update(hat_rows)
        step = max(1, _CHUNK_ELEMENTS // max(self.ref.k, 1))
        for start in range(0, len(ref_rows), step):
            x = np.ascontiguousarray(ref_rows[start:start + step], dtype=np.float64)
            x_hat = np.ascontiguousarray(hat_rows[start:start + step], dtype=np.float64)
            self.cross += x_hat.T @ x


class PairedRuns:
    """Runs a reference model and a compressed version of it on the same calibration batches and
    collects `CrossStats` of tensors present in both under the same name (sequential compression).

    Each :meth:`collect` builds one session per model and makes one pass over the batches, running
    both models on each batch; only one batch's activations are held at a time. ``batches`` is as for
    :func:`collect_stats` (a one-shot iterator is kept in memory after its first pass so that later
    calls see the same batches).
    """

    def __init__(self, batches: BatchesLike, *, mask_input: str | None = None, threads: int = 2):
        self._source = _BatchSource(batches)
        self._source.keep = True
        self._passes = 0
        self.mask_input = mask_input
        self.threads = threads

    def collect(self, reference: onnx.ModelProto, compressed: onnx.ModelProto,
                tensors: Sequence[str]) -> dict[str, CrossStats]:
        """``{tensor: CrossStats}`` over all batches (x from ``reference``, x̂ from ``compressed``)."""
        tensors = list(dict.fromkeys(tensors))
        ref_graph, graph = _GraphInfo(reference), _GraphInfo(compressed)
        for name in tensors:
            ref_graph.require(name)
            graph.require(name)
        fetch = [t for t in tensors if t not in ref_graph.inputs]
        sessions = [_exposing_session(m, fetch, self.threads) for m in (reference, compressed)]
        batches = self._source.first() if self._passes == 0 else self._source.again()
        record = self._source.record if self._passes == 0 else None
        self._passes += 1
        stats: dict[str, CrossStats] = {}
        for index, batch in enumerate(batches):
            if record is not None:
                record(batch)
            feeds = {name: np.asarray(value) for name, value in batch.items()}
            ref, hat = (dict(zip(fetch, _run(session, fetch, feeds, index))) for session in sessions)
            mask = None
            if self.mask_input is not None:
                mask = np.asarray(_fed(batch, self.mask_input, index)) != 0
            for name in tensors:
                x = ref[name] if name in ref else _fed(batch, name, index)
                x, x_hat = _rows(x, mask), _rows(hat.get(name, x), mask)
                if name not in stats:
                    stats[name] = CrossStats.zeros(x.shape[1])
                stats[name].update(x, x_hat)
        if tensors and not stats:
            raise OnnxlrError("no calibration batches")
        return stats


def collect_unfolded_stats(model: onnx.ModelProto, specs: Mapping[str, tuple[str, Callable[[np.ndarray], np.ndarray]]],
                           batches: BatchesLike, *, threads: int = 2) -> dict[str, TensorStats]:
    """Statistics of rows derived from activations, e.g. the im2col patches a Conv multiplies.

    specs: key -> (tensor name, ``rows(activation) -> (m, d)`` array). One ORT pass over the batches
    exposes every tensor; each batch's activation is turned into rows and folded into the key's
    `TensorStats` at once, so only one batch is held at a time (but every key's Gram is held for the
    whole pass: d*d*8 bytes each).
    """
    graph = _GraphInfo(model)
    for tensor, _ in specs.values():
        graph.require(tensor)
    fetch = list(dict.fromkeys(t for t, _ in specs.values() if t not in graph.inputs))
    session = _exposing_session(model, fetch, threads)
    source = _BatchSource(batches)
    stats: dict[str, TensorStats] = {}
    for index, batch in enumerate(source.first()):
        feeds = {name: np.asarray(value) for name, value in batch.items()}
        values = dict(zip(fetch, _run(session, fetch, feeds, index)))
        for key, (tensor, rows_of) in specs.items():
            value = values[tensor] if tensor in values else _fed(batch, tensor, index)
            for sample in np.asarray(value):  # one sample at a time bounds the unfolded rows' memory
                rows = rows_of(sample[None])
                if key not in stats:
                    stats[key] = TensorStats.zeros(rows.shape[1])
                stats[key].update(rows)
    if specs and not stats:
        raise OnnxlrError("no calibration batches")
    return stats


def _exposing_session(model: onnx.ModelProto, tensors: Sequence[str], threads: int):
    """A CPU session of a copy of ``model`` with ``tensors`` added as outputs (None if none asked)."""
    if not tensors:
        return None
    outputs = {o.name for o in model.graph.output}
    if all(name in outputs for name in tensors):
        return make_session(model.SerializeToString(), "CPUExecutionProvider", threads)
    work, types = _working_copy(model)
    work.graph.output.extend(_output_info(name, types) for name in tensors if name not in outputs)
    return make_session(work.SerializeToString(), "CPUExecutionProvider", threads)


def _run(session, fetch: Sequence[str], feeds: Batch, index: int) -> list[np.ndarray]:
    if session is None:
        return []
    try:
        return session.run(list(fetch), dict(feeds))
    except (_OrtInvalidArgument, ValueError) as exc:
        raise OnnxlrError(f"calibration batch {index}: {str(exc).splitlines()[0]}") from None


def collect_stats(model: onnx.ModelProto, tensors: Sequence[str], batches: BatchesLike, *,
                  mask_input: str | None = None, threads: int = 2, memory_budget: int = 2**30,
                  counts: Mapping[str, int] | None = None,
                  ) -> tuple[dict[str, TensorStats], dict[str, np.ndarray]]:
    """Statistics of ``tensors`` and histograms of ``counts`` over ``batches`` (see module docstring).

    tensors: names of node outputs or model inputs of shape (..., k).
    batches: feeds ``{input name: array}``; a callable returning a fresh iterable, a re-iterable, or a
        one-shot iterator (kept in memory only if several passes are needed).
    mask_input: model input (batch, seq), 0 = padding row to skip.
    counts: index tensor name -> table size; histograms are int64 arrays of that length.
    Returns ({tensor: TensorStats}, {index tensor: (table size,) int64 counts}), in the order asked.
    ``model`` is not modified.
    """
    tensors = list(dict.fromkeys(tensors))
    counts = dict(counts or {})
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, np.integer)) or memory_budget < 1:
        raise OnnxlrError(f"memory budget must be a positive number of bytes, got {memory_budget!r}")
    for name, size in counts.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise OnnxlrError(f"table size for index tensor {name!r} must be a positive integer, got {size!r}")
    graph = _GraphInfo(model)
    for name in [*tensors, *counts]:
        graph.require(name)
    if mask_input is not None and mask_input not in graph.inputs:
        raise OnnxlrError(f"mask input {mask_input!r} is not a model input (inputs: {', '.join(graph.inputs) or 'none'})")
    if not tensors and not counts:
        return {}, {}

    source = _BatchSource(batches)
    first_iter = iter(source.first())
    first = next(first_iter, None)
    if first is None:
        raise OnnxlrError("no calibration batches")
    work, types = _working_copy(model)
    sizes = _dim_values(model, first)

    items = [(name, False) for name in tensors] + [(name, True) for name in counts]
    # Leading dimensions shape inference cannot name (e.g. generated symbols inside a transformer)
    # are guessed from the first batch: no activation row count exceeds the largest input's size.
    rows_guess = max((int(np.asarray(v).size) for v in first.values()), default=UNKNOWN_DIM)
    costs = {item: _cost(types.get(item[0]), sizes, counts.get(item[0]) if item[1] else None, rows_guess)
             for item in items}
    passes = _plan(items, costs, graph.inputs, memory_budget)
    source.keep = len(passes) > 1

    stats: dict[str, TensorStats] = {}
    hists = {name: np.zeros(size, dtype=np.int64) for name, size in counts.items()}
    signature = None
    for index, group in enumerate(passes):
        batch_iter = chain([first], first_iter) if index == 0 else iter(source.again())
        record = source.record if index == 0 else None
        sig = _run_pass(work, graph, types, group, batch_iter, record, mask_input, threads, counts, stats, hists)
        if signature is not None and sig != signature:
            raise OnnxlrError(f"calibration batches changed between passes ({signature[0]} batches of "
                              f"{signature[1]} samples, then {sig[0]} of {sig[1]}); pass the same data each time")
        signature = sig
    return {name: stats[name] for name in tensors}, hists


# --------------------------------------------------------------------------------------- the graph


class _GraphInfo:
    """Names in the main graph: what can be exposed, what is fed, what is already an output."""

    def __init__(self, model: onnx.ModelProto):
        self.initializers = {t.name for t in model.graph.initializer}
        self.inputs = [s.name for s in model_inputs(model)]
        self.outputs = [o.name for o in model.graph.output]
        self.produced = {name for node in model.graph.node for name in node.output if name}

    def require(self, name: str) -> None:
        if name in self.produced or name in self.inputs:
            return
        if name in self.initializers:
            raise OnnxlrError(f"tensor {name!r} is a weight (initializer), not an activation")
        raise OnnxlrError(f"tensor {name!r} is not in the model (neither a node output nor a model input)")


def _working_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, onnx.TypeProto]]:
    """A copy of ``model`` to add outputs to, and the tensor types known by shape inference.

    The copy keeps the original value_info and outputs (inferred ones are only used for types and
    sizes), so ONNX Runtime sees the model as the user gave it.
    """
    work = None
    for data_prop in (True, False):
        try:
            work = onnx.shape_inference.infer_shapes(model, data_prop=data_prop)
            break
        except Exception:  # noqa: BLE001 - inference is best effort (custom ops, > 2 GiB protos…)
            continue
    if work is None:
        work = onnx.ModelProto()
        work.CopyFrom(model)
    types = {}
    for value in chain(work.graph.input, work.graph.value_info, work.graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type
    del work.graph.value_info[:]
    work.graph.value_info.extend(model.graph.value_info)
    del work.graph.output[:]
    work.graph.output.extend(model.graph.output)
    return work, types


def _output_info(name: str, types: Mapping[str, onnx.TypeProto]) -> onnx.ValueInfoProto:
    """A graph output for ``name``: typed (no shape) when inference knew the type, else name only —
    ONNX Runtime infers the type of an untyped output itself."""
    type_proto = types.get(name)
    if type_proto is not None:
        return helper.make_tensor_value_info(name, type_proto.tensor_type.elem_type, None)
    value = onnx.ValueInfoProto()
    value.name = name
    return value


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
          rows_guess: int = UNKNOWN_DIM) -> int:
    """Estimated bytes one pass needs for a tensor: its accumulator plus one batch's activation.

    rows_guess: assumed product of the leading dimensions when some of them are unknown.
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
        if any(d is None for d in leading):
            rows = rows_guess
        else:
            rows = int(np.prod(leading, dtype=np.float64))
        elements = rows * k
    accumulator = table * 8 if table is not None else (k * k + 2 * k) * 8
    return accumulator + elements * itemsize


def _plan(items: list[tuple[str, bool]], costs: Mapping, inputs: Sequence[str], budget: int) -> list[list]:
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


class _BatchSource:
    """Hands out the batches once per pass (see module docstring for the contract)."""

    def __init__(self, batches: BatchesLike):
        self.keep = False
        self._kept: list | None = None
        if callable(batches) and not isinstance(batches, Iterable):
            self._factory = batches
            self._one_shot = False
        elif isinstance(batches, Iterable):
            self._factory = None
            self._batches = batches
            self._one_shot = iter(batches) is batches
        else:
            raise OnnxlrError(f"calibration batches must be an iterable of input dicts or a callable returning one, "
                              f"got {type(batches).__name__}")

    def first(self) -> Iterable[Batch]:
        return self._fresh()

    def again(self) -> Iterable[Batch]:
        if self._one_shot:
            return self._kept
        return self._fresh()

    def record(self, batch: Batch) -> None:
        """Called for each batch of the first pass: keep it if a one-shot iterator must be replayed."""
        if self.keep and self._one_shot:
            if self._kept is None:
                self._kept = []
            self._kept.append(batch)

    def _fresh(self) -> Iterable[Batch]:
        if self._factory is not None:
            return self._factory()
        return self._batches


def _run_pass(work, graph: _GraphInfo, types, group, batch_iter: Iterator[Batch], record, mask_input, threads,
              counts, stats, hists) -> tuple[int, int]:
    """One pass over the batches for the items in ``group``; returns (batches, samples) seen.
    ``record`` (first pass only) is called with every batch."""
    fetch = [name for name, _ in group if name not in graph.inputs]
    fetch = list(dict.fromkeys(fetch))
    session = None
    if fetch:
        added = [name for name in fetch if name not in graph.outputs]
        base = len(work.graph.output)
        work.graph.output.extend(_output_info(name, types) for name in added)
        try:
            session = make_session(work.SerializeToString(), "CPUExecutionProvider", threads)
        finally:
            del work.graph.output[base:]
    n_batches = n_samples = 0
    for index, batch in enumerate(batch_iter):
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
            values = dict(zip(fetch, _run(session, fetch, feeds, index)))
        for name, is_index in group:
            value = values[name] if name in values else _fed(batch, name, index)
            if is_index:
                _count(name, value, mask, counts[name], hists[name], index)
            else:
                _accumulate(name, value, mask, stats, index)
        n_batches += 1
        first = next(iter(batch.values()), None)
        n_samples += int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1
    if n_batches == 0:
        raise OnnxlrError("no calibration batches")
    return n_batches, n_samples


def _fed(batch: Batch, name: str, index: int) -> np.ndarray:
    if name not in batch:
        raise OnnxlrError(f"calibration batch {index} has no array for model input {name!r}")
    return np.asarray(batch[name])


def _masked(value: np.ndarray, mask: np.ndarray | None, leading: tuple) -> np.ndarray | None:
    """Boolean row selector when ``leading`` dims match the mask's shape (or are the flattened mask)."""
    if mask is None:
        return None
    if leading == mask.shape or (len(leading) == 1 and mask.ndim > 1 and leading[0] == mask.size):
        return mask.reshape(-1)
    return None


def _rows(value: np.ndarray, mask) -> np.ndarray:
    """The rows (m, k) of a tensor (..., k), padding rows left out where the mask applies."""
    value = np.asarray(value)
    if value.ndim == 0:
        value = value.reshape(1)
    rows = value.reshape(-1, value.shape[-1])
    keep = _masked(value, mask, value.shape[:-1])
    return rows if keep is None else rows[keep]


def _accumulate(name: str, value: np.ndarray, mask, stats: dict, index: int) -> None:
    rows = _rows(value, mask)
    k = rows.shape[1]
    current = stats.get(name)
    if current is None:
        current = stats[name] = TensorStats.zeros(k)
    elif current.k != k:
        raise OnnxlrError(f"tensor {name!r} has last dimension {k} in calibration batch {index}, "
                          f"but {current.k} before; its statistics need a fixed size")
    current.update(rows)


def _count(name: str, value: np.ndarray, mask, size: int, hist: np.ndarray, index: int) -> None:
    value = np.asarray(value)
    if not (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_):
        raise OnnxlrError(f"tensor {name!r} has dtype {value.dtype}; index counts need an integer tensor")
    keep = _masked(value, mask, value.shape)
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
