"""onnxlr: make exported ONNX models smaller and faster — low-rank factorization, quantization and
pruning, validated with ONNX Runtime.

    >>> import onnxlr
    >>> optimized, report = onnxlr.optimize("model.onnx", rank_ratio=0.5)
    >>> print(report.format())
"""

from onnxlr.api import inspect, optimize, validate, write
from onnxlr.errors import OnnxlrError
from onnxlr.report import Report
from onnxlr.version import __version__

__all__ = ["optimize", "validate", "inspect", "write", "Report", "OnnxlrError", "__version__"]
