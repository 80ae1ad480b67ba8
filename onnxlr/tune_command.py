"""``onnxlr tune``: flags or a TOML file in, :func:`onnxlr.planning.tune.tune` out, the manifest and the page
written. A config file holds the same settings as the flags (``--max-error`` as ``max_error`` …); flags
given on the command line win over it.

    # tune.toml
    model = "model.onnx"
    calib = "calib.npz"
    inputs = "heldout.npz"          # may also hold labels for the evaluator
    output = "tuned"
    max_error = "cosine=0.99"
    providers = "cpu"
    devices = [".venv-openvino/bin/python"]
    evaluator = "metrics.py:accuracy"   # optional: f(outputs, data) -> score, higher is better
    max_drop = 0.01
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from onnxlr import io
from onnxlr.compare import parse_tolerance
from onnxlr.errors import OnnxlrError
from onnxlr.planning.tune import CANDIDATES, TuneOptions, tune

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

EXIT_ALL_TARGETS, EXIT_SOME_TARGET_WITHOUT = 0, 1
# config key -> (argparse dest, type)
KEYS = {"model": str, "calib": str, "inputs": str, "output": str, "max_error": str, "providers": str,
        "devices": list, "evaluator": str, "max_drop": float, "candidates": list, "threads": int, "repeats": int,
        "batch_size": int}


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="find, per provider and device, the fastest model that meets a tolerance")
    p.add_argument("model", nargs="?", help="input .onnx model (never modified)")
    p.add_argument("--config", metavar="TOML", help="the run described in a TOML file (flags win over it)")
    p.add_argument("--calib", metavar="NPZ|DIR", help="calibration samples the candidates are built with")
    p.add_argument("--inputs", metavar="NPZ", help="held-out samples the tolerance is checked on (arrays that are "
                   "not model inputs, e.g. labels, go to the evaluator)")
    p.add_argument("-o", "--output", metavar="DIR", help="folder for the picks, tune.json and tune.html "
                   "(and .tune-cache: a repeated run measures nothing twice)")
    p.add_argument("--max-error", metavar="METRIC=V", help="tolerance on every output, as for optimize")
    p.add_argument("--evaluator", metavar="FILE.py:FUNCTION",
                   help="task metric: FUNCTION(outputs, data) -> score (higher is better) over the held-out set")
    p.add_argument("--max-drop", type=float, metavar="D", help="score the evaluator may lose against the original")
    p.add_argument("--providers", help="providers to pick for (default cpu), as for optimize")
    p.add_argument("--device", action="append", dest="devices", metavar="PREFIX",
                   help="also pick for this device (a Python reached through a command prefix, repeatable); an "
                        "emulated one only checks outputs")
    p.add_argument("--candidates", type=lambda s: [c.strip() for c in s.split(",")], metavar="A,B",
                   help=f"only these candidates (default all: {', '.join(c.name for c in CANDIDATES)})")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--repeats", type=int, help="timed runs per model and target (default 30)")
    p.add_argument("--batch-size", type=int, help="samples per run (default 8)")


def cmd_tune(args: argparse.Namespace) -> int:
    settings = _settings(args)
    options = TuneOptions(
        model=Path(settings["model"]), calib=Path(settings["calib"]), inputs=Path(settings["inputs"]),
        output=Path(settings["output"]), tolerance=parse_tolerance(settings.get("max_error")),
        evaluator=load_evaluator(settings["evaluator"]) if settings.get("evaluator") else None,
        max_drop=settings.get("max_drop"), providers=settings.get("providers") or "cpu",
        devices=tuple(settings.get("devices") or ()), candidates=tuple(settings["candidates"])
        if settings.get("candidates") else None, threads=settings.get("threads"),
        repeats=settings.get("repeats") or 30, batch_size=settings.get("batch_size") or 8)
    options.output.mkdir(parents=True, exist_ok=True)
    manifest = tune(options)
    import json

    from onnxlr import tune_page

    io.write_atomic(options.output / "tune.json", json.dumps(manifest, indent=2))
    io.write_atomic(options.output / "tune.html", tune_page.render(manifest))
    print(summary(manifest))
    return EXIT_ALL_TARGETS if all(t["pick"] for t in manifest["targets"]) else EXIT_SOME_TARGET_WITHOUT


def _settings(args: argparse.Namespace) -> dict:
    """The config file's settings under the flags given; a missing required one is a user error."""
    settings = {}
    if args.config:
        path = Path(args.config)
        try:
            loaded = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise OnnxlrError(f"config file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise OnnxlrError(f"{path} is not valid TOML: {exc}") from None
        for key, value in loaded.items():
            kind = KEYS.get(key)
            if kind is None:
                raise OnnxlrError(f"{path}: unknown setting {key!r} (known: {', '.join(KEYS)})")
            if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
                raise OnnxlrError(f"{path}: {key} must be a {kind.__name__}, got {value!r}")
            # paths in the file are relative to the file
            if key in ("model", "calib", "inputs", "output") or key == "evaluator":
                value = str(path.parent / value) if not Path(value.split(":")[0]).is_absolute() else value
            settings[key] = value
    for key in KEYS:
        given = getattr(args, key, None)
        if given is not None:
            settings[key] = given
    missing = [k for k in ("model", "calib", "inputs", "output") if not settings.get(k)]
    if missing:
        raise OnnxlrError(f"tune needs {', '.join(missing)} (flags or --config)")
    return settings


def load_evaluator(spec: str):
    """``FILE.py:FUNCTION`` -> the function."""
    file, sep, name = spec.rpartition(":")
    if not sep or not file.endswith(".py"):
        raise OnnxlrError(f"--evaluator must be FILE.py:FUNCTION, got {spec!r}")
    path = Path(file)
    if not path.is_file():
        raise OnnxlrError(f"evaluator file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"onnxlr_evaluator_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    function = getattr(module, name, None)
    if not callable(function):
        raise OnnxlrError(f"{path} has no function {name!r}")
    return function


def summary(manifest: dict) -> str:
    lines = []
    for t in manifest["targets"]:
        where = f"{t['provider']} ({t['device']})"
        pick = t["pick"]
        if pick is None:
            lines.append(f"{where}: none: {t['reason']}")
            continue
        noise = pick["speedup_noise"]
        within = noise is not None and abs(pick["speedup"] - 1) <= noise
        lines.append(f"{where}: {pick['candidate']} -> {pick['file']}: {pick['median_ms']:.2f} ms vs "
                     f"{pick['original_median_ms']:.2f} ms, speed-up {pick['speedup']:.2f}x"
                     + (" (within this run's noise)" if within else "") + f", {pick['bytes']:,} bytes")
    for check in manifest["emulated_checks"]:
        lines.append(f"{check['device']}: emulated ({check['emulated']}): outputs checked on {check['samples']} "
                     "samples, not timed")
    dropped = [c for c in manifest["candidates"] if c["status"] in ("dropped", "failed")]
    lines.append(f"{len(manifest['candidates'])} candidates, {len(dropped)} dropped; "
                 f"{manifest['seconds']:.0f} s, {manifest['measurements_made']} measurements made")
    return "\n".join(lines)
