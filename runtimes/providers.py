"""Execution providers: short names, availability in the installed onnxruntime, sessions.

Users name providers briefly (``cpu``, ``cuda``, ``xnnpack``…) or by their ONNX Runtime name. A name
onnxlr does not know is a user error; a known provider missing from this onnxruntime build is not an
error — it is reported with a hint about which package provides it.
"""

from __future__ import annotations

import os

import onnxruntime as ort

from onnxlr.errors import OnnxlrError

# short name -> (ONNX Runtime provider name, package that provides it)
KNOWN_PROVIDERS = {
    "cpu": ("CPUExecutionProvider", "onnxruntime"),
    "cuda": ("CUDAExecutionProvider", "onnxruntime-gpu"),
    "tensorrt": ("TensorrtExecutionProvider", "onnxruntime-gpu"),
    "openvino": ("OpenVINOExecutionProvider", "onnxruntime-openvino"),
    "xnnpack": ("XnnpackExecutionProvider", "an onnxruntime build with --use_xnnpack"),
    "nnapi": ("NnapiExecutionProvider", "onnxruntime-android"),
    "coreml": ("CoreMLExecutionProvider", "onnxruntime on macOS"),
    "dml": ("DmlExecutionProvider", "onnxruntime-directml"),
    "qnn": ("QNNExecutionProvider", "onnxruntime-qnn"),
    "rocm": ("ROCMExecutionProvider", "onnxruntime-rocm"),
}


def resolve_provider(name: str) -> str:
    """ONNX Runtime's name for a provider given by short or full name; OnnxlrError if unknown."""
    key = name.strip().lower()
    if key in KNOWN_PROVIDERS:
        return KNOWN_PROVIDERS[key][0]
    for full, _ in KNOWN_PROVIDERS.values():
        if key == full.lower():
            return full
    choices = ", ".join(KNOWN_PROVIDERS)
    raise OnnxlrError(f"unknown provider {name!r} (known: {choices})")


def parse_providers(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"cpu,cuda"`` or ``["cpu", "cuda"]`` -> ONNX Runtime provider names, in order, no repeats."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n for n in (n.strip() for n in names) if n]
    if not names:
        raise OnnxlrError("no provider given")
    resolved = []
    for name in names:
        full = resolve_provider(name)
        if full not in resolved:
            resolved.append(full)
    return resolved


def missing_reason(provider: str) -> str | None:
    """None if ``provider`` is in this onnxruntime build, else a one-line explanation."""
    if provider in ort.get_available_providers():
        return None
    package = next((pkg for full, pkg in KNOWN_PROVIDERS.values() if full == provider), "?")
    return f"{provider} is not in this onnxruntime build (install {package})"


def make_session(model: bytes | str | os.PathLike, provider: str, threads: int) -> ort.InferenceSession:
    """An InferenceSession on ``provider`` with an explicit intra-op thread count.

    Non-CPU providers get the CPU provider as fallback for the nodes they do not support, as ONNX
    Runtime itself does.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
