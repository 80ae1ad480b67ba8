"""Graphs from converters nobody here wrote: scikit-learn through skl2onnx (ZipMap outputs, int64
labels, ai.onnx.ml ops), a Keras CNN through tf2onnx (NHWC, ``unk__N`` dimensions), PyTorch exports
with ``If``/``Loop``/``Scan`` (TorchScript and dynamo), unnamed and duplicate node names, a fixed batch
of 1, opset 11, and a Silero-VAD-shaped graph whose weights live in nested ``If`` branches.

The graphs are stored in tests/fixtures/converters (``build.py`` there regenerates them with the
converters, whose versions ``manifest.json`` records), with calibration and held-out inputs drawn
with different seeds. Each one must optimize, validate, and come out exact at full rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import message_lines

from onnxlr import cli
from onnxlr.feeds import fixed_batch, synthetic_feeds
from onnxlr.runtimes.runner import dense

FIXTURES = Path(__file__).parent / "fixtures" / "converters"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
MODELS = sorted(p.stem for p in FIXTURES.glob("*.onnx"))
# the fixtures whose layers all sit inside If/Loop/Scan bodies or read outer-scope weights there
IN_SUBGRAPHS = {"torch_if", "torch_if_dynamo", "torch_loop", "torch_loop_scan_dynamo", "torch_loop_while_dynamo",
                "vad_like"}


def test_the_fixtures_come_from_the_converters_they_name():
    """The stored graphs are what the converters wrote (their producer), not hand-made look-alikes —
    except the ones built with onnx.helper on purpose (unnamed/duplicate names, the VAD shape, and an
    imitation of tf2onnx kept beside the real tf2onnx graph)."""
    producers = {name: onnx.load(FIXTURES / f"{name}.onnx", load_external_data=False).producer_name
                 for name in MODELS}
    assert producers["skl_mlp_zipmap"] == producers["skl_pipeline"] == "skl2onnx"
    assert producers["tf_keras_cnn"] == "tf2onnx"
    assert producers["torch_if"] == producers["torch_loop"] == "pytorch"
    assert {"skl_mlp_zipmap", "tf_keras_cnn", "torch_if", "torch_loop"} <= set(MANIFEST)


def _data(name: str) -> list[str]:
    calib, inputs = FIXTURES / f"{name}.calib.npz", FIXTURES / f"{name}.inputs.npz"
    return ["--calib", str(calib), "--inputs", str(inputs)] if calib.exists() else []


def _feeds(name: str, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    path = FIXTURES / f"{name}.inputs.npz"
    if path.exists():
        with np.load(path) as npz:
            return {k: npz[k] for k in npz.files}
    return synthetic_feeds(model, seed=3)


def _products_in_subgraphs(model: onnx.ModelProto) -> int:
    """MatMul and Gemm nodes inside If/Loop/Scan bodies, at any depth."""
    def count(graph: onnx.GraphProto, inside: bool) -> int:
        total = sum(inside and node.op_type in ("MatMul", "Gemm") for node in graph.node)
        return total + sum(count(sub, True) for node in graph.node for a in node.attribute
                           for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs))

    return count(model.graph, False)


def _outputs(path: Path, feeds: dict[str, np.ndarray], batch: int | None) -> dict[str, np.ndarray]:
    """Every output as an array (:func:`dense`), run ``batch`` rows at a time for a fixed-batch model.
    Nodes get names of their own first: ONNX Runtime refuses repeated names, which change nothing."""
    model = onnx.load(path)
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    n = next(iter(feeds.values())).shape[0]
    chunks = [feeds] if not batch else [{k: v[i:i + batch] for k, v in feeds.items()} for i in range(0, n, batch)]
    runs = [[dense(v) for v in session.run(None, chunk)] for chunk in chunks]
    return {name: np.concatenate([np.atleast_1d(r[i]) for r in runs]) for i, name in enumerate(names)}


def _optimize(capsys, name: str, out: Path, *options: str) -> dict:
    report = out.with_suffix(".json")
    code = cli.main(["optimize", str(FIXTURES / f"{name}.onnx"), "-o", str(out), "-q", "--report", str(report),
                     "--repeats", "3", *options])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert message_lines(captured.err) == [], captured.err
    onnx.checker.check_model(str(out), full_check=True)
    return json.loads(report.read_text())


def _rewritten(report: dict) -> list[str]:
    return [layer["node"] for p in report["passes"] for layer in p["layers"] if layer["action"] == "rewritten"]


@pytest.mark.parametrize("name", MODELS)
def test_full_rank_rewrite_is_exact(name, tmp_path, capsys):
    """``--rank-ratio 1.0 --force`` rewrites every weighted layer (convs included, those inside control
    flow included) and the result computes what the original does, on held-out inputs."""
    out = tmp_path / "full.onnx"
    report = _optimize(capsys, name, out, "--rank-ratio", "1.0", "--force", "--max-error", "cosine=0.99999",
                       *_data(name))
    assert _rewritten(report), f"{name}: nothing rewritten"
    original = onnx.load(FIXTURES / f"{name}.onnx")
    if name in IN_SUBGRAPHS:  # each layer inside a body became two products there
        assert _products_in_subgraphs(onnx.load(out)) > _products_in_subgraphs(original) > 0
    feeds = _feeds(name, original)
    batch = fixed_batch(original)
    ref, got = _outputs(FIXTURES / f"{name}.onnx", feeds, batch), _outputs(out, feeds, batch)
    assert list(ref) == list(got)
    for key, expected in ref.items():
        if np.issubdtype(expected.dtype, np.floating):
            scale = float(np.abs(expected).max()) or 1.0
            np.testing.assert_allclose(got[key], expected, rtol=0, atol=2e-4 * scale, err_msg=f"{name}:{key}")
        else:  # labels, indices: identical
            np.testing.assert_array_equal(got[key], expected, err_msg=f"{name}:{key}")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("recipe", [("--rank-ratio", "0.5"), ("--recipe", "int8"), ("--recipe", "int8-weights"),
                                    ("--recipe", "chains")], ids=lambda r: r[-1])
def test_every_recipe_optimizes_and_validates(name, recipe, tmp_path, capsys):
    """Each recipe writes a checked model and a validation of every output, whatever its type: integer
    outputs by agreement, sequences of maps (ZipMap) as their values, floats by cosine."""
    out = tmp_path / "out.onnx"
    report = _optimize(capsys, name, out, *recipe, *_data(name))
    original = onnx.load(FIXTURES / f"{name}.onnx", load_external_data=False)
    kinds = {o.name: o.type.WhichOneof("value") for o in original.graph.output}
    elements = {o.name: o.type.tensor_type.elem_type for o in original.graph.output if kinds[o.name] == "tensor_type"}
    (provider,) = report["validation"]["providers"]
    compared = {c["name"]: c for c in provider["outputs"]}
    assert set(compared) == set(kinds)
    for output, kind in kinds.items():
        c = compared[output]
        if kind != "tensor_type":
            assert c["kind"].startswith("seq(map("), c
            assert c["cosine_min"] is not None
        elif onnx.helper.tensor_dtype_to_np_dtype(elements[output]).kind in "iub":
            assert c["kind"] == "tensor" and c["agreement"] is not None and c["cosine_min"] is None, c
        else:
            assert c["cosine_min"] is not None and c["agreement"] is None, c


@pytest.mark.parametrize("name", MODELS)
def test_validate_a_model_against_itself(name, capsys):
    inputs = FIXTURES / f"{name}.inputs.npz"
    code = cli.main(["validate", str(FIXTURES / f"{name}.onnx"), str(FIXTURES / f"{name}.onnx"), "-q",
                     "--repeats", "3", "--max-error", "max_abs=0", *(["--inputs", str(inputs)] if inputs.exists() else [])])
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    assert "Traceback" not in captured.err


def test_integer_outputs_are_compared_by_agreement_and_a_tolerance_means_that(tmp_path, capsys):
    """skl2onnx's int64 label: at rank ratio 0.5 some labels change; the report gives the share that
    agree (no cosine, no max-abs "7"), and ``--max-error top1=…`` on it is a bound on that share."""
    out = tmp_path / "half.onnx"
    report = _optimize(capsys, "skl_mlp_raw", out, "--rank-ratio", "0.5", *_data("skl_mlp_raw"))
    (provider,) = report["validation"]["providers"]
    label = next(c for c in provider["outputs"] if c["name"] == "label")
    assert label["cosine_min"] is None and label["top1"] is None and 0.5 < label["agreement"] < 1.0
    code = cli.main(["validate", str(FIXTURES / "skl_mlp_raw.onnx"), str(out), "--inputs",
                     str(FIXTURES / "skl_mlp_raw.inputs.npz"), "--max-error", "top1=0.999", "-q", "--repeats", "3"])
    text = capsys.readouterr().out
    assert code == 1
    assert f"share of equal elements {label['agreement']:.4g} < 0.999" in text, text


def test_a_stacked_calibration_file_feeds_a_fixed_batch_model(tmp_path, capsys):
    """torch_fixed_batch1 takes x [1, 64]; a stacked .npz of 64 samples is run one sample at a time
    (calibration and validation), where it used to fail with "size 64 on axis 0, the model expects 1"."""
    with np.load(FIXTURES / "torch_fixed_batch1.calib.npz") as npz:
        assert npz["x"].shape[0] > 1
    report = _optimize(capsys, "torch_fixed_batch1", tmp_path / "o.onnx", "--rank-ratio", "0.5",
                       *_data("torch_fixed_batch1"))
    assert report["validation"]["inputs"].endswith("torch_fixed_batch1.inputs.npz")
    assert _rewritten(report)


def test_an_old_opset_is_converted_for_per_channel_int8_and_says_so(tmp_path, capsys):
    """Per-axis DequantizeLinear needs opset 13: an opset-11 export is converted first (onnx's version
    converter), and the report names the conversion."""
    out = tmp_path / "int8.onnx"
    report = _optimize(capsys, "torch_opset11", out, "--recipe", "int8-weights", *_data("torch_opset11"))
    converted = [p for p in report["passes"] if p["name"] == "convert_opset"]
    assert converted and converted[0]["config"] == {"from": 11, "to": 13}
    model = onnx.load(out)
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 13
    assert any(n.op_type == "DequantizeLinear" for n in model.graph.node)


def test_a_run_that_rewrites_nothing_writes_the_input_unchanged(tmp_path, capsys):
    """The VAD-shaped graph through int8 (which skips layers inside subgraphs): the weights come out as
    they went in — no folded copies of an outer-scope weight in each branch, no growth."""
    out = tmp_path / "same.onnx"
    report = _optimize(capsys, "vad_like", out, "--recipe", "int8", *_data("vad_like"))
    assert not _rewritten(report)
    original = onnx.load(FIXTURES / "vad_like.onnx")
    written = onnx.load(out)
    del written.metadata_props[:]
    assert written.graph.SerializeToString() == original.graph.SerializeToString()
    assert report["optimized"]["params"] == report["original"]["params"] > 1000


def test_a_scalar_and_a_state_input_in_a_calibration_file(tmp_path):
    """A 0-d array (a sample rate) goes with every batch; with a state input batched on axis 1 the file
    is one feed, given whole."""
    from onnxlr.calibration import CalibrationSet

    model = onnx.load(FIXTURES / "vad_like.onnx")
    (batch,) = list(CalibrationSet(FIXTURES / "vad_like.calib.npz", model))
    assert batch["sr"].shape == () and batch["state"].shape[1] == batch["input"].shape[0]
    audio = {"input": np.zeros((20, 64), np.float32), "state": np.zeros((2, 20, 16), np.float32),
             "sr": np.array(16000, np.int64)}
    np.savez(tmp_path / "c.npz", **audio)
    (whole,) = list(CalibrationSet(tmp_path / "c.npz", model))
    assert {k: v.shape for k, v in whole.items()} == {k: v.shape for k, v in audio.items()}


# ------------------------------------------------------------------------------ Silero VAD (PyPI wheel)


def _silero():
    from onnxlr.models import pypi_models

    path = pypi_models.locate("silero_vad")
    if path is None:
        pytest.skip("silero-vad is not installed (make test installs it)")
    return path, pypi_models.sample_inputs("silero_vad")


def test_silero_vad_layers_inside_if_are_rewritten_and_exact_at_full_rank(tmp_path, capsys):
    """Every weight of Silero VAD lives in If branches (Constant nodes). At full rank its convs are
    rewritten in place, inside the branches, and the outputs (speech probability, next state) match on
    a real 16 kHz chunk."""
    path, feeds = _silero()
    np.savez(tmp_path / "chunk.npz", **feeds)
    out = tmp_path / "vad.onnx"
    code = cli.main(["optimize", str(path), "-o", str(out), "-q", "--rank-ratio", "1.0", "--force", "--repeats", "3",
                     "--inputs", str(tmp_path / "chunk.npz"), "--max-error", "cosine=0.9999", "--report",
                     str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    convs = [l for p in report["passes"] if p["name"] == "factorize_conv" for l in p["layers"] if l["action"] == "rewritten"]
    assert len(convs) >= 12
    original, written = onnx.load(path), onnx.load(out)
    assert not original.graph.initializer and _products_in_subgraphs(original) == 0  # convs, in branches
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)
    for r, g in zip(ref, got):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-4 * max(1.0, float(np.abs(r).max())))
    assert _convs_in_subgraphs(written) > _convs_in_subgraphs(original) >= 12


def _convs_in_subgraphs(model: onnx.ModelProto) -> int:
    def count(graph: onnx.GraphProto, inside: bool) -> int:
        total = sum(inside and node.op_type == "Conv" for node in graph.node)
        return total + sum(count(sub, True) for node in graph.node for a in node.attribute
                           for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs))

    return count(model.graph, False)


def test_dim_sets_an_unnamed_axis_of_an_input(tmp_path, capsys):
    """Silero VAD's ``input`` is ``[None, None]``: no name for ``--dim`` to set. ``--dim input:1=256``
    addresses the axis itself (the 8 kHz chunk size), for synthetic validation and timing."""
    path, _ = _silero()
    code = cli.main(["validate", str(path), str(path), "-q", "--repeats", "3", "--dim", "input:1=256",
                     "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "'input': [1, 256]" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert "input:1=256" in report["validation"]["inputs"]
    assert cli.main(["validate", str(path), str(path), "-q", "--dim", "input:5=256"]) == 2
    assert "axis 5" in message_lines(capsys.readouterr().err)[0]
