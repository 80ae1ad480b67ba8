"""PP-OCRv6 det and rec as int8 reference CNNs (:mod:`.cnn`): inputs and OCR task checks.

The pipeline is :mod:`.ppocr`'s (DB boxes, line split at word gaps, rapidocr's rec normalization, greedy
CTC). A det variant is judged with the fp32 rec and a rec variant on the line crops the fp32 det finds,
so each model is judged alone.

* det: calibration = 4 rendered calibration documents (top halves) and the handwriting photo; held-out
  = the real scanned page, the page at 1.5× with a mild blur, 2 held-out documents. Input: rapidocr's
  "shorter side ≥ 640" resize (at most 1280 wide). Check: each fp32 text box found again (IoU ≥ 0.5)
  reading the same text, and the page text equal.
* rec: calibration = 48 rendered lines (calibration words); held-out = the lines the fp32 det finds on the
  held-out det images. Check: each line's string equal.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from . import _common, documents, ppocr
from .cnn import Reference, box_iou, invisible_changes


def det_input(img: np.ndarray) -> np.ndarray:
    """[1, 3, H, W]: rapidocr's shorter-side-640 resize, capped at 1280 wide."""
    cv2 = documents._cv2()
    resized = ppocr.det_resize(img)
    if resized.shape[1] > 1280:
        h, w = img.shape[:2]
        resized = cv2.resize(img, (1280, max(32, int(round(h * 1280 / w / 32)) * 32)))
    return ppocr._normalize(resized)[None]


def ocr_images(split: str) -> dict[str, np.ndarray]:
    cv2 = documents._cv2()
    if split == "heldout":
        page = documents.skimage_bgr("page")
        blurred = cv2.GaussianBlur(cv2.resize(page, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_CUBIC), (3, 3), 0)
        return {"page": page, "page_1.5x_blur": blurred, "doc0": documents.make_document(0, split)[:560],
                "doc1": documents.make_document(1, split)[:560]}
    return {"handwriting": documents.skimage_bgr("text"),
            **{f"doc{i}": documents.make_document(i, split)[:560] for i in range(4)}}


def read(det, rec, img: np.ndarray, chars: list[str]) -> list[tuple[tuple, list[str]]]:
    """(box, texts of its pieces) for each text box ``det`` finds on ``img``, read by ``rec``."""
    prob = det.run(None, {"x": det_input(img)})[0][0, 0]
    boxes = ppocr.text_boxes(prob, img.shape[:2])
    pieces = [(i, p) for i, (x0, y0, x1, y1) in enumerate(boxes) for p in ppocr.split_line(img[y0:y1, x0:x1])]
    texts = []
    if pieces:
        x = np.stack([ppocr.rec_normalize(p) for _, p in pieces])
        probs = np.concatenate([rec.run(None, {"x": x[i:i + 8]})[0] for i in range(0, len(x), 8)])
        texts = ppocr.ctc_decode(probs, chars)
    per_box = [[] for _ in boxes]
    for (i, _), text in zip(pieces, texts):
        per_box[i].append(text)
    return list(zip(boxes, per_box))


@functools.lru_cache(maxsize=None)
def _rec_and_chars(cache: str):
    rec_path = ppocr.build(Path(cache))["rec"]
    return _common.ort_session(rec_path), ppocr.characters(rec_path)


def compare_ocr(ref: dict, cand: dict) -> dict:
    total = same = 0
    for key, boxes in ref.items():
        for box, texts in boxes:
            total += 1
            best = max(cand[key], key=lambda bt: box_iou(box, bt[0]), default=None)
            same += best is not None and box_iou(box, best[0]) >= 0.5 and best[1] == texts
    text = lambda out: ["\n".join(t for _, ts in out[k] for t in ts) for k in ref]  # noqa: E731
    pages_equal = sum(a == b for a, b in zip(text(ref), text(cand)))
    return {"unchanged": same == total and pages_equal == len(ref), "boxes": total, "boxes_same_text": same,
            "pages_equal": pages_equal, "pages": len(ref), "error": 1 - same / max(1, total),
            "summary": f"{same}/{total} text boxes read the same; {pages_equal}/{len(ref)} pages' text equal"}


def ppocr_det(cache: Path) -> Reference:
    rec, chars = _rec_and_chars(str(cache))
    outputs = lambda session, images: {k: read(session, rec, im, chars) for k, im in images.items()}  # noqa: E731
    held = ocr_images("heldout")
    timing = {"x": det_input(held["page"])[:, :, :640, :640].copy()}
    calib = ocr_images("calib")
    return Reference("ppocr_det", ppocr.build(Path(cache))["det"], "x", [{"x": det_input(im)} for im in calib.values()],
                     held, timing, outputs, compare_ocr, calib, invisible_changes(held))


def rendered_lines(n: int, seed: int = 0) -> list[np.ndarray]:
    """Text lines rendered from calibration words (BGR uint8 crops)."""
    cv2, rng = documents._cv2(), np.random.default_rng(1000 + seed)
    out = []
    for _ in range(n):
        font, scale = documents.fonts()[int(rng.integers(0, 4))], float(rng.uniform(0.6, 1.2))
        text, thick = documents.phrase(rng, "calib", int(rng.integers(2, 6))), 1 + int(scale > 0.9)
        (w, h), base = cv2.getTextSize(text, font, scale, thick)
        img = np.full((h + base + 12, w + 12, 3), 255, np.uint8)
        cv2.putText(img, text, (6, h + 6), font, scale, (0, 0, 0), thick, cv2.LINE_AA)
        out.append(img)
    return out


def lines(session, x: np.ndarray, chars) -> list[str]:
    probs = np.concatenate([session.run(None, {"x": x[i:i + 8]})[0] for i in range(0, len(x), 8)])
    return ppocr.ctc_decode(probs, chars)


def compare_lines(ref: list[str], cand: list[str]) -> dict:
    same = sum(a == b for a, b in zip(ref, cand))
    return {"unchanged": same == len(ref), "lines": len(ref), "lines_equal": same, "error": 1 - same / max(1, len(ref)),
            "summary": f"{same}/{len(ref)} lines read the same"}


def ppocr_rec(cache: Path) -> Reference:
    paths = ppocr.build(Path(cache))
    chars = ppocr.characters(paths["rec"])
    det = _common.ort_session(paths["det"])
    crops = [p for img in ocr_images("heldout").values() for x0, y0, x1, y1 in
             ppocr.text_boxes(det.run(None, {"x": det_input(img)})[0][0, 0], img.shape[:2])
             for p in ppocr.split_line(img[y0:y1, x0:x1])]
    held = np.stack([ppocr.rec_normalize(c) for c in crops])
    changed = {label: np.stack([ppocr.rec_normalize(c) for c in imgs.values()])
               for label, imgs in invisible_changes(dict(enumerate(crops))).items()}
    calib = np.stack([ppocr.rec_normalize(c) for c in rendered_lines(48)])
    return Reference("ppocr_rec", paths["rec"], "x", [{"x": calib[i:i + 8]} for i in range(0, 48, 8)], held,
                     {"x": held[:8].copy()}, lambda session, x: lines(session, x, chars), compare_lines, calib, changed)
