"""Fuzzing (issue #8): hypothesis-generated graphs through the pipeline, mutated files through the CLI.

What is fuzzed
--------------
1. **Graphs.** ``graphs()`` builds small valid models step by step from MatMul, Gemm (every
   transA/transB/alpha/beta form, with and without C), Conv (1-D and 2-D; kernel sizes, strides,
   explicit pads or auto_pad, groups, dilations, with and without bias), Add, Relu, Reshape and
   Flatten, tracking the current tensor shape so every step is valid. Constant weights are random,
   low-rank, with zero rows, or all zero, at magnitudes from 1e-3 to 1e3; the batch dimension is
   symbolic (``N``) or fixed. Properties:

   - *full-rank rewrite is exact*: ``optimize(m, rank_ratio=1.0, force=True, conv_ratio=1.0,
     rank_multiple=1, ranks={conv: full rank})`` (``rank_ratio`` only rules MatMul/Gemm; convs get a
     parameter budget, so they are given a full per-layer rank) rewrites every factorizable layer,
     and its ORT outputs match the original's: ``max|y' - y| <= 1e-4 * (1 + max|y|)`` (float32
     round-off through a factorization, relative to the output scale). Also with
     ``method="whitened"`` and calibration feeds, compared on those feeds (the data the fit is exact
     on).
   - *a second run changes nothing*: at a lossless rule that does not force rewrites
     (``energy=1.0``, ``conv="none"``) the second ``optimize`` rewrites nothing (every record's
     ``rewritten`` list is empty) and returns the same nodes and initializers (names and values). At
     the forced full-rank settings a second run rewrites the factors again by design (force), but
     its outputs still equal the first result's within the tolerance above.
   - *composing linear chains is exact at zero error*: ``optimize(m, recipe="chains", chains=0.0)``
     (issue #10) keeps the outputs within the tolerance above, and every chain it rewrote saved
     parameters.
   - every result passes ``onnx.checker.check_model(full_check=True)``.

2. **Files.** Valid small ``.onnx`` files and ``.npz`` files (``--calib``, ``--inputs``) are mutated
   (bit flips, truncation at a random offset, byte insertions, same-length garbage, overwritten
   slices; for ``.npz`` also single zip-header fields) or, for ``.npz``, rebuilt with arbitrary array names, dtypes and shapes. Properties of
   ``cli.main(["optimize", ...])`` and ``cli.main(["inspect", ...])``: exit code 0, or exit code 2
   with exactly one stderr line; never an escaping exception; each call bounded in time
   (``CALL_TIMEOUT`` through SIGALRM, with a faulthandler hard stop in case C code never returns to
   Python — a hang fails, it never freezes CI); the input files are byte-identical afterwards; on
   failure the output folder holds no output or temporary file.

Budget
------
Every property is derandomized (``derandomize=True``, no example database) so CI sees the same
examples each run. ``GRAPH_EXAMPLES`` / ``FILE_EXAMPLES`` examples per property keep the whole file
around 60 s on a 2-core machine. Known bugs the fuzzing found have a plain regression test each at
the bottom (``test_repro_*``); the properties hitting them fail until the fixes land.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import hashlib
import io
import signal
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import message_lines
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from onnxlr.passes.fold_constants import FoldConstants
from onnxlr.passes.name_nodes import NameNodes

from onnxlr import api, cli
from onnxlr.graph import import_graph
from onnxlr.matching import find_convs, find_layers
from onnxlr.pipeline import PassManager

OPSET = 17
# Tolerance of the exactness properties: max|y' - y| <= RTOL * (1 + max|y|).
RTOL = 1e-4
GRAPH_EXAMPLES = 150
FILE_EXAMPLES = 100
# Seconds one CLI call may take (the machine is shared: generous); the hard stop kills the run.
CALL_TIMEOUT = 10.0
HARD_TIMEOUT = 60.0
SYMBOLIC_BATCH = 3  # the size fed for a symbolic batch dimension
ort.set_default_logger_severity(3)

FUZZ = settings(max_examples=GRAPH_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])
FILE_FUZZ = settings(FUZZ, max_examples=FILE_EXAMPLES)


# =========================================================================================== strategies


@st.composite
def weights(draw, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 constant of ``shape``: random, low-rank, with zero rows or all zeros, scaled by
    1e-3 … 1e3. The values come from a drawn numpy seed (cheap, and hypothesis still shrinks the
    kind, scale and seed). For a conv kernel the (Cout, rest) unfolding is what is low-rank."""
    kind = draw(st.sampled_from(["normal", "lowrank", "zero_rows", "zeros"]))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3, 0.1]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    rows, cols = shape[0], int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    if kind == "zeros":
        M = np.zeros((rows, cols))
    else:
        M = rng.standard_normal((rows, cols))
        if kind == "lowrank":
            r = draw(st.integers(1, max(1, min(rows, cols))))
            M = rng.standard_normal((rows, r)) @ rng.standard_normal((r, cols)) / np.sqrt(r)
        elif kind == "zero_rows":
            M[rng.random(rows) < 0.5] = 0.0
    return (scale * M).reshape(shape).astype(np.float32)


