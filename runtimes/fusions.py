"""Which of ONNX Runtime's load-time fusions a model gets, and which an optimization lost.

ONNX Runtime rewrites a graph when it loads it: MatMul with a scale or bias into ``FusedMatMul`` /
``FusedGemm``, Conv with its activation into ``FusedConv``, residual Add + LayerNormalization into
``SkipLayerNormalization``, the Erf formula into ``Gelu``/``BiasGelu``, attention subgraphs into
``Attention``, integer chains into ``MatMulIntegerToFloat``… A rewrite that breaks a pattern ORT used
to fuse can cost more time than it saves, so validation compares the fused ops ORT produces for the
original and for the optimized model and reports every kind that became rarer.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter

import onnx
import onnxruntime as ort

FUSED_OPS = ("FusedMatMul", "FusedGemm", "FusedConv", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
             "Gelu", "BiasGelu", "FastGelu", "Attention", "MultiHeadAttention", "EmbedLayerNormalization",
             "BiasSoftmax", "BiasAdd", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul",
             "QLinearConv", "QGemm")


# Kinds that are one fusion in different clothes: a Gelu whose bias moved into an integer MatMul is
# still a fused Gelu.
FAMILY = {"BiasGelu": "Gelu", "FastGelu": "Gelu"}


def fused_op_counts(model: bytes | str | os.PathLike, threads: int = 1) -> Counter:
    """How many nodes of each fused kind ONNX Runtime's CPU provider makes of ``model`` (basic and
    extended optimizations: the graph ORT really runs, minus layout-specific rewrites), kinds of one
    family (``FAMILY``) counted together."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        # a model above protobuf's 2 GB (external data) can only be saved with its weights beside it
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         "optimized.onnx.data")
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        source = model if isinstance(model, bytes) else str(model)
        ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
    return Counter(FAMILY.get(node.op_type, node.op_type) for node in graph.node if node.op_type in FUSED_OPS)


def lost_fusions(original: Counter, optimized: Counter) -> dict[str, tuple[int, int]]:
    """Fused kinds that are rarer in the optimized model: ``{op: (count before, count after)}``."""
    return {op: (original[op], optimized[op]) for op in sorted(set(original)) if optimized[op] < original[op]}
