"""PP-OCRv6 text detection and recognition, from the ``rapidocr`` wheel, with real inputs.

What is provided: the two ONNX models that the PyPI package ``rapidocr``
(Apache-2.0, models by PaddleOCR, also Apache-2.0) ships inside its wheel,
copied unchanged into the cache:

* ``ppocr_det.onnx`` (``PP-OCRv6_det_small.onnx``): a DB text detector.
  Input ``x`` float32 ``[batch, 3, H, W]`` (H, W multiples of 32; the working
  shape here is ``1 x 3 x 640 x 640``), output ``fetch_name_0`` ``[batch, 1, H, W]``,
  the per-pixel text probability. 83 ``Conv`` + 2 ``ConvTranspose``, about
  2.45 M parameters, about 4.3 GMAC at 640 x 640.
* ``ppocr_rec.onnx`` (``PP-OCRv6_rec_small.onnx``): an SVTR-style CTC text-line
  recogniser. Input ``x`` float32 ``[batch, 3, 48, W]`` (working shape
  ``N x 3 x 48 x 320``), output ``fetch_name_0`` ``[batch, W / 8, 18710]``, per-
  timestep softmax probabilities over the 18708 characters stored in the
  model's metadata (``character``) plus CTC blank (index 0) and space (last).
  57 ``Conv`` and 13 ``MatMul`` (9 with a weight initializer, 4 attention
  products), about 5.3 M parameters and 1.09 GMAC at 48 x 320; the last
  MatMul, the 120 x 18710 classifier, holds 2.2 M of the parameters.

Both models are opset 11 (paddle2onnx), with every weight an initializer (no
``Constant`` nodes) and a dynamic batch axis. ``build`` checks each copied
file's SHA-256 against the one rapidocr itself lists for that model in its
``default_models.yaml``.

Why: convolutional networks whose cost sits in dense 1 x 1 convolutions (68 %
of the detector's MACs, 83 % of the recogniser's), next to depthwise ones,
which is a different target for low-rank factorization than the transformer
and MLP reference models.

Inputs (``sample_inputs``): built from ``skimage.data.page()``, a real scanned
page of printed text (191 x 384, grayscale), and for detection also
``skimage.data.text()``, a photo of handwritten formulas. Preprocessing follows
rapidocr 3.10 (``ch_ppocr_det.utils.DetPreProcess`` and
``ch_ppocr_rec.main.TextRecognizer.resize_norm_img``): BGR uint8 image,
``cv2.resize`` (bilinear), ``x / 255``, then ``(x - 0.5) / 0.5``, channels first.

* det: each image is resized the rapidocr way with its shorter side set to
  640 (``limit_type="min"``, both sides rounded to multiples of 32) and cut
  into 640 x 640 tiles across its width: 2 tiles of the page and 3 (overlapping)
  of the formula photo, ``[5, 3, 640, 640]``.
* rec: the detector is run on the whole resized page; its probability map is
  thresholded at 0.3, dilated 2 x 2 and split into text boxes (as rapidocr's
  ``DBPostProcess`` does, but with axis-aligned boxes, which suits a straight
  scan), each box grown by the DB unclip distance (ratio 1.6) and cropped from
  the original page. Lines wider than 320 / 48 are cut at the emptiest column
  near that limit (a word gap), because rapidocr would otherwise squeeze them
  into 320 pixels. Each crop is resized to height 48, right-padded with zeros
  to width 320: ``[N, 3, 48, 320]``. The text the recogniser reads from them
  is stored in ``ppocr_inputs.json`` as a check.

The inputs are written to ``ppocr_det_inputs.npz`` and ``ppocr_rec_inputs.npz``
(key ``x``, the models' input name), ready for the CLI's ``--inputs``.

Quality (``agreement``): detection by relative L2 and max abs difference of
the probability maps and IoU of the text masks at rapidocr's threshold 0.3;
recognition by per-timestep top-1 agreement (all timesteps, and the timesteps
where the reference is not blank), share of crops whose CTC-decoded character
sequence is identical, and relative L2 of the probabilities.

Dependencies: ``rapidocr`` (for the model files; located through its installed
file list, so the package is never imported), ``opencv-python-headless``
(a rapidocr dependency, for the resizes) and ``scikit-image`` (for the images).
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np

from onnxlr.errors import OnnxlrError

from . import _common

FORMAT = 1
PACKAGE = "rapidocr"
INSTALL_HINT = "pip install 'onnxlr[models]'"

# name -> (file inside the rapidocr package, file in the cache)
MODELS = {
    "det": ("PP-OCRv6_det_small.onnx", "ppocr_det.onnx"),
    "rec": ("PP-OCRv6_rec_small.onnx", "ppocr_rec.onnx"),
}
META_FILE = "ppocr.json"
INPUT_FILES = {"det": "ppocr_det_inputs.npz", "rec": "ppocr_rec_inputs.npz"}
INPUTS_META_FILE = "ppocr_inputs.json"
INPUT_NAME = "x"
OUTPUT_NAME = "fetch_name_0"

# rapidocr 3.10 config.yaml and preprocessing
MEAN = 0.5
STD = 0.5
SCALE = 1 / 255.0
DET_SIZE = 640  # working tile: 3 x 640 x 640
DET_THRESH = 0.3  # Det.thresh: probability above which a pixel is text
DET_BOX_THRESH = 0.5  # Det.box_thresh: minimum mean probability of a kept box
DET_UNCLIP_RATIO = 1.6
DET_MIN_SIZE = 3
REC_HEIGHT = 48
REC_WIDTH = 320
CTC_BLANK = 0


# ----------------------------------------------------------------------------- models

def _installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        return None


def package_files() -> dict[str, Path]:
    """Paths of the det and rec ``.onnx`` files inside the installed rapidocr package.

    Found through the package's installed file list, without importing rapidocr
    (so its runtime dependencies are not needed for this). Raises OnnxlrError
    if rapidocr is not installed or ships no such file.
    """
    from importlib import metadata

    try:
        files = metadata.files(PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise OnnxlrError(f"the PP-OCR models come from the '{PACKAGE}' package, which is not "
                          f"installed: {INSTALL_HINT}") from None
    by_name = {Path(str(f)).name: Path(f.locate()) for f in files if str(f).endswith(".onnx")}
    found = {}
    for key, (source, _) in MODELS.items():
        path = by_name.get(source)
        if path is None or not path.is_file():
            raise OnnxlrError(f"{PACKAGE} {_installed_version()} ships no {source} "
                              f"(has: {sorted(by_name) or 'no .onnx files'}); {INSTALL_HINT}")
        found[key] = path
    return found


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listed_sha256(model_file: Path, source: str) -> str | None:
    """The SHA-256 that rapidocr's ``default_models.yaml`` gives for ``source``, if any."""
    listing = model_file.parent.parent / "default_models.yaml"
    try:
        text = listing.read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(rf"/{re.escape(source)}\s*\n\s*SHA256:\s*([0-9a-fA-F]{{64}})", text)
    return m.group(1).lower() if m else None


