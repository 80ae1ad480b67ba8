"""The optimization report: what each pass did, sizes, and numerical / latency validation.

``Report.to_dict()`` is the JSON form (``--report out.json``); ``Report.format()`` the text the CLI
prints. Figures:

- params: scalar weights in initializers and Constant nodes; bytes: serialized model size.
- per rewritten layer: weight shape (k, n), chosen rank, parameters before → after, the share of the
  squared singular-value spectrum kept, and the relative weight error ``||W - AB|| / ||W||``.
- per provider and output: max abs error, relative L2 error ``||y' - y|| / ||y||``, cosine similarity
  (whole tensor and worst sample), and latency medians (p90) measured interleaved with the original;
  speed-up = original median / optimized median.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxlr.graph import count_parameters
from onnxlr.external_data import external_bytes
from onnxlr.pipeline import PassRecord
from onnxlr.compare import Tolerance
from onnxlr.runtimes.mobile import OrtConversion
from onnxlr.runtimes.validate import Validation


SCHEMA_VERSION = 2


def tolerance_met(tolerance: Tolerance | None, validation: Validation | None) -> bool | None:
    """Whether every output on every available provider meets ``tolerance`` (None: no tolerance, or not
    validated). An optimized model that fails to run on an available provider fails the tolerance too."""
    if tolerance is None or validation is None:
        return None
    ran = [p for p in validation.providers if p.available]
    return bool(ran) and all(not p.reason and all(tolerance.holds(o) for o in p.outputs) for p in ran)


# Agreement figures that call for a look before the result is used (each with its bound).
ALARMS = {"cosine_min": ("worst per-sample cosine", 0.9, "below"), "agreement": ("share of equal elements", 0.9, "below"),
          "rel_l2": ("relative L2 error", 0.2, "above")}


def output_alarms(comparison) -> list[str]:
    """Why one output's agreement with the original is alarming (:data:`ALARMS`), if it is."""
    found = []
    for key, (what, bound, side) in ALARMS.items():
        value = getattr(comparison, key)
        if value is not None and (value < bound if side == "below" else value > bound or not math.isfinite(value)):
            found.append(f"{what} {value:.4g} ({side} {bound:g}): check the result on your task before using it")
    return found


@dataclass(frozen=True)
class ModelSummary:
    params: int
    bytes: int
    nodes: int
    path: str = ""

    @classmethod
    def of(cls, model: onnx.ModelProto, path: str = "") -> "ModelSummary":
        # a mapped model's tensors are still in their files: their bytes count as they will be written
        return cls(count_parameters(model), model.ByteSize() + external_bytes(model), len(model.graph.node), path)


GROWTH_ALARM = 0.01  # a result larger than the original by more than this share is flagged; below it the
# growth is onnxlr's provenance metadata and an opset upgrade (411 bytes on PP-OCR det's 9.9 MB)


