"""Run an original and an optimized model side by side on each provider and device, and compare them.

Each device (this process, or a ``--device`` command prefix) runs both models through the standalone
runner on the providers asked for (``all``: every provider of that device's onnxruntime build):
outputs over all samples, latency interleaved on the first batch, and ONNX Runtime's per-node
profile. onnxlr compares the outputs here. NNAPI and CoreML, which no machine here runs, get ONNX
Runtime's static partition analysis instead (:mod:`onnxlr.runtimes.mobile`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from onnxlr.errors import OnnxlrError
from onnxlr.io import has_external_data
from onnxlr import compare as cmp
from onnxlr.runtimes import fusions, mobile, profiling
from onnxlr.runtimes import latency as lat
from onnxlr.runtimes.devices import Device
from onnxlr.runtimes.providers import ALL, default_threads, make_session, not_in_build, parse_provider_specs
from onnxlr.runtimes.runner import batches

ModelSource = bytes | str | os.PathLike
PROFILE_RUNS = 10
# Providers whose static usability onnxlr checks (ONNX Runtime's mobile usability checker)
MOBILE_PROVIDERS = ("NnapiExecutionProvider", "CoreMLExecutionProvider")


@dataclass
class ProviderResult:
    """Agreement and speed of the optimized model against the original on one provider of one device."""

    provider: str
    available: bool  # the provider ran (or was meant to: status "failed")
    reason: str = ""  # why the provider was not run, or why a model failed on it
    status: str = "ran"  # ran | not_in_build | not_a_device | failed
    outputs: list[cmp.OutputComparison] = field(default_factory=list)
    latency_original: lat.Latency | None = None
    latency_optimized: lat.Latency | None = None
    # CPU only: ONNX Runtime fusions the original got and the optimized model lost, op -> (before, after)
    lost_fusions: dict[str, tuple[int, int]] | None = None
    device: str = "local"
    onnxruntime: str = ""  # version on that device
    options: dict[str, str] = field(default_factory=dict)
    profile: profiling.ProfileSummary | None = None
    emulated: str = ""  # what emulates the device ("qemu-aarch64 neoverse-n1"): outputs count, no timing

    @property
    def speedup(self) -> float | None:
        if self.latency_original and self.latency_optimized:
            return self.latency_original.median_ms / self.latency_optimized.median_ms
        return None

    @property
    def speedup_noise(self) -> float | None:
        """Relative noise of :attr:`speedup` in this run (:func:`onnxlr.runtimes.latency.speedup_noise`)."""
        if self.latency_original and self.latency_optimized:
            return lat.speedup_noise(self.latency_original, self.latency_optimized)
        return None

    @property
    def within_noise(self) -> bool:
        """The speed-up (or slow-down) is no larger than the run's noise."""
        noise = self.speedup_noise
        return noise is not None and abs(np.log(self.speedup)) <= np.log1p(noise)


@dataclass
class Validation:
    inputs: str  # where the sample inputs came from
    samples: int  # rows along axis 0 compared (1 for synthetic single batches)
    latency_batch: dict[str, list[int]]  # input shapes used for timing
    threads: int
    providers: list[ProviderResult]
    mobile: list[mobile.MobileCheck] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the rewrite made the model less provider-friendly


