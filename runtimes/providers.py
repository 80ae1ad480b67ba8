"""Execution providers: short names, options, availability in the installed onnxruntime, sessions.

Users name providers briefly (``cpu``, ``cuda``, ``xnnpack``…) or by their ONNX Runtime name, with
options after colons (``cuda:device_id=1``, ``openvino:device_type=GPU``), or say ``all`` for every
provider of the onnxruntime build that runs them. A name onnxlr does not know is a user error; a
known provider missing from this build is not an error — it is reported with the package that
provides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import onnxruntime as ort

# ONNX Runtime's own warnings (graph optimizers, onnx-graphsurgeon's folding sessions) are not the user's
# business; onnxlr reports what matters.
ort.set_default_logger_severity(4)  # errors too: onnxlr reports a failed run in its own words

from onnxlr.errors import OnnxlrError
from onnxlr.runtimes import runner

ALL = runner.ALL


@dataclass(frozen=True)
class ProviderInfo:
    short: str
    name: str  # ONNX Runtime's name
    package: str  # what provides it when this build lacks it
    options: tuple[str, ...] = ()  # the options users most often set (any option ORT takes is passed on)


KNOWN_PROVIDERS = {info.short: info for info in (
    ProviderInfo("cpu", "CPUExecutionProvider", "onnxruntime"),
    ProviderInfo("cuda", "CUDAExecutionProvider", "onnxruntime-gpu", ("device_id", "cudnn_conv_algo_search")),
    ProviderInfo("tensorrt", "TensorrtExecutionProvider", "onnxruntime-gpu", ("device_id", "trt_fp16_enable")),
    ProviderInfo("openvino", "OpenVINOExecutionProvider", "onnxruntime-openvino (in its own environment: --device)",
                 ("device_type", "num_of_threads", "precision")),
    ProviderInfo("xnnpack", "XnnpackExecutionProvider", "an onnxruntime build with --use_xnnpack (e.g. onnxruntime-android)",
                 ("intra_op_num_threads",)),
    ProviderInfo("nnapi", "NnapiExecutionProvider", "onnxruntime-android (static check: onnxlr's mobile report)"),
    ProviderInfo("coreml", "CoreMLExecutionProvider", "onnxruntime on macOS / iOS (static check: onnxlr's mobile report)",
                 ("ModelFormat", "MLComputeUnits")),
    ProviderInfo("dml", "DmlExecutionProvider", "onnxruntime-directml", ("device_id",)),
    ProviderInfo("qnn", "QNNExecutionProvider", "onnxruntime-qnn", ("backend_path",)),
    ProviderInfo("rocm", "ROCMExecutionProvider", "onnxruntime-rocm", ("device_id",)),
    ProviderInfo("migraphx", "MIGraphXExecutionProvider", "onnxruntime-migraphx", ("device_id",)),
    ProviderInfo("dnnl", "DnnlExecutionProvider", "an onnxruntime build with --use_dnnl"),
    ProviderInfo("azure", "AzureExecutionProvider", "onnxruntime"),
)}
_BY_NAME = {info.name.lower(): info for info in KNOWN_PROVIDERS.values()}


@dataclass(frozen=True)
class ProviderSpec:
    """One requested provider: ONNX Runtime's name (or ``all``) and the options the user gave."""

    name: str
    options: dict[str, str] = field(default_factory=dict, hash=False)


def resolve_provider(name: str) -> str:
    """ONNX Runtime's name for a provider given by short or full name; OnnxlrError if unknown."""
    key = name.strip().lower()
    if key in KNOWN_PROVIDERS:
        return KNOWN_PROVIDERS[key].name
    if key in _BY_NAME:
        return _BY_NAME[key].name
    if key.endswith("executionprovider"):  # a provider of a newer onnxruntime than this table
        return name.strip()
    raise OnnxlrError(f"unknown provider {name!r} (known: all, {', '.join(KNOWN_PROVIDERS)})")


def parse_provider_specs(spec: str | list[str] | tuple[str, ...]) -> list[ProviderSpec]:
    """``"cpu,cuda:device_id=1"`` or ``["cpu", "openvino:device_type=GPU"]`` -> ProviderSpecs in order,
    no repeats; ``all`` stays as the spec ``ProviderSpec("all")`` (expanded where the models run)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [s for s in (s.strip() for s in items) if s]
    if not items:
        raise OnnxlrError("no provider given")
    specs: list[ProviderSpec] = []
    for item in items:
        name, *pairs = item.split(":")
        options = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise OnnxlrError(f"malformed provider option {pair!r} in {item!r}: expected KEY=VALUE")
            options[key.strip()] = value.strip()
        if name.strip().lower() == ALL:
            if options:
                raise OnnxlrError("'all' takes no options; give them per provider (e.g. all,cuda:device_id=1)")
            full = ALL
        else:
            full = resolve_provider(name)
        if all(s.name != full for s in specs):
            specs.append(ProviderSpec(full, options))
    return specs


def parse_providers(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Provider names of ``spec`` (options dropped), ``all`` expanded to this build's local devices."""
    names: list[str] = []
    for s in parse_provider_specs(spec):
        for name in (local_devices() if s.name == ALL else [s.name]):
            if name not in names:
                names.append(name)
    return names


def local_devices() -> list[str]:
    """Providers of the installed onnxruntime that run models here (Azure, a remote endpoint, excluded)."""
    return [p for p in ort.get_available_providers() if p not in runner.NOT_DEVICES]


def missing_reason(provider: str, build: str = "this onnxruntime build") -> str | None:
    """None if ``provider`` is in this onnxruntime build, else a one-line explanation."""
    if provider in ort.get_available_providers():
        return None
    return not_in_build(provider, build)


def not_in_build(provider: str, build: str) -> str:
    info = _BY_NAME.get(provider.lower())
    return f"{provider} is not in {build} (install {info.package if info else 'a build that has it'})"


def registry() -> list[dict[str, object]]:
    """Every provider onnxruntime knows of: short name, full name, whether this build has it, the
    package that provides it, the options users usually set and the ones onnxlr sets by default."""
    available = ort.get_available_providers()
    names = list(dict.fromkeys([*available, *ort.get_all_providers()]))
    rows = []
    for name in names:
        info = _BY_NAME.get(name.lower())
        rows.append({"short": info.short if info else "", "name": name, "in_build": name in available,
                     "package": info.package if info else "", "options": list(info.options) if info else [],
                     "defaults": runner.default_options(name, default_threads())})
    return rows


def make_session(model: bytes | str | os.PathLike, provider: str, threads: int,
                 options: dict[str, str] | None = None) -> ort.InferenceSession:
    """An InferenceSession on ``provider`` with an explicit intra-op thread count (the runner's session:
    the provider's default options under ``options``, CPU fallback for nodes it does not take)."""
    source = model if isinstance(model, bytes) else str(model)
    return runner.session(source, provider, options, threads)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
