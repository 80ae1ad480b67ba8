"""Issue #21 on a real YOLO-family detector: ddddocr's pretrained YOLOX click-captcha detector
(models/cnn_yolo.py, from the ddddocr 1.6.1 wheel fetched from PyPI), calibrated on 16 rendered captchas
and judged on 12 held-out ones by ddddocr's own post-processing.

Two forms of the same weights:

* as shipped: each level's head is ``Concat(raw box regressions, sigmoid(obj), sigmoid(cls))``, the
  decode left to the caller. Raw regressions span about −2…3, the scores 0…1: 3–5×, so
  ``integer_regions.range_mixing`` (16×) rightly leaves the head integer — and int8 keeps the boxes.
  (The stride-32 level's objectness reaches 0.38 on these calibration captchas; on captchas without
  characters large enough for that level it stays under 0.01 and that level's head alone is flagged.)
* with the decode in the graph (``cnn_yolo.decode_in_graph``, YOLOX's ``--decode_in_inference`` export,
  the YOLOv5/v8 form): the final Concat joins pixel boxes (0–416) with 0–1 scores. The writer finds it
  without being told a node name and keeps it float, with the decode's pixel arithmetic before it
  (``integer_regions.wide_producers``); with the detection off (``mixing_ratio=0``) one int8
  scale for pixels and scores (step ≈ 1.7) destroys the scores.

Measured (ORT CPU, 2 threads): fp32 finds 49/52 drawn held-out characters (57/64 in calibration);
shipped int8: 50/52 boxes matched at IoU ≥ 0.9, 46/46 boxes of score ≥ 0.5, 549/600 top-50 anchors kept
within 0.1; decoded int8: 50/52 boxes at IoU ≥ 0.9 (19/52 when only the Concat was kept float: the decode's
Add/Mul then ran int8 on pixel coordinates), 549/600 anchors; decoded with the detection off: 42/52 boxes
at IoU ≥ 0.5, 154/600 anchors.
"""

from __future__ import annotations

import onnx
import onnx.version_converter
import pytest

from onnxlr import integer_regions
from onnxlr.activation_ranges import activation_range
from onnxlr.graph import import_graph
from onnxlr.passes.quantize_conv_int8 import QuantizeConvInt8, QuantizeConvInt8Config
from onnxlr.pipeline import PassManager
from onnxlr.runtimes.calibration import StatisticsService

pytestmark = pytest.mark.slow


class Detector:
    """The reference, its two float forms, the calibration statistics of both, and their int8 writes."""

    def __init__(self, cache):
        from onnxlr.models import cnn, cnn_yolo
        from onnxlr.planning.conv_int8 import float_prepass

        self.ref = cnn.reference("yolox_det", cache)
        # as onnxlr's optimizer prepares it: opset ≥ 13 (per-axis DequantizeLinear), the exact float rewrites
        shipped, _ = float_prepass(onnx.version_converter.convert_version(onnx.load(str(self.ref.path)), 13))
        self.models = {"shipped": shipped, "decoded": cnn_yolo.decode_in_graph(shipped)}
        # one pass over the calibration data serves both: the decoded graph holds every tensor of the shipped one
        service = StatisticsService.of(self.models["decoded"], self.ref.calib, batch_size=1, threads=2)
        needs = {form: QuantizeConvInt8().needs(import_graph(m)) for form, m in self.models.items()}
        found = service.collect(self.models["decoded"], [r for rs in needs.values() for r in rs])
        self.stats = {form: {r.key: found[r.key] for r in rs} for form, rs in needs.items()}
        self.fp32 = {form: self.ref.task(m) for form, m in self.models.items()}

    def quantize(self, form: str, **config) -> tuple[onnx.ModelProto, object]:
        """The int8 model QuantizeConvInt8 writes for ``form`` ("shipped"/"decoded"), and its record."""
        rewrite = QuantizeConvInt8(QuantizeConvInt8Config(**config))
        rewrite.stats = self.stats[form]
        out, [record] = PassManager([rewrite]).run(self.models[form])
        return out, record

    def ranges(self, form: str) -> dict:
        """Each float tensor's calibrated range (the writer's default rule)."""
        rule = QuantizeConvInt8Config().rule
        return {name: activation_range(st, rule) for name, st in self.stats[form].items()
                if st is not None and st.count and st.floating}


