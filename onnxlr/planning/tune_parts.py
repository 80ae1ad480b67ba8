"""What ``onnxlr tune`` searches and how it judges and remembers: the candidates, the run's options, the
on-disk cache of every measurement, the held-out data, and the verdict of a candidate's outputs
against the tolerance (the search itself: :mod:`onnxlr.planning.tune`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from onnxlr import io
from onnxlr.compare import Tolerance, compare
from onnxlr.errors import OnnxlrError
from onnxlr.feeds import check_feeds, model_inputs
from onnxlr.runtimes.devices import Device


@dataclass(frozen=True)
class Candidate:
    """A recipe and its settings (keywords of :func:`onnxlr.optimize`); ``family``: candidates of one
    family differ in strength only, strongest first."""

    name: str
    settings: dict
    family: str = ""

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]


# In order of expected speed on CPUs (int8 first); low rank from the strongest budget down.
CANDIDATES = (
    Candidate("int8", {"recipe": "int8"}),
    Candidate("int8-qdq", {"recipe": "int8-qdq"}),
    Candidate("int8-cnn", {"recipe": "int8-cnn"}),
    Candidate("prune+int8", {"recipe": "prune+int8"}),
    Candidate("lowrank+int8 params=0.75", {"recipe": "lowrank+int8", "target": "params=0.75"}, "lowrank+int8"),
    Candidate("lowrank+int8 params=0.9", {"recipe": "lowrank+int8", "target": "params=0.9"}, "lowrank+int8"),
    Candidate("lowrank params=0.5", {"recipe": "lowrank", "target": "params=0.5"}, "lowrank"),
    Candidate("lowrank params=0.75", {"recipe": "lowrank", "target": "params=0.75"}, "lowrank"),
    Candidate("lowrank params=0.9", {"recipe": "lowrank", "target": "params=0.9"}, "lowrank"),
    Candidate("int4", {"recipe": "int4"}),
    Candidate("int4+comp", {"recipe": "int4+comp"}),
    Candidate("int8-weights", {"recipe": "int8-weights"}),
    Candidate("chains", {"recipe": "chains"}),
)


@dataclass
class TuneOptions:
    """What ``onnxlr tune`` searches for (see docs/tune.md). ``evaluator(outputs, data) -> score``
    (higher is better) over the whole held-out set, with ``max_drop`` the score a candidate may lose."""

    model: Path
    calib: Path
    inputs: Path
    output: Path
    tolerance: Tolerance | None = None
    evaluator: Callable[[dict, dict], float] | None = None
    max_drop: float | None = None
    providers: str = "cpu"
    devices: tuple[str, ...] = ()
    candidates: tuple[str, ...] | None = None  # names of CANDIDATES; None: all
    threads: int | None = None
    repeats: int = 30
    batch_size: int = 8

    def __post_init__(self):
        if self.tolerance is None and self.evaluator is None:
            raise OnnxlrError("tune needs a tolerance: --max-error METRIC=V, or --evaluator with --max-drop")
        if self.evaluator is not None and self.max_drop is None:
            raise OnnxlrError("--evaluator needs --max-drop: how much of its score a candidate may lose")
        known = {c.name for c in CANDIDATES}
        unknown = [name for name in self.candidates or () if name not in known]
        if unknown:
            raise OnnxlrError(f"unknown tune candidate {unknown[0]!r} (choose from {', '.join(known)})")

    def settings(self) -> dict:
        return {"model": str(self.model), "calib": str(self.calib), "inputs": str(self.inputs),
                "tolerance": str(self.tolerance) if self.tolerance else None, "max_drop": self.max_drop,
                "evaluator": getattr(self.evaluator, "__name__", None), "providers": self.providers,
                "devices": list(self.devices), "repeats": self.repeats, "batch_size": self.batch_size}


class TuneCache:
    """Every result of a tune run, in ``OUTPUT/.tune-cache``: built models and a JSON of measurements
    keyed by stage and candidate. The key includes what the results depend on (the model, the data, the
    tolerance), so a changed setting measures again."""

    def __init__(self, folder: Path, context: dict):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "measurements.json"
        digest = hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]
        stored = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.entries: dict[str, Any] = stored.get("entries", {}) if stored.get("context") == digest else {}
        self.context = digest
        self.computed = 0  # measurements made by this run (the rest came from the cache)

    def get(self, key: str):
        return self.entries.get(key)

    def put(self, key: str, value) -> None:
        self.entries[key] = value
        self.computed += 1
        io.write_atomic(self.path, json.dumps({"context": self.context, "entries": self.entries}))

    def model_path(self, candidate: Candidate) -> Path:
        return self.folder / f"{candidate.key}.onnx"


def held_out(model: onnx.ModelProto, path: Path) -> tuple[dict, dict]:
    """``(feeds, extras)`` of the held-out .npz: the arrays keyed by model inputs (checked), and the others
    (labels for an evaluator)."""
    names = {spec.name for spec in model_inputs(model)}
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise OnnxlrError(f"cannot read --inputs {path}: {exc}") from None
    feeds = {k: v for k, v in arrays.items() if k in names}
    check_feeds(model, feeds, str(path))
    return feeds, {k: v for k, v in arrays.items() if k not in names}


@dataclass
class Verdict:
    """A candidate's outputs on one provider against the tolerance: ``holds`` and what was measured."""

    holds: bool
    measured: dict = field(default_factory=dict)  # output -> measured value of the tolerance's metric
    score: float | None = None
    reason: str = ""


def judge(options: TuneOptions, reference: dict, produced: dict, data: dict, reference_score: float | None
          ) -> Verdict:
    """Whether ``produced`` (output name -> array) meets the tolerance against ``reference``."""
    verdict = Verdict(True)
    for name, ref in reference.items():
        comparison = compare(name, ref, produced[name])
        if options.tolerance is not None:
            verdict.measured[name] = options.tolerance.measured(comparison)
            if not options.tolerance.holds(comparison):
                verdict.holds = False
                verdict.reason = f"output {name}: {options.tolerance.verdict(comparison)}"
    if options.evaluator is not None:
        verdict.score = float(options.evaluator(produced, data))
        if verdict.holds and verdict.score < reference_score - options.max_drop:
            verdict.holds = False
            verdict.reason = (f"task score {verdict.score:.4g} < {reference_score:.4g} - {options.max_drop:g} "
                              f"(the original's, less --max-drop)")
    return verdict


def run_outputs(device: Device, models: dict[str, bytes], feeds: dict, provider: str, threads: int, batch_size: int,
                repeats: int) -> dict:
    """One runner call: every model on ``provider`` of ``device``, outputs of all ``feeds`` and (unless
    emulated) latencies interleaved on the first batch."""
    response = device.run(models, feeds, providers=[provider], threads=threads, batch_size=batch_size, warmup=3,
                          repeats=repeats, profile_runs=0)
    (result,) = response["results"]
    if not result["available"] or result["reason"] and not result["failed"]:
        return None  # not in that device's build (or not a device: Azure)
    return {"emulated": response.get("emulated", ""), "failed": result["failed"], "reason": result["reason"],
            "models": result["models"]}