def validate_models(
    original: ModelSource,
    optimized: ModelSource,
    feeds: dict[str, np.ndarray],
    *,
    providers: str | list[str],
    threads: int,
    devices: list[Device] | None = None,
    batch_size: int = 8,
    warmup: int = 3,
    repeats: int = 20,
    profile_runs: int = PROFILE_RUNS,
    inputs_label: str = "",
) -> Validation:
    """Compare ``optimized`` with ``original`` on every provider of ``providers`` on every device.

    All of ``feeds`` is compared, in batches of ``batch_size`` along axis 0; latency is timed on the
    first batch, interleaving the two models; ``profile_runs`` profiled runs per model give per-node
    times (0: no profile).
    """
    specs = parse_provider_specs(providers)
    names = ALL if any(s.name == ALL for s in specs) else [s.name for s in specs]
    options = {s.name: s.options for s in specs if s.options}
    # Local runs open a model given as a path from its file (external data beside it); a device
    # gets the bytes.
    local = {"original": _local(original), "optimized": _local(optimized)}
    first = next(batches(feeds, batch_size))
    results, warnings = [], []
    for device in devices or [Device("local")]:
        models = local if device.is_local else {label: _sendable(m) for label, m in local.items()}
        response = device.run(models, feeds, providers=names, provider_options=options, threads=threads,
                              batch_size=batch_size, warmup=warmup, repeats=repeats, profile_runs=profile_runs)
        for raw in response["results"]:
            result = _provider_result(raw, device, response["onnxruntime"], inputs_label)
            result.emulated = response.get("emulated", "")
            if result.profile:
                warning = profiling.fallback_warning(result.profile, f"{result.provider} ({device.label})")
                if warning:
                    warnings.append(warning)
            if result.provider == "CPUExecutionProvider" and device.is_local and not result.reason:
                result.lost_fusions = fusions.lost_fusions(fusions.fused_op_counts(models["original"], threads),
                                                           fusions.fused_op_counts(models["optimized"], threads))
            results.append(result)
    checks = []
    if names == ALL or any(n in MOBILE_PROVIDERS for n in names):
        # the static check reads the graph, not the weights: a model with external data is read without them
        graphs = [onnx.load(m, load_external_data=False) if isinstance(m, str) else m
                  for m in (local["original"], local["optimized"])]
        checks = mobile.compare_models(*graphs, {k: list(v.shape) for k, v in first.items()})
        warnings.extend(w for check in checks for w in check.warnings)
    leading = {v.shape[0] for v in feeds.values() if v.ndim}
    return Validation(
        inputs=inputs_label,
        samples=leading.pop() if len(leading) == 1 else 1,
        latency_batch={k: list(v.shape) for k, v in first.items()},
        threads=threads,
        providers=results,
        mobile=checks,
        warnings=warnings,
    )


def _provider_result(raw: dict, device: Device, version: str, inputs_label: str) -> ProviderResult:
    """One provider's runner result, compared: outputs of the optimized model against the original's.
    The local CPU run is the reference: an original that fails there, or gives NaN/Inf, is an error."""
    if device.is_local and raw["provider"] == "CPUExecutionProvider":
        if raw["failed"] == "original":
            raise OnnxlrError(f"the original model fails on CPUExecutionProvider with these inputs: {raw['reason']}"
                              + _synthetic_hint(inputs_label))
        if "original" in raw["models"]:
            check_finite_outputs(raw["models"]["original"]["outputs"], inputs_label or "these inputs")
    build = "this onnxruntime build" if device.is_local else f"the onnxruntime {version} of device {device.label!r}"
    result = ProviderResult(raw["provider"], raw["available"], device=device.label, onnxruntime=version,
                            options=raw["options"])
    if not raw["available"]:
        result.status, result.reason = "not_in_build", not_in_build(raw["provider"], build)
        return result
    if raw["failed"]:
        result.status, result.reason = "failed", f"{raw['failed']} model failed: {raw['reason']}"
        return result
    if raw["reason"]:  # in the build but not a device to run on (Azure)
        result.available, result.status, result.reason = False, "not_a_device", f"{raw['provider']} {raw['reason']}"
        return result
    ran = raw["models"]
    reference, produced = ran["original"]["outputs"], ran["optimized"]["outputs"]
    mismatch = _output_mismatch(reference, produced)
    if mismatch:
        raise OnnxlrError(f"the models cannot be compared: {mismatch}")
    kinds = ran["original"].get("kinds", {})
    result.outputs = [cmp.compare(name, reference[name], produced[name], kinds.get(name, "tensor")) for name in reference]
    if "latency" in ran["original"]:  # not timed on an emulated device
        result.latency_original = lat.Latency(**ran["original"]["latency"])
        result.latency_optimized = lat.Latency(**ran["optimized"]["latency"])
    if "nodes" in ran["original"]:
        result.profile = profiling.summarize(ran["original"]["nodes"], ran["optimized"]["nodes"], result.provider)
    return result