@pytest.fixture(scope="module")
def detector(cache):
    pytest.importorskip("cv2", reason="OpenCV is not installed (pip install 'onnxlr[models]')")
    pytest.importorskip("skimage", reason="scikit-image is not installed (pip install 'onnxlr[models]')")
    return Detector(cache)


def level_heads(graph) -> list:
    """Concats joining a Conv output (raw regressions) with Sigmoid outputs (scores): YOLOX's level heads."""
    def producers(node) -> set[str]:
        return {t.inputs[0].op for t in node.inputs if t.inputs}

    return [n for n in graph.nodes if n.op == "Concat" and {"Conv", "Sigmoid"} <= producers(n)]


def test_fp32_detector_finds_the_drawn_characters(detector):
    from onnxlr.models import cnn_yolo
    from onnxlr.models.cnn import box_iou

    fp = detector.fp32["shipped"]
    assert cnn_yolo.compare_detections(fp, detector.fp32["decoded"])["unchanged"]  # the decode in the graph is exact
    drawn = found = 0
    for i, key in enumerate(detector.ref.heldout):
        _, boxes = cnn_yolo.captcha(i, "heldout")
        drawn += len(boxes)
        found += sum(any(box_iou(b, d) >= 0.5 for d in fp[key].boxes) for b in boxes)
    assert found >= 0.85 * drawn, (found, drawn)  # measured 49/52
    assert sum(len(d.boxes) for d in fp.values()) <= 1.2 * drawn  # few boxes on the photos themselves


def test_shipped_head_mixes_no_ranges_and_int8_keeps_the_boxes(detector):
    graph = import_graph(detector.models["shipped"])
    heads = level_heads(graph)
    assert len(heads) == 3  # one per stride
    ranges = detector.ranges("shipped")
    for head in heads:
        spans = [integer_regions.span(ranges[t.name]) for t in head.inputs]
        assert max(spans) < 8 * min(spans), (head.name, spans)  # raw regressions next to scores: 3–5×
    assert not {h.name for h in heads} & set(integer_regions.range_mixing(graph, ranges))
    int8, record = detector.quantize("shipped")
    assert record.config["range_mixing"] == {}
    quantized = {n.input[0] for n in int8.graph.node if n.op_type == "QuantizeLinear"}
    assert all(h.outputs[0].name in quantized for h in heads)  # the heads run integer
    check = detector.ref.compare(detector.fp32["shipped"], detector.ref.task(int8))
    assert check["matched"] >= 0.9 * check["boxes"], check["summary"]  # measured 50/52
    assert check["strong_matched"] >= 0.95 * check["strong"], check  # measured 46/46
    assert check["anchors_kept"] >= 0.85 * check["anchors"], check["summary"]  # measured 549/600


def test_decoded_head_is_found_kept_float_and_keeps_the_scores(detector):
    fp = detector.fp32["decoded"]
    int8, record = detector.quantize("decoded")
    mixing = record.config["range_mixing"]
    assert mixing["decode/Concat"].startswith("range-mixing Concat")  # found; no node was named to the writer
    # with the pixel arithmetic before it (a 1.6 px int8 step over 0–416 otherwise), and nothing else
    wide = {name for name, why in mixing.items() if why.startswith("computes a wide input")}
    assert wide and all(name.startswith("decode/") for name in wide), mixing
    assert "range-mixing" in {c.node: c.reason for c in record.skipped}["decode/Concat"]
    nodes = {n.name: n for n in int8.graph.node}
    concat = nodes["decode/Concat"]
    assert concat.op_type == "Concat" and concat.output[0] == "decoded" == int8.graph.output[0].name
    assert not [n for n in int8.graph.node if concat.output[0] in n.input]  # nothing after it: no Q/DQ
    check = detector.ref.compare(fp, detector.ref.task(int8))
    print(sorted(wide), check["summary"])
    assert check["matched"] >= 0.9 * check["boxes"], check["summary"]  # boxes at IoU ≥ 0.9: measured 50/52
    assert check["anchors_kept"] >= 0.85 * check["anchors"], check["summary"]  # measured 549/600

    # the contrast: detection off, pixels and scores share one int8 scale and the scores are lost
    broken, record = detector.quantize("decoded", mixing_ratio=0)
    assert record.config["range_mixing"] == {}
    lost = detector.ref.compare(fp, detector.ref.task(broken))
    assert lost["anchors_kept"] <= 0.5 * lost["anchors"], lost["summary"]  # measured 154/600
    assert lost["matched_iou50"] < check["matched_iou50"], (lost, check)  # measured 42 vs 51 of 52