@dataclasses.dataclass
class Built:
    """A generated model and how to feed it: ``input_shape`` with the symbolic batch made concrete."""

    model: onnx.ModelProto
    input_shape: list[int]
    ops: list[str]

    def feeds(self, seed: int = 0, batches: int = 1) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        return [{"x": rng.standard_normal(self.input_shape).astype(np.float32)} for _ in range(batches)]


def _concrete(shape) -> list[int]:
    return [SYMBOLIC_BATCH if d == "N" else d for d in shape]


@st.composite
def graphs(draw, max_ops: int = 5) -> Built:
    """A valid model of 1..``max_ops`` ops chained on one tensor, built step by step.

    The current tensor's shape is tracked (``"N"`` for the symbolic batch); each step draws an op
    that is valid at that shape and updates it:

    - MatMul (rank >= 2) with a (last, n) weight;
    - Gemm (rank 2): transB stores the weight as (n, k); transA (only with every dimension fixed)
      contracts over the batch; alpha, beta and C ((n,), (1, n) or none) vary;
    - Conv (rank 3 or 4): kernel 1..3, stride 1..2, dilation 1..2, explicit pads or auto_pad,
      groups dividing the channels, optional bias; the output must keep every spatial size >= 1;
    - Add of a constant broadcast over the last axis (or a scalar), Relu;
    - Reshape to (batch, features) or to a conv layout (batch given as 0 or -1), Flatten(axis=1).

    Nodes are named uniquely, not named at all, or all given the same name.
    """
    batch = draw(st.sampled_from(["N", 1, 2, 3]))
    layout = draw(st.sampled_from(["2d", "3d", "4d"]))
    if layout == "2d":
        shape = [batch, draw(st.integers(1, 8))]
    elif layout == "3d":
        shape = [batch, draw(st.integers(1, 4)), draw(st.integers(1, 8))]
    else:
        shape = [batch, draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6))]
    input_shape = list(shape)
    naming = draw(st.sampled_from(["unique", "unnamed", "repeated"]))  # node names are optional in ONNX
    nodes, inits, ops = [], [], []
    current = "x"

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    for i in range(draw(st.integers(1, max_ops))):
        rank, fixed = len(shape), all(isinstance(d, int) for d in shape)
        features = int(np.prod(shape[1:]))
        choices = ["MatMul", "Add", "Relu", "Flatten", "Reshape"]
        if rank == 2:
            choices.append("Gemm")
        if rank in (3, 4):
            choices += ["Conv", "Conv"]
        op = draw(st.sampled_from(choices))
        out, name = f"t{i}", {"unique": f"n{i}_{op.lower()}", "unnamed": "", "repeated": "layer"}[naming]
        if op == "MatMul":
            n = draw(st.integers(1, 8))
            w = const(f"W{i}", draw(weights((shape[-1], n))))
            nodes.append(helper.make_node("MatMul", [current, w], [out], name=name))
            shape = shape[:-1] + [n]
        elif op == "Gemm":
            trans_a = fixed and draw(st.booleans())
            trans_b = draw(st.booleans())
            m, k = (shape[1], shape[0]) if trans_a else (shape[0], shape[1])
            n = draw(st.integers(1, 8))
            w = const(f"W{i}", draw(weights((n, k) if trans_b else (k, n))))
            inputs = [current, w]
            c_shape = draw(st.sampled_from([None, (n,), (1, n)]))
            if c_shape is not None:
                inputs.append(const(f"C{i}", draw(weights(c_shape))))
            attrs = {"transA": int(trans_a), "transB": int(trans_b),
                     "alpha": draw(st.sampled_from([1.0, 0.5, -2.0])),
                     "beta": draw(st.sampled_from([1.0, 0.0, 3.0]))}
            nodes.append(helper.make_node("Gemm", inputs, [out], name=name, **attrs))
            shape = [m, n]
        elif op == "Conv":
            cin, spatial = shape[1], shape[2:]
            group = draw(st.sampled_from([g for g in (1, 2, 3, 4) if cin % g == 0]))
            cout = group * draw(st.integers(1, max(1, 6 // group)))
            kernel = [draw(st.integers(1, 3)) for _ in spatial]
            strides = [draw(st.integers(1, 2)) for _ in spatial]
            dilations = [draw(st.integers(1, 2)) for _ in spatial]
            auto_pad = draw(st.sampled_from(["NOTSET", "NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"]))
            if auto_pad.startswith("SAME"):  # ORT: "Dilation not supported for AutoPadType::SAME_*"
                dilations = [1] * len(spatial)
            attrs = {"kernel_shape": kernel, "strides": strides, "dilations": dilations, "group": group}
            if auto_pad == "NOTSET":
                pads = [draw(st.integers(0, k - 1)) for k in kernel * 2]  # begins, then ends
                attrs["pads"] = pads
            else:
                attrs["auto_pad"] = auto_pad
            new_spatial = []
            for axis, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
                span = d * (k - 1) + 1
                if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                    new_spatial.append(-(-size // s))
                elif auto_pad == "VALID":
                    new_spatial.append((size - span) // s + 1)
                else:
                    new_spatial.append((size + pads[axis] + pads[axis + len(spatial)] - span) // s + 1)
            assume(all(v >= 1 for v in new_spatial))
            w = const(f"W{i}", draw(weights((cout, cin // group, *kernel))))
            inputs = [current, w]
            if draw(st.booleans()):
                inputs.append(const(f"B{i}", draw(weights((cout,)))))
            nodes.append(helper.make_node("Conv", inputs, [out], name=name, **attrs))
            shape = [shape[0], cout, *new_spatial]
        elif op == "Add":
            b_shape = draw(st.sampled_from([(shape[-1],), (1,)]))
            b = const(f"b{i}", draw(weights(b_shape)))
            nodes.append(helper.make_node("Add", [current, b], [out], name=name))
        elif op == "Relu":
            nodes.append(helper.make_node("Relu", [current], [out], name=name))
        elif op == "Flatten":
            nodes.append(helper.make_node("Flatten", [current], [out], name=name, axis=1))
            shape = [shape[0], features]
        else:  # Reshape
            divisors = [c for c in range(1, features + 1) if features % c == 0]
            target = draw(st.sampled_from(["2d", "3d", "4d"]))
            if target == "2d":
                rest = [features]
            elif target == "3d":
                c = draw(st.sampled_from(divisors))
                rest = [c, features // c]
            else:
                c = draw(st.sampled_from(divisors))
                h = draw(st.sampled_from([d for d in divisors if (features // c) % d == 0]))
                rest = [c, h, features // c // h]
            lead = draw(st.sampled_from([0, -1]))
            s = const(f"shape{i}", np.array([lead, *rest], dtype=np.int64))
            nodes.append(helper.make_node("Reshape", [current, s], [out], name=name))
            shape = [shape[0], *rest]
        ops.append(op)
        current = out
    graph = helper.make_graph(
        nodes, "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, shape)],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return Built(model, _concrete(input_shape), ops)


MUTATIONS = ("flip", "truncate", "insert", "garbage", "overwrite")


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` with 1-3 mutations: bit flips, truncation at a random offset, inserted bytes,
    random garbage of the same length, or an overwritten slice."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(MUTATIONS))
        if not out:
            out = bytearray(draw(st.binary(min_size=1, max_size=64)))
            continue
        at = draw(st.integers(0, len(out) - 1))
        if kind == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "garbage":
            out = bytearray(draw(st.binary(min_size=len(out), max_size=len(out))))
        else:
            chunk = draw(st.binary(min_size=1, max_size=16))
            out[at:at + len(chunk)] = chunk
    return bytes(out)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@st.composite
def npz_arrays(draw) -> bytes:
    """A well-formed .npz of arbitrary content: names (the right one, others, odd ones), dtypes
    (float32/64/16, int, bool, complex), shapes (0-d, zero-size, wrong rank or size), NaN/Inf."""
    arrays = {}
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["x", "x", "y", "x.npy", "", "arr_0"]))
        dtype = draw(st.sampled_from([np.float32, np.float32, np.float64, np.float16, np.int64, np.bool_,
                                      np.complex64]))
        shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=4)))
        values = np.random.default_rng(draw(st.integers(0, 99))).standard_normal(shape)
        special = draw(st.sampled_from([None, None, np.nan, np.inf]))
        if special is not None and values.size:
            values.flat[0] = special
        with np.errstate(invalid="ignore"):  # NaN/Inf cast to int: whatever numpy makes of it
            arrays[name] = values.astype(dtype)
    return _npz_bytes(arrays)


# ========================================================================================= helpers


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The outputs, from a copy whose nodes are named uniquely (ONNX Runtime refuses repeated names)."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for i, node in enumerate(named.graph.node):
        node.name = f"node{i}"
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(named.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def assert_close(ref: list[np.ndarray], got: list[np.ndarray], what: str) -> None:
    for y, y2 in zip(ref, got):
        assert y.shape == y2.shape, f"{what}: shape {y2.shape} != {y.shape}"
        scale = float(np.max(np.abs(y))) if y.size else 0.0
        err = float(np.max(np.abs(y2.astype(np.float64) - y))) if y.size else 0.0
        assert err <= RTOL * (1 + scale), f"{what}: max abs error {err:.3g} > {RTOL} * (1 + {scale:.3g})"


def factorizable(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """Names of the MatMul/Gemm layers and the Conv layers the passes can rewrite, as the optimizer names
    them (unnamed and repeated names get names of their own first)."""
    graph = import_graph(PassManager([NameNodes(), FoldConstants()]).run(model)[0])
    return {l.node.name for l in find_layers(graph)[0]}, {l.node.name for l in find_convs(graph)[0]}


def full_rank_options(model: onnx.ModelProto) -> dict:
    """The options that make every factorizable layer rewrite at full rank: ``rank_ratio=1.0`` for
    MatMul/Gemm; for convs (``rank_ratio`` does not rule them) a per-layer rank above every cap."""
    _, convs = factorizable(model)
    return dict(rank_ratio=1.0, force=True, conv_ratio=1.0, rank_multiple=1,
                ranks={name: 10_000 for name in convs} or None, validate=False)


def rewritten(report) -> list[str]:
    """The layers rewritten (the nodes only given a name of their own aside)."""
    return [c.node for record in report.passes if record.name != "name_nodes" for c in record.rewritten]


def initializers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


# ====================================================================================== properties


@FUZZ
@given(built=graphs())
def test_full_rank_rewrite_is_exact(built):
    model = built.model
    matmuls, convs = factorizable(model)
    optimized, report = api.optimize(model, **full_rank_options(model))
    onnx.checker.check_model(optimized, full_check=True)
    assert set(rewritten(report)) == matmuls | convs, "force at full rank must rewrite every factorizable layer"
    feeds = built.feeds()[0]
    assert_close(ort_run(model, feeds), ort_run(optimized, feeds), "full-rank svd")


@FUZZ
@given(built=graphs())
def test_full_rank_whitened_is_exact_on_calibration_data(built):
    model = built.model
    calib = built.feeds(seed=1, batches=4)
    optimized, report = api.optimize(model, method="whitened", calib=calib, **full_rank_options(model))
    onnx.checker.check_model(optimized, full_check=True)
    matmuls, convs = factorizable(model)
    assert set(rewritten(report)) == matmuls | convs
    for feeds in calib:
        assert_close(ort_run(model, feeds), ort_run(optimized, feeds), "full-rank whitened")


@FUZZ
@given(built=graphs())
def test_second_run_changes_nothing(built):
    model = built.model
    lossless = dict(energy=1.0, conv="none", validate=False)
    once, _ = api.optimize(model, **lossless)
    twice, report = api.optimize(once, **lossless)
    onnx.checker.check_model(twice, full_check=True)
    assert rewritten(report) == [], "a second run at energy=1.0 rewrote the first run's factors"
    assert [(n.op_type, n.name) for n in twice.graph.node] == [(n.op_type, n.name) for n in once.graph.node]
    assert initializers(twice) == initializers(once)
    # Forced full rank rewrites the factors again by design; the outputs must still not move.
    first, _ = api.optimize(model, **full_rank_options(model))
    second, _ = api.optimize(first, **full_rank_options(first))
    onnx.checker.check_model(second, full_check=True)
    feeds = built.feeds()[0]
    assert_close(ort_run(first, feeds), ort_run(second, feeds), "second forced run")


@FUZZ
@given(built=graphs())
def test_composing_chains_at_zero_error_is_exact(built):
    model = built.model
    optimized, report = api.optimize(model, recipe="chains", chains=0.0, validate=False)
    onnx.checker.check_model(optimized, full_check=True)
    [record] = [r for r in report.passes if r.name == "compose_chains"]
    assert all(c.details["params_after"] < c.details["params"] for c in record.rewritten)
    feeds = built.feeds()[0]
    assert_close(ort_run(model, feeds), ort_run(optimized, feeds), "composed chains")


# ----------------------------------------------------------------------------------------- files


class CallTimeout(BaseException):
    """Raised by SIGALRM inside a CLI call (a BaseException: no ``except Exception`` swallows it)."""


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``cli.main(argv)`` in process: (exit code, stderr). Fails the test on an escaping exception or a
    call longer than CALL_TIMEOUT; a call stuck in C code is killed by faulthandler after HARD_TIMEOUT."""
    err, out = io.StringIO(), io.StringIO()

    def on_alarm(signum, frame):
        raise CallTimeout(f"onnxlr {' '.join(argv)} took more than {CALL_TIMEOUT} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, CALL_TIMEOUT)
    faulthandler.dump_traceback_later(HARD_TIMEOUT, exit=True)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli.main(argv)
    except CallTimeout as exc:
        pytest.fail(str(exc))
    except BaseException as exc:  # noqa: BLE001 - anything escaping main is the bug being fuzzed for
        raise AssertionError(f"onnxlr {' '.join(argv[:1])} raised {type(exc).__name__}: {exc}") from exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()
    return code, err.getvalue()


def seed_models() -> dict[str, bytes]:
    """Valid small models to mutate: an MLP (MatMul, Add, Relu, Gemm transB) and a conv net."""
    rng = np.random.default_rng(0)
    f = lambda *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), f"w{len(s)}_{s[0]}")  # noqa: E731
    mlp = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w2_8"], ["h"], name="fc1"),
         helper.make_node("Add", ["h", "w1_6"], ["h1"], name="bias"),
         helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
         helper.make_node("Gemm", ["h2", "w2_4", "w1_4"], ["y"], name="fc2", transB=1)],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        initializer=[f(8, 6), f(6), f(4, 6), f(4)])
    conv = helper.make_graph(
        [helper.make_node("Conv", ["x", "w4_6"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Flatten", ["r"], ["y"], name="flat", axis=1)],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 96])],
        initializer=[f(6, 2, 3, 3)])
    out = {}
    for name, graph in (("mlp", mlp), ("conv", conv)):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        out[name] = model.SerializeToString()
    return out


SEEDS = seed_models()
MLP_NPZ = _npz_bytes({"x": np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)})


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_cli(folder: Path, argv: list[str], inputs: list[Path], output: Path) -> int:
    """Run the CLI; check the exit code contract, untouched inputs and a clean output folder."""
    before = {p: _digest(p) for p in inputs}
    out_dir = output.parent
    listed = set(out_dir.iterdir())
    code, err = run_cli(argv)
    assert code in (0, 2), f"exit code {code}; stderr: {err!r}"
    if code == 2:
        lines = message_lines(err)
        assert len(lines) == 1 and lines[0].startswith("onnxlr: error: "), f"stderr is not one error line: {err!r}"
        assert set(out_dir.iterdir()) == listed, f"left behind: {sorted(set(out_dir.iterdir()) - listed)}"
    else:
        new = {p.name for p in set(out_dir.iterdir()) - listed}
        assert new <= {output.name, output.name + ".data"}, f"unexpected files: {new}"
    for p, digest in before.items():
        assert _digest(p) == digest, f"{p.name} was modified"
    return code


@FILE_FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), data=st.data())
def test_mutated_model_optimize_and_inspect(seed, data):
    blob = data.draw(mutated(SEEDS[seed]), label="model bytes")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, out_dir = folder / "model.onnx", folder / "out"
        out_dir.mkdir()
        model.write_bytes(blob)
        output = out_dir / "small.onnx"
        check_cli(folder, ["optimize", str(model), "-o", str(output), "--no-validate", "--rank-ratio", "0.5"],
                  [model], output)
        check_cli(folder, ["inspect", str(model)], [model], out_dir / "none")


@st.composite
def zip_field_mutated(draw, data: bytes) -> bytes:
    """``data`` (a zip) with one byte of a zip header overwritten: a local header, central directory
    entry or end record (``PK`` signatures), at a field offset inside it — versions, flags, method,
    sizes, name lengths: the bytes random flips rarely reach while the CRCs still hold."""
    out = bytearray(data)
    starts = [i for i in range(len(out) - 3) if out[i:i + 2] == b"PK" and out[i + 2] in (1, 3, 5)]
    at = draw(st.sampled_from(starts)) + draw(st.integers(4, 29))
    if at < len(out):
        out[at] = draw(st.integers(0, 255))
    return bytes(out)


def _npz_variant(data) -> bytes:
    kind = data.draw(st.sampled_from(["structured", "bytes", "zip field"]), label="npz variant")
    if kind == "structured":
        return data.draw(npz_arrays(), label="npz arrays")
    if kind == "zip field":
        return data.draw(zip_field_mutated(MLP_NPZ), label="npz bytes")
    return data.draw(mutated(MLP_NPZ), label="npz bytes")


def _check_npz_option(blob: bytes, option: str, *extra: str) -> None:
    """``optimize`` with ``blob`` as the .npz of ``option`` (``--calib`` / ``--inputs``): the CLI contract."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model, npz, out_dir = folder / "model.onnx", folder / "data.npz", folder / "out"
        out_dir.mkdir()
        model.write_bytes(SEEDS["mlp"])
        npz.write_bytes(blob)
        output = out_dir / "small.onnx"
        check_cli(folder, ["optimize", str(model), "-o", str(output), option, str(npz), *extra,
                           "--rank-ratio", "0.5"], [model, npz], output)


@FILE_FUZZ
@given(data=st.data())
def test_mutated_calibration_npz(data):
    _check_npz_option(_npz_variant(data), "--calib", "--no-validate")


@FILE_FUZZ
@given(data=st.data())
def test_mutated_inputs_npz(data):
    _check_npz_option(_npz_variant(data), "--inputs", "--repeats", "1")


# ================================================================================ regression repros
# Each test below is the shrunk form of a failure of the file properties above, as a plain model built
# with onnx.helper (or a plain .npz) and the failing call. They fail until the bug is fixed; the
# property that found the bug fails with them.


def _tiny_model(relu_input: str = "h", relu_op: str = "Relu", weight=None) -> onnx.ModelProto:
    """x[N, 4] -> MatMul(W 4x4) -> Relu -> y: valid unless an argument breaks it."""
    W = weight if weight is not None else numpy_helper.from_array(np.eye(4, dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
         helper.make_node(relu_op, [relu_input], ["y"], name="relu")], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=[W])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    return model


def _assert_user_error(argv: list[str], out_dir: Path) -> None:
    listed = set(out_dir.iterdir())
    code, err = run_cli(argv)
    assert code == 2, f"exit code {code}; stderr {err!r}"
    lines = message_lines(err)
    assert len(lines) == 1 and lines[0].startswith("onnxlr: error: "), err
    assert set(out_dir.iterdir()) == listed


def _model_commands(path: Path, out_dir: Path) -> list[list[str]]:
    return [["optimize", str(path), "-o", str(out_dir / "small.onnx"), "--no-validate"], ["inspect", str(path)]]


# BUG 1 (onnxlr/io.py load_model): a string field (op_type, tensor name) that is not valid UTF-8
# parses (proto2 does not check), then UnicodeDecodeError escapes main from onnx_graphsurgeon
# (onnx_exporter.py -> onnx.helper) in both optimize and inspect.
@pytest.mark.parametrize("old, new", [(b"\x04Relu", b"\x04\xc3elu"), (b"\x01W", b"\x01\xf7")],
                         ids=["op_type", "tensor_name"])
def test_repro_invalid_utf8_string_is_a_user_error(tmp_path, old, new):
    blob = _tiny_model().SerializeToString()
    assert old in blob
    path = tmp_path / "model.onnx"
    path.write_bytes(blob.replace(old, new))
    for argv in _model_commands(path, tmp_path):
        _assert_user_error(argv, tmp_path)


# BUG 2 (onnxlr/io.py load_model / api.optimize): an input model that onnx.checker rejects (a node
# reading a tensor nothing defines; an op no opset has) runs through the whole pipeline and only the
# output check catches it: RuntimeError "onnxlr produced an invalid model" escapes main (a traceback
# blaming onnxlr for the user's file), and `inspect` exits 0 on it.
@pytest.mark.parametrize("broken", [dict(relu_input="undefined"), dict(relu_op="Flctten")],
                         ids=["undefined_input", "unknown_op"])
def test_repro_invalid_input_model_is_a_user_error(tmp_path, broken):
    path = tmp_path / "model.onnx"
    onnx.save_model(_tiny_model(**broken), str(path))
    for argv in _model_commands(path, tmp_path):
        _assert_user_error(argv, tmp_path)


# BUG 3 (onnxlr/io.py load_model): an initializer whose raw_data does not hold prod(dims) values
# (a truncated/overwritten weight) makes numpy_helper.to_array raise ValueError "cannot reshape
# array of size 15 into shape (4,4)", escaping main in optimize and inspect.
def test_repro_initializer_size_mismatch_is_a_user_error(tmp_path):
    short = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4, 4],
                        raw_data=np.zeros(15, np.float32).tobytes())
    path = tmp_path / "model.onnx"
    path.write_bytes(_tiny_model(weight=short).SerializeToString())
    for argv in _model_commands(path, tmp_path):
        _assert_user_error(argv, tmp_path)


# BUG 4 (onnxlr/calibration.py _npz_chunks/_MemberReader, runtimes/feeds.py load_npz): an .npz
# whose zip central directory entry has a field zipfile refuses escapes main: NotImplementedError for
# "version needed to extract" > 6.3 ("zip file version 6.4"), an unknown compression method ("That
# compression method is not supported") or flag bit 5 ("compressed patched data"), RuntimeError for
# flag bit 0 ("File 'x.npy' is encrypted, password required for extraction"). Neither reader catches
# them (they catch OSError, ValueError, BadZipFile, EOFError).
ZIP_FIELDS = {"version": (6, b"\x40"), "compression": (10, b"\x63\x00"),
              "patched": (8, b"\x20\x00"), "encrypted": (8, b"\x01\x00")}


@pytest.mark.parametrize("field", sorted(ZIP_FIELDS))
@pytest.mark.parametrize("option", ["--calib", "--inputs"])
def test_repro_npz_unsupported_zip_entry_is_a_user_error(tmp_path, option, field):
    blob = bytearray(_npz_bytes({"x": np.zeros((16, 4), np.float32)}))
    offset, value = ZIP_FIELDS[field]
    at = blob.find(b"PK\x01\x02") + offset  # the central directory entry of x.npy
    blob[at:at + len(value)] = value
    model, npz = tmp_path / "model.onnx", tmp_path / "data.npz"
    onnx.save_model(_tiny_model(), str(model))
    npz.write_bytes(bytes(blob))
    out = tmp_path / "out"
    out.mkdir()
    extra = ["--no-validate"] if option == "--calib" else ["--repeats", "1"]
    _assert_user_error(["optimize", str(model), "-o", str(out / "small.onnx"), option, str(npz), *extra], out)