def _local(model: ModelSource) -> bytes | str:
    """What the local runner opens: the bytes, or the path of a model with external data."""
    if isinstance(model, bytes):
        return model
    if has_external_data(model):
        return str(model)
    with open(model, "rb") as f:
        return f.read()


def _sendable(model: bytes | str) -> bytes:
    """What a device gets: the bytes (a path left by :func:`_local` is a model with external data)."""
    if isinstance(model, str):
        raise OnnxlrError(f"{model} keeps its weights in external data files: it is validated on this "
                          "machine only, not sent to --device")
    return model


def _output_mismatch(reference: dict[str, np.ndarray], produced: dict[str, np.ndarray]) -> str:
    """Why two models' outputs cannot be compared one to one, or "" if they can."""
    if list(reference) != list(produced):
        return f"outputs {list(reference)} vs {list(produced)}"
    for name, ref in reference.items():
        if ref.shape != produced[name].shape:
            return f"output {name!r} has shape {list(ref.shape)} vs {list(produced[name].shape)}"
    return ""


def check_original_outputs(model, feeds: dict[str, np.ndarray], source: str,
                           threads: int | None = None, batch_size: int = 8) -> None:
    """Run ``model`` (a ModelProto, or the path of a file ONNX Runtime opens itself) on CPU over the
    first batch of ``feeds`` (``batch_size`` rows along axis 0) and raise OnnxlrError when it cannot
    run in this ONNX Runtime (an opset or IR version it does not take, inputs it refuses…), or when an
    output holds NaN or Inf (:func:`check_finite_outputs`). Meant to run before any rewriting, to fail
    in seconds rather than after it; validation checks every output of the original again. ``source``
    says where the inputs came from."""
    try:
        opened = str(model) if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
        session = make_session(opened, "CPUExecutionProvider", threads or default_threads())
        names = [o.name for o in session.get_outputs()]
        counts = {name: [0, 0, 0] for name in names}  # output -> [NaN, Inf, values]
        for name, value in zip(names, session.run(None, next(batches(feeds, batch_size)))):
            counts[name] = [t + c for t, c in zip(counts[name], _nonfinite(value))]
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, …)
        detail = _ORT_PREFIX.sub("", " ".join(str(exc).split()))
        raise OnnxlrError(f"the original model cannot run in ONNX Runtime {ort.__version__} on {source}: "
                          f"{detail[:300]}{_synthetic_hint(source)}") from None
    _raise_if_nonfinite(counts, source)


def _synthetic_hint(source: str) -> str:
    """What to do when made-up inputs are what broke the original (an audio model fed a random sample
    rate, a detector a tiny image): give real ones."""
    if source.startswith("synthetic"):
        return " (the inputs were synthetic: give real ones with --inputs, or sizes with --dim)"
    return ""


def check_finite_outputs(outputs: dict[str, np.ndarray], source: str) -> None:
    """Raise OnnxlrError when an output of the original model holds NaN or Inf: the original is then
    broken on these inputs and no comparison against it means anything."""
    _raise_if_nonfinite({name: _nonfinite(value) for name, value in outputs.items()}, source)


def _nonfinite(value) -> list[int]:
    """[NaN count, Inf count, size] of one output."""
    value = np.asarray(value)
    if not np.issubdtype(value.dtype, np.floating):
        return [0, 0, value.size]
    return [int(np.count_nonzero(np.isnan(value))), int(np.count_nonzero(np.isinf(value))), value.size]


def _raise_if_nonfinite(counts: dict[str, list[int]], source: str) -> None:
    bad = [(name, c) for name, c in counts.items() if c[0] or c[1]]
    if bad:
        name, (nan, inf, size) = bad[0]
        raise OnnxlrError(f"the original model produces NaN/Inf in output {name!r} on {source} "
                          f"({nan + inf} of {size} values are not finite: {nan} NaN, {inf} Inf); "
                          f"fix the model or the inputs before compressing it")


# "[ONNXRuntimeError] : 1 : FAIL : /onnxruntime_src/…/file.cc:123 void ns::Function(args…) " before the message
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : (\S+:\d+ [^(]*\([^)]*\) )?")
