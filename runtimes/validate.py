"""Run an original and an optimized model side by side on each provider and compare them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from onnxlr.errors import OnnxlrError
from onnxlr.runtimes import compare as cmp
from onnxlr.runtimes import fusions
from onnxlr.runtimes import latency as lat
from onnxlr.runtimes.feeds import batches
from onnxlr.runtimes.providers import make_session, missing_reason

ModelSource = bytes | str | os.PathLike


@dataclass
class ProviderResult:
    """Agreement and speed of the optimized model against the original on one provider."""

    provider: str
    available: bool
    reason: str = ""  # why the provider was not run, or why the optimized model failed on it
    outputs: list[cmp.OutputComparison] = field(default_factory=list)
    latency_original: lat.Latency | None = None
    latency_optimized: lat.Latency | None = None
    # CPU only: ONNX Runtime fusions the original got and the optimized model lost, op -> (before, after)
    lost_fusions: dict[str, tuple[int, int]] | None = None

    @property
    def speedup(self) -> float | None:
        if self.latency_original and self.latency_optimized:
            return self.latency_original.median_ms / self.latency_optimized.median_ms
        return None


@dataclass
class Validation:
    inputs: str  # where the sample inputs came from
    samples: int  # rows along axis 0 compared (1 for synthetic single batches)
    latency_batch: dict[str, list[int]]  # input shapes used for timing
    threads: int
    providers: list[ProviderResult]


def _run_all(session: ort.InferenceSession, feeds, batch_size: int) -> dict[str, np.ndarray]:
    """Outputs over all of ``feeds``, run in batches and concatenated along axis 0."""
    names = [o.name for o in session.get_outputs()]
    progress = tqdm(batches(feeds, batch_size), desc="compare", unit="batch", disable=None, leave=False)
    chunks = [session.run(None, batch) for batch in progress]
    if len(chunks) == 1:
        return dict(zip(names, chunks[0]))
    return {name: np.concatenate([np.atleast_1d(c[i]) for c in chunks]) for i, name in enumerate(names)}


def validate_models(
    original: ModelSource,
    optimized: ModelSource,
    feeds: dict[str, np.ndarray],
    *,
    providers: list[str],
    threads: int,
    batch_size: int = 8,
    warmup: int = 3,
    repeats: int = 20,
    inputs_label: str = "",
) -> Validation:
    """Compare ``optimized`` with ``original`` on every provider in ``providers``.

    All of ``feeds`` is compared, in batches of ``batch_size`` along axis 0; latency is timed on the
    first batch, interleaving the two models.
    """
    first = next(batches(feeds, batch_size))
    results = []
    for provider in providers:
        reason = missing_reason(provider)
        if reason:
            results.append(ProviderResult(provider, available=False, reason=reason))
            continue
        try:
            ref_session = make_session(original, provider, threads)
            reference = _run_all(ref_session, feeds, batch_size)
        except Exception as exc:  # ORT raises its own exception types for bad inputs
            raise OnnxlrError(f"the original model fails on {provider} with these inputs: {_one_line(exc)}") from None
        try:
            opt_session = make_session(optimized, provider, threads)
            produced = _run_all(opt_session, feeds, batch_size)
        except Exception as exc:
            results.append(ProviderResult(provider, available=True,
                                          reason=f"optimized model failed: {_one_line(exc)}"))
            continue
        mismatch = _output_mismatch(reference, produced)
        if mismatch:
            raise OnnxlrError(f"the models cannot be compared: {mismatch}")
        outputs = [cmp.compare(name, reference[name], produced[name]) for name in reference]
        timing = lat.measure({"original": ref_session, "optimized": opt_session}, first,
                             warmup=warmup, repeats=repeats)
        result = ProviderResult(provider, True, "", outputs, timing["original"], timing["optimized"])
        if provider == "CPUExecutionProvider":
            result.lost_fusions = fusions.lost_fusions(fusions.fused_op_counts(original, threads),
                                                       fusions.fused_op_counts(optimized, threads))
        results.append(result)
    leading = {v.shape[0] for v in feeds.values() if v.ndim}
    samples = leading.pop() if len(leading) == 1 else 1
    return Validation(
        inputs=inputs_label,
        samples=samples,
        latency_batch={k: list(v.shape) for k, v in first.items()},
        threads=threads,
        providers=results,
    )


def _output_mismatch(reference: dict[str, np.ndarray], produced: dict[str, np.ndarray]) -> str:
    """Why two models' outputs cannot be compared one to one, or "" if they can."""
    if list(reference) != list(produced):
        return f"outputs {list(reference)} vs {list(produced)}"
    for name, ref in reference.items():
        if ref.shape != produced[name].shape:
            return f"output {name!r} has shape {list(ref.shape)} vs {list(produced[name].shape)}"
    return ""


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:300]
