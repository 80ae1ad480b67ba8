"""Shared fixtures: tiny ONNX models built with onnx.helper, written to tmp_path.

Model builders are exposed as fixtures returning a function ``build(path, **options) -> Path`` so
tests can write as many variants as they need:

- ``tiny_mlp``: x[batch, 32] -> MatMul(W1 32x48) -> Add(b1) -> Relu -> Gemm(W2 24x48, b2, transB=1)
  -> y[batch, 24]. Weights have a decaying spectrum so truncation is lossy but small.
- ``tiny_mlp_constant``: the same model with W1 stored in a ``Constant`` node instead of an initializer.

Helpers (also fixtures): ``mlp_proto`` (the ModelProto itself), ``mlp_path`` (written to
``tmp_path/mlp.onnx``), ``ort_run`` (run a model in onnxruntime on CPU), ``sample_x``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

IN_DIM, HIDDEN, OUT_DIM = 32, 48, 24
OPSET = 17


def _decaying_matrix(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A random (rows, cols) float32 matrix whose singular values decay geometrically."""
    m = min(rows, cols)
    U, _ = np.linalg.qr(rng.standard_normal((rows, m)))
    V, _ = np.linalg.qr(rng.standard_normal((cols, m)))
    s = 0.8 ** np.arange(m)
    return ((U * s) @ V.T).astype(np.float32)


def mlp_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "W1": _decaying_matrix(rng, IN_DIM, HIDDEN),  # MatMul weight (k=32, n=48)
        "b1": (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32),
        "W2": _decaying_matrix(rng, OUT_DIM, HIDDEN),  # Gemm B with transB=1: (n=24, k=48)
        "b2": (0.1 * rng.standard_normal(OUT_DIM)).astype(np.float32),
    }


def build_mlp(*, weight_in_constant: bool = False, seed: int = 0, bad_input: bool = False) -> onnx.ModelProto:
    """The 2-layer MLP. ``weight_in_constant`` stores W1 in a Constant node; ``bad_input`` makes the
    Relu read a tensor nothing defines (an invalid model, for checker failures)."""
    w = mlp_weights(seed)
    nodes = []
    initializers = [numpy_helper.from_array(w[name], name) for name in ("b1", "W2", "b2")]
    if weight_in_constant:
        nodes.append(helper.make_node("Constant", [], ["W1"], name="W1_const",
                                      value=numpy_helper.from_array(w["W1"], "W1_value")))
    else:
        initializers.insert(0, numpy_helper.from_array(w["W1"], "W1"))
    nodes += [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["undefined_tensor" if bad_input else "h1"], ["h2"], name="relu"),
        helper.make_node("Gemm", ["h2", "W2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", IN_DIM])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", OUT_DIM])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxlr-tests")
    model.ir_version = 8
    if not bad_input:
        onnx.checker.check_model(model)
    return model


@pytest.fixture(name="build_mlp")
def build_mlp_fixture():
    """``build_mlp(weight_in_constant=False, seed=0, bad_input=False) -> ModelProto`` (not written)."""
    return build_mlp


@pytest.fixture
def mlp_proto() -> onnx.ModelProto:
    return build_mlp()


@pytest.fixture
def tiny_mlp():
    """``tiny_mlp(path, **build_mlp options) -> Path``: write the MLP (weights embedded) to ``path``."""

    def build(path, **options) -> Path:
        path = Path(path)
        onnx.save_model(build_mlp(**options), str(path))
        return path

    return build


@pytest.fixture
def tiny_mlp_constant():
    """``tiny_mlp_constant(path) -> Path``: the MLP with its MatMul weight in a Constant node."""

    def build(path, **options) -> Path:
        path = Path(path)
        onnx.save_model(build_mlp(weight_in_constant=True, **options), str(path))
        return path

    return build


@pytest.fixture
def tiny_mlp_external():
    """``tiny_mlp_external(path, location=None) -> Path``: the MLP with every tensor of at least 1 KiB
    (W1, W2) stored in one external data file beside it (default ``<name>.data``)."""

    def build(path, location: str | None = None, **options) -> Path:
        path = Path(path)
        onnx.save_model(build_mlp(**options), str(path), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=location or path.name + ".data",
                        size_threshold=1024)
        return path

    return build


