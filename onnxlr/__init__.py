"""onnxlr: make exported ONNX models smaller and faster with low-rank factorization.

    >>> import onnxlr
    >>> optimized, report = onnxlr.optimize("model.onnx", rank_ratio=0.5)
    >>> print(report.format())
"""

from onnxlr.api import inspect, optimize, validate, write
from onnxlr.errors import OnnxlrError
from onnxlr.report import Report

__all__ = ["optimize", "validate", "inspect", "write", "Report", "OnnxlrError"]
__version__ = "0.1.0"