@dataclass(frozen=True)
class Report:
    original: ModelSummary
    optimized: ModelSummary
    passes: list[PassRecord] = field(default_factory=list)
    validation: Validation | None = None
    tolerance: Tolerance | None = None
    written: bool = False
    streamed: bool = False  # the input's external data stayed in its files (onnxlr.io mapped load)
    ort_format: OrtConversion | None = None  # the .ort copy written with --ort
    settings: dict[str, Any] = field(default_factory=dict)  # what the run was told (OptimizeOptions.describe)

    @property
    def passed(self) -> bool | None:
        """Whether every output on every available provider meets the tolerance (:func:`tolerance_met`)."""
        return tolerance_met(self.tolerance, self.validation)

    @property
    def alarms(self) -> list[str]:
        """Figures a user should not miss: outputs far from the original's (:data:`ALARMS`), a model that
        grew, a failed provider — whatever the tolerance said."""
        found = []
        if self.passes and self.optimized.bytes > self.original.bytes * (1 + GROWTH_ALARM):
            found.append(f"the model grew: {self.original.bytes:,} -> {self.optimized.bytes:,} bytes "
                         "(the passes above list each layer's parameters before and after)")
        for p in self.validation.providers if self.validation else []:
            found.extend(f"output {c.name} on {p.provider} ({p.device}): {alarm}" for c in p.outputs
                         for alarm in output_alarms(c))
        return found

    def written_to(self, path, ort_format: OrtConversion | None = None) -> "Report":
        """This report for a result written to ``path`` (and converted to ``.ort``: ``ort_format``)."""
        return dataclasses.replace(self, optimized=dataclasses.replace(self.optimized, path=str(path)),
                                   written=True, ort_format=ort_format)

    def pass_named(self, name: str) -> PassRecord | None:
        """The record of the pass called ``name`` (e.g. ``"factorize_matmul"``), None if it did not run."""
        return next((record for record in self.passes if record.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, described by docs/report.schema.json (``schema_version`` bumps on any
        incompatible change)."""
        out = {"schema_version": SCHEMA_VERSION, **dataclasses.asdict(self)}
        if self.ort_format:
            out["ort_format"]["path"] = str(self.ort_format.path)
        out["tolerance"] = str(self.tolerance) if self.tolerance else None
        out["passed"] = self.passed
        out["alarms"] = self.alarms
        if self.validation:
            for result, provider in zip(out["validation"]["providers"], self.validation.providers):
                result["speedup"] = provider.speedup
                result["speedup_noise"] = provider.speedup_noise
        return out

    def to_json(self) -> str:
        """Strict JSON: a non-finite number (an infinite relative error of an all-zero reference)
        is written as null, since JSON has no Infinity or NaN."""
        return json.dumps(_finite(self.to_dict()), indent=2, allow_nan=False)

    def format(self) -> str:
        """Human-readable report."""
        lines = []
        o, n = self.original, self.optimized
        lines.append(f"params  {o.params:,} -> {n.params:,}  ({_ratio(n.params, o.params)})")
        lines.append(f"bytes   {o.bytes:,} -> {n.bytes:,}  ({_ratio(n.bytes, o.bytes)})")
        for record in self.passes:
            lines.append("")
            lines.append(f"pass {record.name}: {len(record.rewritten)} rewritten, {len(record.skipped)} skipped")
            if "tried" in record.config:  # the lossless search: every share it built, and the one kept
                tried = ", ".join(f"{share:.3f} {'ok' if ok else 'fails'}" for share, ok in record.config["tried"].items())
                lines.append(f"  {record.config['tolerance']} on the calibration data: {tried}")
                lines.append(f"  kept: share {record.config.get('share', 'none')}"
                             + (f" (held-out retries {record.config['held_out_retries']})"
                                if record.config.get("held_out_retries") else ""))
            if "allocation" in record.config:
                lines.extend(_allocation_lines(record.config["allocation"]))
            methods = sorted({c.details.get("method", "") for c in record.rewritten} - {""})
            if methods:
                lines.append(f"  method: {', '.join(methods)}")
            solvers = Counter(c.details["svd_solver"] for c in record.rewritten if "svd_solver" in c.details)
            if solvers:
                where = record.config.get("executor")
                lines.append(f"  svd: {', '.join(f'{n} {name}' for name, n in sorted(solvers.items()))}"
                             + (f"; {where['workers']} {where['executor']} workers × {where['blas_threads']} BLAS "
                                f"threads" if where and where["executor"] != "serial" else ""))
            # rewrites with figures get a line each; the others (folds, renames) are grouped like skips
            lines.extend(_rewritten_line(change) for change in record.rewritten if _has_figures(change))
            lines.extend(_chain_line(change) for change in record.skipped if change.op == "chain")
            lines.extend(_grouped([c for c in record.rewritten if not _has_figures(c)], "rewritten"))
            lines.extend(_grouped([c for c in record.skipped if c.op != "chain"], "skipped"))
        if self.validation:
            lines.extend(_validation_lines(self.validation, self.tolerance))
        if self.ort_format:
            f = self.ort_format
            lines.append("")
            lines.append(f"ORT format: {f.path} ({f.bytes:,} bytes), " + (
                f"loads and runs, max abs difference from the .onnx {f.max_abs_diff:.3g}" if f.ok else f"FAILED: {f.reason}"))
        alarms = self.alarms
        if alarms:
            lines.append("")
            lines.extend(f"WARNING: {alarm}" for alarm in alarms)
        if self.passed is not None:
            lines.append("")
            lines.append(f"tolerance {self.tolerance}: {'PASSED' if self.passed else 'FAILED'}")
        elif alarms:
            lines.append("(no --max-error was given: the result is written all the same; set one to refuse such a result)")
        return "\n".join(lines)


def _has_figures(change) -> bool:
    return any(key in change.details for key in ("shape", "K", "widths", "hidden"))


def _grouped(changes, action: str) -> list[str]:
    """``  skipped 3: <reason>  [a, b, c]`` per reason."""
    reasons: dict[str, list[str]] = {}
    for change in changes:
        reasons.setdefault(change.reason, []).append(change.node)
    return [f"  {action} {len(nodes)}: {reason}  [{', '.join(nodes[:3])}{f' … (+{len(nodes) - 3})' if len(nodes) > 3 else ''}]"
            for reason, nodes in reasons.items()]


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _ratio(new: int, old: int) -> str:
    return f"{new / old:.1%} of original" if old else "n/a"


def _chain_line(change) -> str:
    """One chain of linear layers: its ops, widths before and after, params, error (or why kept)."""
    d = change.details
    widths = "→".join(str(w) for w in d["widths"])
    new = "→".join(str(w) for w in d["new_widths"])
    line = f"  {change.node:<40} chain {'→'.join(d['ops'])}  widths {widths} -> "
    if change.action == "skipped":
        return line + f"{new}: kept, {change.reason}"
    error = (f"output err {d['calib_error']:.2e}" if d.get("calibrated") else f"weight err {d['weight_error']:.2e}")
    return line + f"{new} ({d['form']})  params {d['params']:,} -> {d['params_after']:,}  {error}"


def _rewritten_line(change) -> str:
    """One rewritten layer: shape, rank(s) (and decomposition), params, errors, measured latency."""
    d = change.details
    if "widths" in d:
        return _chain_line(change)
    if "shape" not in d and "K" in d:
        d = {**d, "shape": [d["K"], d["N"]]}
    if "hidden" in d:
        return f"  {change.node:<40} hidden units {d['hidden'][0]} -> {d['hidden'][1]}" + _errors(d)
    if "shape" not in d:
        return f"  {change.node:<40} {change.op} {change.reason}"
    shape = "x".join(str(x) for x in d["shape"])
    if "rank" not in d and "decomposition" not in d:
        return _compressed_line(change, shape)
    if "decomposition" in d:
        rank = f"{d['decomposition']} rank {'/'.join(str(r) for r in d['ranks'])}"
    else:
        rank = f"rank {d['rank']:<5}"
    parts = [f"  {change.node:<40} {shape} {rank} params {d['params']:>9,} -> {d['params_after']:>9,}"]
    if "energy_kept" in d:
        parts.append(f"energy {d['energy_kept']:.3f}")
    parts.append(f"weight err {d['weight_error']:.3f}")
    if d.get("calib_error") is not None:
        parts.append(f"output err {d['calib_error']:.3f}")
    latency = d.get("latency")
    if isinstance(latency, dict) and d.get("decomposition") in latency:
        parts.append(latency[d["decomposition"]])
    return "  ".join(parts)


def _errors(d) -> str:
    """The calibrated output error of a layer, before and after a low-rank compensation."""
    out = ""
    if d.get("calib_error") is not None:
        out += f"  output err {d['calib_error']:.4f}"
    if d.get("calib_error_compensated") is not None:
        out += f" -> {d['calib_error_compensated']:.4f} with rank-{d['compensation_rank']} compensation"
    return out


def _compressed_line(change, shape: str) -> str:
    """A quantized or sparsified layer: format, bytes, calibrated error."""
    d = change.details
    parts = [f"  {change.node:<40} {shape}"]
    if "bits" in d:
        parts.append(f"{d['bits']}-bit blocks of {d['block_size']}")
    elif "sparsity" in d:
        parts.append(f"sparsity {d['sparsity']:.0%}")
    else:
        parts.append("int8" + (" weight-only" if d.get("weight_only") else ""))
    if "smooth_alpha" in d and d["smooth_alpha"] is not None:
        parts.append(f"smoothing {d['smooth_alpha']}")
    if "bytes" in d:
        parts.append(f"bytes {d['bytes']:,} -> {d['bytes_after']:,}")
    return "  ".join(parts) + _errors(d)


def _allocation_lines(a: dict) -> list[str]:
    """The budget search: which allocator won, on what evidence, at what cost, and each layer's level."""
    scored = ", ".join(f"{name} {value:.4g}" for name, value in a.get("calib_divergence", {}).items())
    lines = [f"  allocation: {a['allocator']}" + (f" (end-to-end divergence on the calibration data: {scored})"
                                                  if scored else ""),
             f"  budget {a['budget']:,.6g}, used {a['cost']:,.6g}; search {a['search_seconds']:.1f} s, "
             f"{a['evaluations']} candidates scored, {a['batch_runs']} batch runs"
             + (f", {a['generations']} generations from {a['started_from']}" if "generations" in a else "")]
    if a.get("evolved_kept") is False:
        lines.append(f"  the evolved allocation did worse than {a['started_from']} on the {a['check_batches']} "
                     f"held-back calibration batches: {a['started_from']} kept")
    for row in a.get("layers", []):
        what = "dense" if row["rank"] == 0 else f"rank {row['rank']}"
        predicted = f", predicted divergence {row['predicted_divergence']:.3g}" if "predicted_divergence" in row else ""
        lines.append(f"    {row['weight']:<40} level {row['level'] + 1}/{row['levels']} {what:<9} "
                     f"cost {row['cost']:,.6g}, calibrated error {row['calib_error']:.3g}{predicted}")
    return lines


def _noise(p) -> str:
    noise = p.speedup_noise
    if noise is None:
        return ""
    return f" (within this run's noise, ±{noise:.0%}: no difference shown)" if p.within_noise else f" (noise ±{noise:.0%})"


def _output_line(c, tolerance: Tolerance | None) -> str:
    """One output's agreement, with the tolerance's verdict on it when one was given."""
    kind = "" if c.kind == "tensor" else f" ({c.kind}, compared as a matrix)"
    if c.exact:
        size = max(1, int(math.prod(c.shape)))
        line = f"      output {c.name}{kind}: {round(c.agreement * size):,} of {size:,} elements equal ({c.agreement:.4f})"
    else:
        line = (f"      output {c.name}{kind}: max abs {c.max_abs:.3g}, rel L2 {c.rel_l2:.3g}, "
                f"cosine {c.cosine:.5f} (worst sample {c.cosine_min:.5f})")
    if tolerance is not None:
        line += f"  [{tolerance.verdict(c)}]"
    return line


def _validation_lines(v, tolerance: Tolerance | None = None) -> list[str]:
    """Per device and provider: latency, fusions, per-layer profile, output agreement; mobile checks."""
    lines = ["", f"validation on {v.inputs} ({v.samples} samples), {v.threads} threads, "
                 f"latency batch {v.latency_batch}"]
    device = None
    for p in v.providers:
        if p.device != device:
            device = p.device
            lines.append(f"  device {device} (onnxruntime {p.onnxruntime})")
        if not p.available:
            lines.append(f"    {p.provider}: not run: {p.reason}")
            continue
        if p.reason:
            lines.append(f"    {p.provider}: {p.reason}")
            continue
        options = f" [{', '.join(f'{k}={v}' for k, v in p.options.items())}]" if p.options else ""
        if p.latency_original is None:
            lines.append(f"    {p.provider}{options}: emulated ({p.emulated}): outputs compared, latency not "
                         "measured (an emulated CPU's times are not the device's)")
        else:
            lines.append(
                f"    {p.provider}{options}: latency {p.latency_original.median_ms:.2f} ms "
                f"(p90 {p.latency_original.p90_ms:.2f}) -> {p.latency_optimized.median_ms:.2f} ms "
                f"(p90 {p.latency_optimized.p90_ms:.2f}), speed-up {p.speedup:.2f}x{_noise(p)}")
        if p.lost_fusions:
            lost = ", ".join(f"{op} {a} -> {b}" for op, (a, b) in p.lost_fusions.items())
            lines.append(f"      ONNX Runtime fusions lost: {lost}")
        elif p.lost_fusions is not None:
            lines.append("      ONNX Runtime fusions: none of the original's lost")
        for c in p.outputs:
            lines.append(_output_line(c, tolerance))
        if p.profile:
            lines.extend(_profile_lines(p.profile))
    for check in v.mobile:
        lines.append(f"  {check.target} (static check, not run): {_partitioning(check.original)} -> "
                     f"{_partitioning(check.optimized)}")
    for warning in v.warnings:
        lines.append(f"  warning: {warning}")
    return lines


PROFILE_LAYERS_SHOWN = 5


def _profile_lines(profile) -> list[str]:
    before, after = profile.total_ms
    placement = "; ".join(f"{label} " + ", ".join(f"{n} nodes on {prov.replace('ExecutionProvider', '')}"
                                                  for prov, n in counts.items())
                          for label, counts in profile.placement.items())
    lines = [f"      profile: kernels {before:.3f} -> {after:.3f} ms ({placement})"]
    for t in profile.layers[:PROFILE_LAYERS_SHOWN]:
        lines.append(f"        {t.node:<44} {t.op:<8} {t.before_ms:.4f} -> {t.after_ms:.4f} ms "
                     f"({len(t.after_nodes)} nodes)")
    if len(profile.layers) > PROFILE_LAYERS_SHOWN:
        rest = profile.layers[PROFILE_LAYERS_SHOWN:]
        lines.append(f"        … {len(rest)} more rewritten layers: {sum(t.before_ms for t in rest):.4f} -> "
                     f"{sum(t.after_ms for t in rest):.4f} ms")
    return lines


def _partitioning(p) -> str:
    return (f"{p.partitions} partition{'s' if p.partitions != 1 else ''}, "
            f"{p.supported_nodes}/{p.nodes} nodes supported, {p.suitability}")
