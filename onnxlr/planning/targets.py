"""Whole-model targets (``--target``) and the budget they leave to the factorizable layers.

A target keeps a share of the model's parameters (``params=0.5``), of its multiply-adds per run at the
``--dim`` sizes (``macs=0.5``), of its latency on the first provider (``latency=0.7``), fits its
serialized size (``bytes=12MB``), or asks for the smallest share that still meets ``--max-error``
(``lossless``). Everything outside the factorizable MatMul/Gemm weights counts as it is.
"""

from __future__ import annotations

import re
from typing import Mapping, NamedTuple

import onnx
import onnx_graphsurgeon as gs

from onnxlr.errors import OnnxlrError
from onnxlr.graph import count_parameters, import_graph
from onnxlr.macs import count_macs, node_key
from onnxlr.matching import find_layers

KINDS = ("params", "macs", "bytes", "latency")
# Room a bytes target keeps for the provenance onnxlr records in the written model's metadata_props
# (version, settings, validation figures: typically 0.5-1 KB).
PROVENANCE_BYTES = 1024
SIZE_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30}


class Target(NamedTuple):
    """``kind`` (:data:`KINDS` or ``lossless``) and ``value``: a share in (0, 1], bytes for ``bytes``,
    None for ``lossless``."""

    kind: str
    value: float | None = None

    @property
    def lossless(self) -> bool:
        return self.kind == "lossless"

    def __str__(self) -> str:
        return self.kind if self.lossless else f"{self.kind}={self.value:.4f}"


def parse_target(spec: str | tuple[str, float] | Target) -> Target:
    """``"params=0.5"`` -> ``Target("params", 0.5)``: keep this share of the model's parameters (``macs``:
    of its multiply-adds per run, ``latency``: of its latency); ``"bytes=12MB"`` -> ``Target("bytes",
    12e6)``: a serialized size (B, KB, MB, GB, KiB, MiB, GiB; none = bytes); ``"lossless"``."""
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, tuple):
        kind, value = spec
    elif str(spec).strip() == "lossless":
        return Target("lossless")
    else:
        kind, sep, value = str(spec).partition("=")
        if not sep:
            raise OnnxlrError(f"malformed --target {spec!r}: expected KIND=VALUE, e.g. params=0.5")
    kind = kind.strip()
    if kind not in KINDS:
        raise OnnxlrError(f"unknown --target kind {kind!r} (supported: {', '.join(KINDS)}, lossless)")
    text = str(value).strip()
    unit = 1.0
    if kind == "bytes":
        number_part = re.match(r"[-+0-9.eE]*", text).group()
        suffix = text[len(number_part):].strip()
        if suffix.upper() not in SIZE_UNITS:
            raise OnnxlrError(f"malformed --target {spec!r}: unknown size unit {suffix!r}")
        text, unit = number_part, SIZE_UNITS[suffix.upper()]
    try:
        number = float(text) * unit
    except ValueError:
        raise OnnxlrError(f"malformed --target {spec!r}: {value!r} is not a number") from None
    if kind == "bytes":
        if number <= 0:
            raise OnnxlrError(f"--target bytes must be a positive size, got {value}")
    elif not 0.0 < number <= 1.0:
        raise OnnxlrError(f"--target {kind} must be a share in (0, 1], got {value}")
    return Target(kind, number)


def layer_budget(model: onnx.ModelProto, target: Target | str, graph: gs.Graph | None = None,
                 dims: Mapping[str, int] | None = None) -> tuple[int, dict[str, float] | None]:
    """The budget left to the factorizable MatMul/Gemm weights when the whole model must meet
    ``target`` (``params``, ``macs`` at ``dims``, or ``bytes``); everything else stays as it is.
    Returns ``(budget, unit_costs)``: ``unit_costs[weight]`` is what one of its parameters takes of the
    budget (bytes per value; for ``macs`` the rows the weight multiplies per run); None for ``params``."""
    target = parse_target(target)
    graph = graph if graph is not None else import_graph(model)
    layers, _ = find_layers(graph)
    weights = {layer.weight.name: layer.W for layer in layers}
    if target.kind == "params":
        total, unit_costs, what = count_parameters(model), None, "parameters"
        factorizable = sum(W.size for W in weights.values())
    elif target.kind == "bytes":
        unit_costs = {name: float(W.dtype.itemsize) for name, W in weights.items()}
        total = model.ByteSize() + PROVENANCE_BYTES
        factorizable = sum(W.nbytes for W in weights.values())
        budget = target.value - (total - factorizable)
        if budget <= 0:
            raise OnnxlrError(f"--target bytes={target.value:,.0f} is out of reach: the model holds "
                              f"{total - factorizable:,} bytes outside its factorizable MatMul/Gemm weights")
        return int(budget), unit_costs
    else:
        total, unit_costs, factorizable = _macs(model, layers, dims)
        what = "multiply-adds"
    budget = target.value * total - (total - factorizable)
    if budget <= 0:
        raise OnnxlrError(f"--target {target.kind}={target.value:g} is out of reach: the factorizable MatMul/Gemm "
                          f"weights hold {factorizable:,} of the model's {total:,} {what} "
                          f"(the rest alone is {(total - factorizable) / total:.1%} of the model)")
    return int(budget), unit_costs


def _macs(model: onnx.ModelProto, layers, dims) -> tuple[int, dict[str, float], int]:
    """The model's multiply-adds per run, each weight's rows per run, and the layers' share of the MACs."""
    macs = count_macs(model, dims)
    unknown = [node_key(layer.node) for layer in layers if node_key(layer.node) not in macs.per_node]
    if unknown:
        raise OnnxlrError(f"cannot count the multiply-adds of {unknown[0]!r}: its shapes stay unknown; set "
                          f"the model's symbolic dimensions with --dim NAME=VALUE")
    unit_costs: dict[str, float] = {}
    for layer in layers:  # a weight read by several nodes costs the rows of all of them
        rows = macs.per_node[node_key(layer.node)] / layer.W.size
        unit_costs[layer.weight.name] = unit_costs.get(layer.weight.name, 0.0) + rows
    return macs.total, unit_costs, sum(macs.per_node[node_key(layer.node)] for layer in layers)