@pytest.fixture
def mlp_path(tmp_path, tiny_mlp) -> Path:
    return tiny_mlp(tmp_path / "mlp.onnx")


@pytest.fixture
def sample_x():
    """``sample_x(batch=4, seed=0)``: float32 inputs for the MLP."""

    def make(batch: int = 4, seed: int = 0) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((batch, IN_DIM)).astype(np.float32)

    return make


@pytest.fixture
def ort_run():
    """``ort_run(model, feeds) -> list of outputs``: run a ModelProto or path on the CPU provider."""

    def run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
        return session.run(None, feeds)

    return run


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers by name, as numpy arrays (external data must already be loaded)."""
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture
def initializers():
    return initializer_arrays


# ------------------------------------------------------------------ reference models (slow tests)
# Built once per test session into one temporary cache and shared by every slow test.

@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("models_cache")


@pytest.fixture(scope="session")
def text_paths(cache):
    from onnxlr.models import text
    return text.build_splits(cache)


@pytest.fixture(scope="session")
def minilm_path(cache):
    from onnxlr.models import minilm
    return minilm.build(cache)


@pytest.fixture(scope="session")
def mnist_path(cache):
    from onnxlr.models import mnist
    return mnist.build(cache)


@pytest.fixture(scope="session")
def eval_feeds(text_paths):
    from onnxlr.models import text
    return text.load(text_paths[1])


def message_lines(err: str) -> list[str]:
    """The lines of the CLI's stderr other than its progress lines (``[onnxlr] 1.2 s  calibration``)."""
    from onnxlr.progress import PREFIX

    return [line for line in err.strip().splitlines() if not line.startswith(PREFIX)]


def user_error_line(capsys, argv) -> str:
    """Run the CLI on ``argv`` and check it failed as a user error: exit 2, exactly one stderr line
    ``onnxlr: error: …``, no traceback. Returns that line."""
    from onnxlr.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    lines = message_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxlr: error: "), err
    assert "Traceback" not in out + err
    return lines[0]


# ------------------------------------------------------- statistics through the calibration service


def calibration_stats(model, calib, *, samples=None, batch_size=8, embeddings=False):
    """``(statistics of every MatMul/Gemm input, token counts of the embedding tables when asked)``: what
    the factorization passes read, collected by the calibration service."""
    from onnxlr.graph import import_graph
    from onnxlr.matching import find_layers, find_tables
    from onnxlr.statistics import Rows, TokenCounts

    graph = import_graph(model)
    rows = [Rows(layer.input.name) for layer in find_layers(graph)[0]]
    counts = [TokenCounts(t.indices.name, t.table.values.shape[0]) for t in find_tables(graph)[0]] if embeddings else []
    found = statistics_service(model, calib, samples=samples, batch_size=batch_size).collect(model, rows + counts)
    return {r.key: found[r.key] for r in rows}, {c.key: found[c.key] for c in counts}


def output_sensitivities(model, calib, *, probes=32):
    """Each MatMul/Gemm output unit's effect on the model output, from the calibration service."""
    from onnxlr.graph import import_graph
    from onnxlr.matching import find_layers

    outputs = sorted({layer.node.outputs[0].name for layer in find_layers(import_graph(model))[0]})
    return statistics_service(model, calib).sensitivity(model, outputs, probes=probes)


def tensor_stats(model, tensors, calib):
    """Statistics of ``tensors``: channel vectors for a tensor a Conv reads, rows of the last axis else."""
    from onnxlr.statistics import ChannelRows, Rows

    conv_inputs = {node.input[0] for node in model.graph.node if node.op_type == "Conv"}
    requests = [(ChannelRows if t in conv_inputs else Rows)(t) for t in tensors]
    return statistics_service(model, calib).collect(model, requests)


def statistics_service(model, calib, **options):
    from onnxlr.runtimes.calibration import StatisticsService

    return StatisticsService.of(model, calib, **options)