def _describe(path: Path) -> dict:
    """Opset, inputs, outputs and weight layout of a copied model; checks what the module relies on."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    graph = model.graph
    inits = {t.name for t in graph.initializer}

    def dims(v):
        return [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]

    inputs = {v.name: dims(v) for v in graph.input if v.name not in inits}
    outputs = {v.name: dims(v) for v in graph.output}
    if list(inputs) != [INPUT_NAME] or list(outputs) != [OUTPUT_NAME]:
        raise OnnxlrError(f"{path.name}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                          f"got {list(inputs)} and {list(outputs)}")
    convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm")]
    return {
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "inputs": inputs,
        "outputs": outputs,
        "nodes": len(graph.node),
        "constant_nodes": sum(n.op_type == "Constant" for n in graph.node),
        "initializer_parameters": int(sum(int(np.prod(t.dims)) for t in graph.initializer)),
        "weight_ops_with_initializer_weight": sum(n.input[1] in inits for n in convs),
        "weight_ops": len(convs),
    }


def build(cache: Path) -> dict[str, Path]:
    """Copy the PP-OCRv6 det and rec models from the rapidocr wheel into ``cache``.

    Returns ``{"det": cache/ppocr_det.onnx, "rec": cache/ppocr_rec.onnx}``.
    Idempotent: a complete copy from the installed rapidocr version is returned
    as is (and so is any complete copy when rapidocr is not installed).
    Raises OnnxlrError if rapidocr is not installed and nothing is cached, or
    if a file's SHA-256 differs from the one rapidocr lists for it.
    """
    cache = Path(cache)
    paths = {key: cache / target for key, (_, target) in MODELS.items()}
    meta_path = cache / META_FILE
    meta = _common.cached_metadata(meta_path, list(paths.values()), FORMAT)
    installed = _installed_version()
    if meta is not None and (installed is None or meta.get("rapidocr") == installed):
        return paths

    sources = package_files()
    cache.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    models = {}
    for key, (source_name, _) in MODELS.items():
        source = sources[key]
        digest = _sha256(source)
        listed = _listed_sha256(source, source_name)
        if listed is not None and listed != digest:
            raise OnnxlrError(f"{source} has SHA-256 {digest}, but rapidocr lists {listed}; "
                              f"reinstall rapidocr")
        with _common.atomic_path(paths[key]) as tmp:
            shutil.copyfile(source, tmp)
            info = _describe(tmp)
        models[key] = {"source": source_name, "sha256": digest, "sha256_listed_by_rapidocr": listed, **info}
    _common.write_json(meta_path, {
        "complete": True,
        "format": FORMAT,
        "rapidocr": installed,
        "license": "Apache-2.0 (rapidocr; PaddleOCR model weights)",
        "models": models,
        "files": _common.file_sizes(list(paths.values())),
    })
    return paths


# ----------------------------------------------------------------------------- preprocessing

def _cv2():
    try:
        import cv2
    except ImportError:
        raise OnnxlrError(f"the PP-OCR inputs need OpenCV (a rapidocr dependency): {INSTALL_HINT}") from None
    return cv2


def load_images() -> dict[str, np.ndarray]:
    """The source images as BGR uint8 ``[H, W, 3]``: ``page`` (printed text) and ``text`` (handwriting)."""
    try:
        from skimage import data
    except ImportError:
        raise OnnxlrError(f"the PP-OCR inputs use scikit-image's sample images: {INSTALL_HINT}") from None
    cv2 = _cv2()
    return {name: cv2.cvtColor(getattr(data, name)(), cv2.COLOR_GRAY2BGR) for name in ("page", "text")}


def _normalize(img: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W, 3]`` -> float32 ``[3, H, W]`` in [-1, 1], as rapidocr normalizes."""
    return ((img.astype(np.float32) * SCALE - MEAN) / STD).transpose(2, 0, 1).astype(np.float32)


