"""Mobile deployment checks: NNAPI / CoreML usability and conversion to the ORT format.

Usability is ONNX Runtime's own static estimate (``onnxruntime.tools.mobile_helpers.usability_checker``,
the engine of ``python -m onnxruntime.tools.check_onnx_model_mobile_usability``): which nodes each
provider takes, judged by op type and fixed input shapes, and how many partitions they fall into.
Every partition boundary is a device copy, so a rewrite that splits one partition in two can cost
more than it saves. Like the tool, the graph checked is the one ORT sees after its basic
optimizations, which are also what an ``.ort`` file bakes in.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxlr.errors import OnnxlrError
from onnxlr.io import output_folder
from onnxlr.feeds import synthetic_feeds

# target name -> the ops list ORT's checker reads (None: NNAPI's own check)
TARGETS = {"NNAPI": None, "CoreML MLProgram": "coreml_supported_mlprogram_ops.md",
           "CoreML NeuralNetwork": "coreml_supported_neuralnetwork_ops.md"}
_RANK = {"NO": 0, "MAYBE": 1, "YES": 2}


@dataclass
class Partitioning:
    """How one provider would split the model: ``unsupported_ops`` are ``domain:op`` names;
    ``suitability`` is ORT's verdict, "YES", "MAYBE" or "NO"."""

    target: str
    nodes: int
    supported_nodes: int
    partitions: int
    unsupported_ops: list[str]
    nodes_unsupported_due_to_dynamic_shape: int
    suitability: str

    @property
    def supported_share(self) -> float:
        """Share of the nodes the provider takes (0 for an empty graph)."""
        return self.supported_nodes / self.nodes if self.nodes else 0.0


@contextlib.contextmanager
def _as_path(model: onnx.ModelProto | bytes | str | os.PathLike):
    """A path to ``model``; protos and bytes go to a temporary file, since ORT's tools read files."""
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise OnnxlrError(f"model file not found: {model}")
        yield Path(model).resolve()
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
        yield path


def _work_around_checker(graph: onnx.GraphProto) -> None:
    """Two crashes of the checker, fixed on our private, analysis-only copy: it reads
    ``node.attribute[0]`` of every Transpose (IndexError when ``perm`` is left at its default, so
    add the implied reversed perm, empty if the rank is unknown), and it refuses a graph without
    value_info ("run shape inference") although one whose every value is a graph input or output
    has none, so add the outputs' (it reads them anyway)."""
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info]
             if v.type.tensor_type.HasField("shape")}
    for node in graph.node:
        if node.op_type == "Transpose" and not node.attribute:
            node.attribute.append(onnx.helper.make_attribute("perm", list(range(ranks.get(node.input[0], 0)))[::-1]))
    if not graph.value_info:
        graph.value_info.extend(graph.output)


def usability(model: onnx.ModelProto | bytes | str | os.PathLike, *,
              assume_fixed_shapes: bool = False) -> list[Partitioning]:
    """ORT's NNAPI / CoreML MLProgram / CoreML NeuralNetwork partitioning of ``model`` (not modified).

    By default a node whose inputs have a dynamic shape is unsupported, as in the tool's as-is
    check (NNAPI needs fixed shapes, CoreML is slow without them): with a free batch or sequence
    dimension nothing is offloaded. ``assume_fixed_shapes`` is the tool's second check, the
    partitioning once the shapes are made fixed (``onnxruntime.tools.make_dynamic_shape_fixed``).
    """
    # imported here: onnxruntime.tools imports torch when it is installed (a second or more)
    from onnxruntime.tools.mobile_helpers import usability_checker as checker
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    with _as_path(model) as path, tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "basic.onnx"
        # as analyze_model: basic level (what an .ort file bakes in), initializers kept outside
        # the protobuf so a large model stays under 2 GB; ORT logs errors only here
        optimize_model(path, optimized, use_external_initializers=True)
        shaped = ModelProtoWithShapeInfo(optimized).model_with_shape_info
    _work_around_checker(shaped.graph)
    results = []
    for target, ops in TARGETS.items():
        info = (checker.check_nnapi_partitions(shaped, not assume_fixed_shapes) if ops is None
                else checker.check_coreml_partitions(shaped, not assume_fixed_shapes, ops))
        # suitability() divides by the node count: an empty graph is simply nothing to offload
        verdict = info.suitability().name if info.num_nodes else "NO"
        results.append(Partitioning(target, info.num_nodes, info.num_supported_nodes, info.num_partitions,
                                    sorted(info.unsupported_ops), info.nodes_unsupported_due_to_dynamic_input,
                                    verdict))
    return results


def friendliness_warnings(original: list[Partitioning], optimized: list[Partitioning]) -> list[str]:
    """One line per target for which ``optimized`` is less provider-friendly than ``original``."""
    before = {p.target: p for p in original}
    warnings = []
    for new in optimized:
        old = before.get(new.target)
        if old is None:
            continue
        worse = []
        if new.partitions > old.partitions:
            worse.append(f"{old.partitions} -> {new.partitions} partitions")
        if new.supported_share < old.supported_share - 1e-9:
            worse.append(f"supported nodes {old.supported_share:.0%} -> {new.supported_share:.0%}")
        added = sorted(set(new.unsupported_ops) - set(old.unsupported_ops))
        if added:
            worse.append(f"new unsupported ops {', '.join(added)}")
        if _RANK[new.suitability] < _RANK[old.suitability]:
            worse.append(f"suitability {old.suitability} -> {new.suitability}")
        if worse:
            warnings.append(f"{new.target}: " + "; ".join(worse))
    return warnings


