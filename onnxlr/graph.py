"""Graph helpers shared by the passes, over onnx-graphsurgeon.

Passes see a ``gs.Graph`` in which every constant weight is a ``gs.Constant`` — whether the exporter
stored it as an initializer or as a ``Constant`` node (some exporters do the latter), because
:func:`hoist_constant_nodes` turns those nodes into initializers before import.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import mmap
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

# onnx-graphsurgeon logs to stdout ("colored module is not installed", "Could not convert: UNDEFINED"
# for a sequence or map output, "distinct Nodes share the same name"): onnxlr says what matters itself.
G_LOGGER.severity = G_LOGGER.ERROR

from onnxlr.external_data import external_extent


class MappedValues(LazyValues):
    """The values of a tensor kept in an external data file (a mapped model, :func:`onnxlr.io.load_model`),
    read through a read-only memory map when a pass first asks for them. The array remembers the
    tensor it maps, so :func:`export_model` writes the reference back instead of the bytes."""

    def load(self) -> np.ndarray:
        return mapped_array(self.tensor)


def mapped_array(tensor: onnx.TensorProto) -> np.ndarray:
    """A read-only memory map of an externally stored tensor (absolute location), shaped and typed."""
    location, offset, _ = external_extent(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
    shape = tuple(int(d) for d in tensor.dims)
    if int(np.prod(shape)) == 0:
        return np.zeros(shape, dtype)
    array = np.memmap(location, dtype=dtype, mode="r", offset=offset, shape=shape)
    array._onnxlr_source = tensor
    return array


def release_pages(array) -> None:
    """Drop the pages of a memory-mapped ``array`` from this process's memory (they stay in the file and
    are read again if touched): after a weight is factorized, its pages no longer count in the peak."""
    while array is not None and not isinstance(array, mmap.mmap):  # views (.T, asarray) lead to the map
        array = getattr(array, "base", None)
    if array is not None and hasattr(mmap, "MADV_DONTNEED"):
        array.madvise(mmap.MADV_DONTNEED)


# Tensors a pass creates while a spill file is active (:func:`spilling`) go to that file once they
# reach this size, and are kept as memory maps: factors of a model larger than memory never all sit
# in memory at once.
SPILL_MIN_BYTES = 1024 * 1024
_SPILL: contextvars.ContextVar["SpillFile | None"] = contextvars.ContextVar("onnxlr_spill", default=None)


class SpillFile:
    """An append-only data file for tensors made by passes on a mapped model."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "ab")

    def add(self, name: str, array: np.ndarray) -> np.ndarray:
        """Write ``array`` and return it as a memory map of what was written."""
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        offset = self._file.seek(0, os.SEEK_END)
        self._file.write(array.tobytes())
        self._file.flush()
        tensor = onnx.TensorProto(name=name, dims=array.shape,
                                  data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                  data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", str(self.path)), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return mapped_array(tensor)

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def spilling() -> Iterator[SpillFile]:
    """While active, large constants made with :func:`make_constant` are written to a spill file in a
    new temporary folder instead of staying in memory. The folder outlives the block (the model refers
    to the file until written) and is removed when the process exits."""
    folder = Path(tempfile.mkdtemp(prefix="onnxlr-spill-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    spill = SpillFile(folder / "spill.data")
    token = _SPILL.set(spill)
    try:
        yield spill
    finally:
        _SPILL.reset(token)
        spill.close()


def make_constant(graph: gs.Graph, name: str, values: np.ndarray, taken: set[str] | None = None) -> gs.Constant:
    """A new constant named ``name`` (made unique in ``graph`` and among ``taken``, the names of
    constants made but not yet in the graph, which it joins), spilled to disk when a spill file is
    active and it is large (see :func:`spilling`)."""
    name = unique_name(graph, name, taken or ())
    if taken is not None:
        taken.add(name)
    values = np.ascontiguousarray(values)
    spill = _SPILL.get()
    if spill is not None and values.nbytes >= SPILL_MIN_BYTES:
        values = spill.add(name, values)
    return gs.Constant(name, values)


def hoist_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of ``model`` whose tensor-valued ``Constant`` nodes are initializers — of the graph
    or subgraph (If branch, Loop or Scan body) that holds them.

    The two forms compute the same thing; initializers are what weight-rewriting passes look for.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _hoist(out.graph)
    return out


def _hoist(graph: onnx.GraphProto) -> None:
    kept = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and value is not None:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            continue
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _hoist(sub)
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def overridable_initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers also listed as graph inputs, from IR 4 on: only default values the caller may
    feed over, so not constants. (Before IR 4 every initializer had to be listed: there it means nothing.)"""
    if model.ir_version < 4:
        return {}
    listed = {value.name for value in model.graph.input}
    return {t.name: t for t in model.graph.initializer if t.name in listed}


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import ``model`` into onnx-graphsurgeon, with Constant nodes hoisted to initializers.

    An overridable initializer (:func:`overridable_initializers`) is imported as the graph input it
    is — a ``gs.Variable``, which no pass takes for a constant weight; :func:`export_model` puts its
    default value back (onnx-graphsurgeon alone would drop the input and keep only the constant)."""
    hoisted = hoist_constant_nodes(model)
    overridable = overridable_initializers(hoisted)
    if overridable:
        kept = [t for t in hoisted.graph.initializer if t.name not in overridable]
        del hoisted.graph.initializer[:]
        hoisted.graph.initializer.extend(kept)
    graph = gs.import_onnx(hoisted)
    for tensor in graph.tensors().values():
        lazy = getattr(tensor, "_values", None)
        if type(lazy) is LazyValues and lazy.tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor._values = MappedValues(lazy.tensor)
    return graph


def export_model(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` back to a ModelProto, keeping ``template``'s model-level metadata."""
    graph.cleanup().toposort()
    for tensor in graph.tensors().values():  # mapped values are written as the reference they came from
        source = getattr(getattr(tensor, "_values", None), "_onnxlr_source", None)
        if source is not None:
            tensor._values = MappedValues(source)
    model = gs.export_onnx(graph)
    _keep_value_types(model.graph, template.graph)
    _share_subgraph_initializers(model.graph)
    model.ir_version = template.ir_version
    model.model_version = template.model_version
    model.domain = template.domain
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    # default values of overridable inputs (see import_graph), for the inputs still there
    defaults = overridable_initializers(template)
    stored = {t.name for t in model.graph.initializer}
    model.graph.initializer.extend(defaults[value.name] for value in model.graph.input
                                   if value.name in defaults and value.name not in stored)
    if model.ir_version < 4:
        # Before IR 4 every initializer must also be a graph input (e.g. the opset-9 model zoo graphs).
        listed = {value.name for value in model.graph.input}
        model.graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in model.graph.initializer if t.name not in listed)
    return model


def _share_subgraph_initializers(graph: onnx.GraphProto) -> None:
    """onnx-graphsurgeon exports a weight read only inside subgraphs as an initializer of each subgraph
    that reads it: a weight read by two branches would be stored twice (Silero VAD grew by half). Such a
    weight is stored once, in the main graph, which every subgraph reads through its outer scope."""
    where: dict[str, list[onnx.GraphProto]] = {}

    def walk(g: onnx.GraphProto) -> None:
        for node in g.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    for tensor in sub.initializer:
                        where.setdefault(tensor.name, []).append(sub)
                    walk(sub)

    walk(graph)
    top = {t.name: t for t in graph.initializer}
    for name, holders in where.items():
        if len(holders) < 2 and name not in top:
            continue
        copies = [next(t for t in h.initializer if t.name == name) for h in holders] + \
            ([top[name]] if name in top else [])
        if any(c.SerializeToString() != copies[0].SerializeToString() for c in copies[1:]):
            continue  # one name, different tensors in different scopes: each keeps its own
        if name not in top:
            graph.initializer.append(copies[0])
        for holder in holders:
            kept = [t for t in holder.initializer if t.name != name]
            del holder.initializer[:]
            holder.initializer.extend(kept)


def _keep_value_types(graph: onnx.GraphProto, template: onnx.GraphProto) -> None:
    """Give graph inputs and outputs that are not tensors (a sequence of maps from a ZipMap, an optional…)
    their type from ``template``: onnx-graphsurgeon keeps only tensor element types and would export
    them as tensors of an undefined type."""
    kinds = {value.name: value.type for value in [*template.input, *template.output]
             if not value.type.HasField("tensor_type")}
    for value in [*graph.input, *graph.output]:
        if value.name in kinds:
            value.type.CopyFrom(kinds[value.name])


def truncated(graph: gs.Graph, outputs: Mapping[str, np.dtype], template: onnx.ModelProto) -> onnx.ModelProto:
    """A model computing only ``outputs`` (tensor name -> element type) of ``graph``: every node they do
    not depend on is dropped, the graph inputs are kept. ``graph`` itself is not modified."""
    part = graph.copy()
    tensors = part.tensors()
    inputs = {t.name for t in part.inputs}
    part.outputs = [tensors[name] for name in outputs if name not in inputs]
    for tensor in part.outputs:
        tensor.dtype = tensor.dtype or outputs[tensor.name]
    return export_model(part, template)


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of ``tensor`` if it is a constant, else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def consumer_counts(graph: gs.Graph) -> Counter:
    """How many node inputs read each tensor name (a weight read twice is shared), the nodes of
    subgraphs included (they may read a tensor of the outer graph)."""
    counts: Counter = Counter()
    for node in [*graph.nodes, *(inner for inner, _ in subgraph_nodes(graph))]:
        for tensor in node.inputs:
            counts[tensor.name] += 1
    return counts


def subgraphs(graph: gs.Graph):
    """``graph`` and every subgraph in it (If branches, Loop and Scan bodies), at any depth, outermost
    first. Tensors are shared objects across scopes: an outer-scope weight read in a branch is the same
    ``gs.Constant``, and its ``outputs`` list every reader in every scope."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, gs.Graph):
                    yield from subgraphs(sub)


def subgraph_nodes(graph: gs.Graph):
    """``(node, owner)`` for every node inside a subgraph of ``graph`` (If branches, Loop and Scan
    bodies, at any depth); ``owner`` is the node of ``graph`` that holds it."""
    def walk(node):
        for value in node.attrs.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(sub, gs.Graph):
                    for inner in sub.nodes:
                        yield inner
                        yield from walk(inner)

    for owner in graph.nodes:
        for inner in walk(owner):
            yield inner, owner


def in_subgraph_reason(inner: gs.Node, owner: gs.Node) -> str:
    return (f"inside a subgraph of {owner.op} node {owner.name!r}: this pass rewrites the top-level graph "
            "only")


def unique_name(graph: gs.Graph, base: str, also=()) -> str:
    """``base``, or ``base_1``, ``base_2``… — the first name no tensor or node in ``graph`` or its
    subgraphs uses (nor any of ``also``): pass the top-level graph, whose scopes all share names."""
    taken = set(also)
    for g in subgraphs(graph):
        taken |= set(g.tensors().keys()) | {node.name for node in g.nodes}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of scalar weights in the model's initializers and Constant nodes, those of If/Loop/Scan
    subgraphs included."""
    def count(graph: onnx.GraphProto) -> int:
        total = sum(int(np.prod(t.dims)) for t in graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Constant" and attr.name == "value":
                    total += int(np.prod(attr.t.dims))
                total += sum(count(g) for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
        return total

    return count(model.graph)




CONTRIB_DOMAIN = "com.microsoft"


def import_contrib_domain(graph: gs.Graph) -> None:
    """Declare ONNX Runtime's com.microsoft opset (version 1, the only one) in the exported model."""
    if graph.import_domains is None:
        graph.import_domains = [onnx.helper.make_opsetid("", graph.opset)]
    if all(d.domain != CONTRIB_DOMAIN for d in graph.import_domains):
        graph.import_domains.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))


def add_low_rank_branch(graph: gs.Graph, Y: gs.Variable, X: gs.Tensor, A: np.ndarray, B: np.ndarray, name: str) -> None:
    """Make ``Y`` read ``Y + (X @ A) @ B``: a float low-rank correction (A: (k, r), B: (r, n)) of the
    layer that computes ``Y`` from ``X`` — how compensation of a quantized or pruned layer is added."""
    producer = next(node for node in graph.nodes if Y in node.outputs)
    inner = gs.Variable(unique_name(graph, f"{name}/uncompensated"), dtype=Y.dtype)
    producer.outputs[producer.outputs.index(Y)] = inner
    H = gs.Variable(unique_name(graph, f"{name}/comp_h"), dtype=np.float32)
    delta = gs.Variable(unique_name(graph, f"{name}/comp_out"), dtype=np.float32)
    A_c = gs.Constant(unique_name(graph, f"{name}/comp_A"), np.ascontiguousarray(A, dtype=np.float32))
    B_c = gs.Constant(unique_name(graph, f"{name}/comp_B"), np.ascontiguousarray(B, dtype=np.float32))
    graph.nodes.extend([
        gs.Node("MatMul", name=unique_name(graph, f"{name}/comp_A"), inputs=[X, A_c], outputs=[H]),
        gs.Node("MatMul", name=unique_name(graph, f"{name}/comp_B"), inputs=[H, B_c], outputs=[delta]),
        gs.Node("Add", name=unique_name(graph, f"{name}/compensate"), inputs=[inner, delta], outputs=[Y]),
    ])



def add_after(graph: gs.Graph, node: gs.Node, bias: np.ndarray, name: str, owner: gs.Graph | None = None) -> None:
    """Make ``node``'s first output read ``node(x) + bias``: a new Add takes over the output tensor.
    ``owner``: the (sub)graph holding ``node``, if not ``graph`` (names are made unique in ``graph``)."""
    out = node.outputs[0]
    pre = gs.Variable(unique_name(graph, f"{name}_pre_bias"), dtype=out.dtype)
    node.outputs[0] = pre
    constant = gs.Constant(unique_name(graph, f"{name}_bias"), bias)
    (owner or graph).nodes.append(gs.Node("Add", name=unique_name(graph, f"{name}_bias_add"), inputs=[pre, constant],
                                          outputs=[out]))