def det_resize(img: np.ndarray, limit_side_len: int = DET_SIZE) -> np.ndarray:
    """rapidocr's ``DetPreProcess.resize`` with ``limit_type="min"``: scale so the shorter
    side is at least ``limit_side_len``, round both sides to multiples of 32."""
    h, w = img.shape[:2]
    ratio = float(limit_side_len) / min(h, w) if min(h, w) < limit_side_len else 1.0
    resize_h = int(round(int(h * ratio) / 32) * 32)
    resize_w = int(round(int(w * ratio) / 32) * 32)
    return _cv2().resize(img, (resize_w, resize_h))


def det_tiles(img: np.ndarray, size: int = DET_SIZE) -> np.ndarray:
    """Resize ``img`` (BGR uint8) the rapidocr way and cut it into ``size x size`` tiles
    evenly spaced across its width (x offsets on the 32 grid); float32 ``[n, 3, size, size]``."""
    resized = _normalize(det_resize(img, size))
    _, h, w = resized.shape
    if h != size or w < size:
        raise ValueError(f"resized image is {h} x {w}, cannot tile it into {size} x {size}")
    n = math.ceil(w / size)
    offsets = sorted({int(round(x / 32)) * 32 for x in np.linspace(0, w - size, n)})
    return np.stack([resized[:, :, x:x + size] for x in offsets])