@dataclass
class MobileCheck:
    """One target's partitioning of the original and of the optimized model, and what got worse."""

    target: str
    original: Partitioning
    optimized: Partitioning
    warnings: list[str]


def with_fixed_inputs(model: onnx.ModelProto | bytes, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs have the fixed ``shapes`` (the shapes it will be deployed with),
    as ``onnxruntime.tools.make_dynamic_shape_fixed`` does."""
    from onnxruntime.tools.onnx_model_utils import make_input_shape_fixed

    proto = onnx.load_model_from_string(model) if isinstance(model, bytes) else onnx.ModelProto.FromString(
        model.SerializeToString())
    for name, shape in shapes.items():
        make_input_shape_fixed(proto.graph, name, list(shape))
    return proto


def compare_models(original: onnx.ModelProto | bytes, optimized: onnx.ModelProto | bytes,
                   input_shapes: dict[str, list[int]] | None = None) -> list[MobileCheck]:
    """:func:`usability` of both models side by side, per target, with :func:`friendliness_warnings`.

    With ``input_shapes`` (input name -> shape) both are checked at those fixed shapes, as NNAPI
    needs; without, ORT's "if the shapes were made fixed" estimate is used.
    """
    if input_shapes:
        original, optimized = (with_fixed_inputs(m, input_shapes) for m in (original, optimized))
    fixed = not input_shapes
    before, after = usability(original, assume_fixed_shapes=fixed), usability(optimized, assume_fixed_shapes=fixed)
    return [MobileCheck(a.target, a, b, friendliness_warnings([a], [b])) for a, b in zip(before, after)]


@dataclass
class OrtConversion:
    """An ``.ort`` file: ``ok`` when it loaded and ran; ``max_abs_diff`` from the ONNX model's outputs."""

    path: Path
    bytes: int
    ok: bool
    reason: str = ""
    max_abs_diff: float | None = None


def _max_abs_diff(got: list, want: list) -> float:
    """Largest absolute difference over the outputs; NaN where the reference has none counts as inf."""
    worst = 0.0
    for g, w in zip(got, want):
        g, w = np.asarray(g), np.asarray(w)
        if g.shape != w.shape or (g.dtype.kind not in "biuf" and not np.array_equal(g, w)):
            return float("inf")
        if g.dtype.kind not in "biuf":  # strings and other objects: equal, as just checked
            continue
        g, w = g.astype(np.float64), w.astype(np.float64)
        diff = np.where(np.isnan(g) & np.isnan(w), 0.0, np.abs(g - w))
        worst = max(worst, float(np.nan_to_num(diff, nan=np.inf).max(initial=0.0)))
    return worst


def _options(config: dict[str, str]) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's warnings (unused initializers…) are noise here
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return options


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:300]


def convert_to_ort(model: onnx.ModelProto | bytes | str | os.PathLike, path: str | os.PathLike, *,
                   runtime_optimizations: bool = False, feeds: dict[str, np.ndarray] | None = None) -> OrtConversion:
    """Convert ``model`` to an ORT-format file at ``path`` as ``convert_onnx_models_to_ort`` does, then
    load the file and run it on ``feeds`` (synthetic by default) next to the ONNX model.

    As the script: optimization level "all" minus the x86-only NCHWc layout (an ``.ort`` file is
    meant for ARM devices too); ``runtime_optimizations`` is its "Runtime" style, advised for
    NNAPI/CoreML: only basic optimizations are baked in, the rest are saved for replay on whatever
    the provider leaves to the CPU. The file is written under a temporary name in the destination
    folder and renamed into place only once it ran. An unwritable destination raises OnnxlrError;
    a model ORT cannot convert or run gives ``ok=False`` and the reason.
    """
    path = Path(path)
    output_folder(path)
    if isinstance(model, (str, os.PathLike)) and not Path(model).is_file():
        raise OnnxlrError(f"model file not found: {model}")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else \
        model if isinstance(model, bytes) else str(model)
    try:  # a private folder, not mkstemp: the file ORT creates there gets the usual permissions
        tmp_dir = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OnnxlrError(f"cannot write to {path.parent}: {exc.strerror}") from None
    tmp = os.path.join(tmp_dir, path.name)
    try:
        options = _options({"session.save_model_format": "ORT",
                             "session.qdqisint8allowed": "0"})  # the script's default target platform
        if runtime_optimizations:
            options.add_session_config_entry("optimization.minimal_build_optimizations", "save")
        options.optimized_model_filepath = tmp
        try:
            ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=["NchwcTransformer"])
        except Exception as exc:  # ORT's own refusal (invalid graph, no kernel) is the finding
            return OrtConversion(path, 0, False, f"conversion failed: {_one_line(exc)}")
        size = os.path.getsize(tmp)
        if feeds is None:
            proto = model if isinstance(model, onnx.ModelProto) else onnx.load_model_from_string(model) \
                if isinstance(model, bytes) else onnx.load(str(model), load_external_data=False)
            feeds = synthetic_feeds(proto)
        try:
            load = _options({"session.load_model_format": "ORT"})  # whatever the file's suffix
            got = ort.InferenceSession(tmp, sess_options=load, providers=["CPUExecutionProvider"]).run(None, feeds)
        except Exception as exc:
            return OrtConversion(path, size, False, f"the .ort file does not run: {_one_line(exc)}")
        # the reference is the ONNX model as a user would run it, in ORT's default session
        reference = ort.InferenceSession(source, sess_options=_options({}), providers=["CPUExecutionProvider"])
        want = reference.run(None, feeds)
        os.replace(tmp, path)
        return OrtConversion(path, size, True, "", _max_abs_diff(got, want))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.rmdir(tmp_dir)
