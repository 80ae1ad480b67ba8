"""Concrete tensor shapes of a model once its symbolic input dimensions are fixed (ONNX shape inference,
with onnx-graphsurgeon folding the shape computations inference cannot follow)."""

from __future__ import annotations

from typing import Mapping

import onnx
import onnx_graphsurgeon as gs

from onnxlr.feeds import free_dim


def input_shapes(model: onnx.ModelProto, dims: Mapping[str, int] | None = None) -> dict[str, list[int]]:
    """Concrete shapes of the tensors shape inference can resolve once the model inputs' symbolic
    dimensions are fixed: from ``dims``, else 1 for a leading (batch) dimension."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    # Shapes an exporter stored keep their symbolic dimensions through inference (torch's export of
    # MiniLM: 'batch' and 'sequence' everywhere), so they are inferred afresh from the fixed inputs.
    del fixed.graph.value_info[:]
    dims = dict(dims or {})
    for value in fixed.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value") or dim.dim_value < 0:  # -1: a free axis (paddle2onnx)
                size = free_dim(value.name, axis, dim.dim_param or None, dims, 1 if axis == 0 else 0)
                if size:
                    dim.dim_value = size
    shapes = _inferred_shapes(fixed)
    layers = [n.output[0] for n in fixed.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.output]
    if any(name not in shapes for name in layers):
        # Shapes computed at run time (torch's position ids: Shape → Gather → Slice) defeat ONNX's data
        # propagation; with the inputs fixed, onnx-graphsurgeon folds those computations to constants.
        try:
            folded = fixed
            for _ in range(2):  # folding reveals shapes, which let the next fold go further
                graph = gs.import_onnx(onnx.shape_inference.infer_shapes(folded, data_prop=True))
                folded = gs.export_onnx(graph.fold_constants(fold_shapes=True, error_ok=True).cleanup())
            shapes = {**_inferred_shapes(folded), **shapes}
        except Exception:  # noqa: BLE001 - best effort, as above
            pass
    return shapes


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Tensor name -> shape, for the tensors ONNX shape inference resolves completely (none if it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - best effort: layers with unknown shapes are reported as unmeasured
        return {}
    shapes = {}
    for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims_ = value.type.tensor_type.shape.dim
        if dims_ and all(d.HasField("dim_value") for d in dims_):
            shapes[value.name] = [d.dim_value for d in dims_]
    return shapes