def text_boxes(prob: np.ndarray, image_shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """Axis-aligned text boxes ``(x0, y0, x1, y1)`` in image pixels from a det probability map.

    ``prob``: ``[H, W]`` for the resized image; ``image_shape``: the original (h, w).
    Follows rapidocr's ``DBPostProcess`` (threshold 0.3, 2 x 2 dilation, boxes of mean
    probability at least 0.5, grown by area * 1.6 / perimeter) with bounding rectangles
    instead of rotated ones. Sorted top to bottom, then left to right.
    """
    cv2 = _cv2()
    mask = cv2.dilate((prob > DET_THRESH).astype(np.uint8), np.ones((2, 2), np.uint8))
    contours = cv2.findContours(mask * 255, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)[-2]
    map_h, map_w = prob.shape
    img_h, img_w = image_shape
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        if min(w, h) < DET_MIN_SIZE or prob[y:y + h, x:x + w].mean() < DET_BOX_THRESH:
            continue
        d = w * h * DET_UNCLIP_RATIO / (2 * (w + h))
        x0, x1 = (x - d) * img_w / map_w, (x + w + d) * img_w / map_w
        y0, y1 = (y - d) * img_h / map_h, (y + h + d) * img_h / map_h
        box = (max(0, int(round(x0))), max(0, int(round(y0))),
               min(img_w, int(round(x1))), min(img_h, int(round(y1))))
        if box[2] - box[0] > 3 and box[3] - box[1] > 3:
            boxes.append(box)
    # rapidocr's sorted_boxes: rows by top edge (10 px apart start a new row), then x
    boxes.sort(key=lambda b: b[1])
    rows, row = [], 0
    for i, b in enumerate(boxes):
        if i and b[1] - boxes[i - 1][1] >= 10:
            row += 1
        rows.append(row)
    return [b for _, b in sorted(zip(rows, boxes), key=lambda rb: (rb[0], rb[1][0]))]


def split_line(crop: np.ndarray, max_ratio: float = REC_WIDTH / REC_HEIGHT) -> list[np.ndarray]:
    """Cut a text-line crop (uint8 ``[h, w, 3]``) into pieces no wider than ``max_ratio * h``.

    Columns whose contrast (max - min gray over the middle half of the rows) is below
    35 % of the line's 95th percentile count as empty; each cut goes in the middle of the
    longest run of empty columns (a word gap) in the last half of the allowed width, or
    at the lowest-contrast column if there is none. Pieces with fewer than ``h / 2``
    non-empty columns (margins) are dropped.
    """
    h, w = crop.shape[:2]
    limit = max(2, int(max_ratio * h))
    gray = crop.min(axis=2).astype(np.int32)
    middle = gray[h // 4:h - h // 4] if h >= 4 else gray
    contrast = middle.max(axis=0) - middle.min(axis=0)
    empty = contrast <= 0.35 * np.percentile(contrast, 95)
    cuts, start = [0], 0
    while w - start > limit:
        lo, hi = start + limit // 2, start + limit
        best, best_len, run = None, 0, 0
        for i in range(lo, hi):
            run = run + 1 if empty[i] else 0
            if run and run >= best_len:  # ties go right: longer pieces
                best, best_len = i - run // 2, run
        start = best if best is not None else lo + int(np.argmin(contrast[lo:hi]))
        cuts.append(start)
    cuts.append(w)
    return [crop[:, a:b] for a, b in zip(cuts, cuts[1:]) if (~empty[a:b]).sum() >= h / 2]


def rec_normalize(crop: np.ndarray, height: int = REC_HEIGHT, width: int = REC_WIDTH) -> np.ndarray:
    """rapidocr's ``resize_norm_img`` for a fixed ``width``: resize to ``height`` keeping the
    aspect ratio (capped at ``width``), normalize, zero-pad on the right; float32 ``[3, height, width]``."""
    h, w = crop.shape[:2]
    resized_w = min(width, int(math.ceil(height * w / float(h))))
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = _normalize(_cv2().resize(crop, (resized_w, height)))
    return out


def characters(rec_model: Path) -> list[str]:
    """The recogniser's output classes: CTC blank, the ``character`` metadata lines, space."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(rec_model), load_external_data=False).metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]


def ctc_decode(probs: np.ndarray, chars: list[str] | None = None) -> list:
    """Greedy CTC decoding of rec output ``[N, T, C]``: per row, argmax, merge repeats, drop blanks.

    Returns the class-index tuples, or the strings if ``chars`` is given.
    """
    out = []
    for idx in np.asarray(probs).argmax(axis=2):
        keep = np.ones(len(idx), dtype=bool)
        keep[1:] = idx[1:] != idx[:-1]
        seq = tuple(int(i) for i in idx[keep & (idx != CTC_BLANK)])
        out.append("".join(chars[i] for i in seq) if chars is not None else seq)
    return out


def _run(model: Path, x: np.ndarray) -> np.ndarray:
    return _common.ort_session(model).run(None, {INPUT_NAME: np.ascontiguousarray(x)})[0]


def sample_inputs(cache: Path) -> dict[str, dict[str, np.ndarray]]:
    """Real inputs for both models: ``{"det": {"x": [5, 3, 640, 640]}, "rec": {"x": [N, 3, 48, 320]}}``.

    Returns the arrays (float32). They are also saved as ``cache/ppocr_det_inputs.npz``
    and ``cache/ppocr_rec_inputs.npz`` (key ``x``, see ``input_paths``) with
    ``ppocr_inputs.json`` describing them; a complete earlier build is loaded
    instead of rebuilt. Builds the models first if needed (the rec crops are
    found by running the det model).
    """
    cache = Path(cache)
    files = input_paths(cache)
    meta_path = cache / INPUTS_META_FILE
    if _common.cached_metadata(meta_path, list(files.values()), FORMAT) is not None:
        out = {}
        for key, path in files.items():
            with np.load(path, allow_pickle=False) as data:
                out[key] = {name: data[name] for name in data.files}
        return out

    start = time.perf_counter()
    models = build(cache)
    meta_path.unlink(missing_ok=True)
    images = load_images()
    page = images["page"]
    det_x = np.concatenate([det_tiles(images["page"]), det_tiles(images["text"])])

    full = _normalize(det_resize(page))[None]
    prob = _run(models["det"], full)[0, 0]
    boxes = text_boxes(prob, page.shape[:2])
    crops = [piece for x0, y0, x1, y1 in boxes for piece in split_line(page[y0:y1, x0:x1])]
    if not crops:
        raise RuntimeError("the det model found no text on skimage.data.page()")
    rec_x = np.stack([rec_normalize(c) for c in crops])
    texts = ctc_decode(_run(models["rec"], rec_x), characters(models["rec"]))

    _common.write_npz(files["det"], **{INPUT_NAME: det_x})
    _common.write_npz(files["rec"], **{INPUT_NAME: rec_x})
    _common.write_json(meta_path, {
        "complete": True,
        "format": FORMAT,
        "det": {"shape": list(det_x.shape), "tiles": "2 of skimage.data.page() + 3 of skimage.data.text(), "
                "shorter side resized to 640"},
        "rec": {"shape": list(rec_x.shape), "source": "skimage.data.page()",
                "line_boxes": [list(b) for b in boxes], "text": texts},
        "preprocessing": {"scale": SCALE, "mean": MEAN, "std": STD, "resize": "cv2.resize (bilinear)",
                          "channels": "BGR"},
        "build_seconds": round(time.perf_counter() - start, 2),
        "files": _common.file_sizes(list(files.values())),
    })
    return {"det": {INPUT_NAME: det_x}, "rec": {INPUT_NAME: rec_x}}


def input_paths(cache: Path) -> dict[str, Path]:
    """Where ``sample_inputs`` saves its .npz files: ``{"det": ..., "rec": ...}``."""
    return {key: Path(cache) / name for key, name in INPUT_FILES.items()}


# ----------------------------------------------------------------------------- agreement

def _rel_l2(ref: np.ndarray, cand: np.ndarray) -> float:
    ref, cand = np.asarray(ref, np.float64), np.asarray(cand, np.float64)
    return float(np.linalg.norm(cand - ref) / max(np.linalg.norm(ref), 1e-12))


def det_agreement(reference: np.ndarray, candidate: np.ndarray, thresh: float = DET_THRESH) -> dict[str, float]:
    """Compare two det outputs ``[N, 1, H, W]`` (text probabilities).

    ``rel_l2`` (over all pixels), ``max_abs``, and ``mask_iou``: intersection over union of the
    pixels above ``thresh`` (rapidocr's 0.3) in both, pooled over the batch (1.0 if both are empty).
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape or reference.ndim != 4:
        raise ValueError(f"need two [N, 1, H, W] arrays of equal shape, got {reference.shape} and {candidate.shape}")
    a, b = reference > thresh, candidate > thresh
    union = int(np.logical_or(a, b).sum())
    return {
        "rel_l2": _rel_l2(reference, candidate),
        "max_abs": float(np.abs(candidate.astype(np.float64) - reference).max()),
        "mask_iou": float(np.logical_and(a, b).sum() / union) if union else 1.0,
    }


def rec_agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Compare two rec outputs ``[N, T, C]`` (per-timestep character probabilities).

    ``top1``: share of timesteps with the same argmax; ``top1_nonblank``: the same over the
    timesteps where the reference's argmax is not the CTC blank (blanks dominate and inflate
    ``top1``); ``sequence_match``: share of rows whose greedy CTC decodings are identical;
    ``rel_l2`` over all probabilities.
    """
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    if reference.shape != candidate.shape or reference.ndim != 3:
        raise ValueError(f"need two [N, T, C] arrays of equal shape, got {reference.shape} and {candidate.shape}")
    ia, ib = reference.argmax(axis=2), candidate.argmax(axis=2)
    nonblank = ia != CTC_BLANK
    same = ia == ib
    return {
        "top1": float(same.mean()),
        "top1_nonblank": float(same[nonblank].mean()) if nonblank.any() else 1.0,
        "sequence_match": float(np.mean([x == y for x, y in zip(ctc_decode(reference), ctc_decode(candidate))])),
        "rel_l2": _rel_l2(reference, candidate),
    }


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """``det_agreement`` for 4-D outputs ``[N, 1, H, W]``, ``rec_agreement`` for 3-D ``[N, T, C]``."""
    ndim = np.ndim(reference)
    if ndim == 4:
        return det_agreement(reference, candidate)
    if ndim == 3:
        return rec_agreement(reference, candidate)
    raise ValueError(f"expected a det output [N, 1, H, W] or a rec output [N, T, C], got shape {np.shape(reference)}")
