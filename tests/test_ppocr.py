"""Tests for onnxlr.models.ppocr: the PP-OCRv6 det/rec models from the rapidocr wheel.

The ``slow`` tests copy the models into the session's temporary cache, build the
inputs from scikit-image's scanned page and run both models on CPU (a few seconds).
They are skipped when rapidocr, OpenCV or scikit-image is not installed. The
agreement and decoding tests are plain numpy and unmarked.
"""

from __future__ import annotations

import json
from importlib import metadata

import numpy as np
import pytest

from onnxlr.errors import OnnxlrError
from onnxlr.models import _common, ppocr

slow = pytest.mark.slow


def _require_packages():
    try:
        metadata.version("rapidocr")
    except metadata.PackageNotFoundError:
        pytest.skip("rapidocr is not installed (pip install 'onnxlr[models]')")
    pytest.importorskip("cv2", reason="OpenCV (a rapidocr dependency) is not installed")
    pytest.importorskip("skimage", reason="scikit-image is not installed")


@pytest.fixture(scope="module")
def ppocr_models(cache):
    _require_packages()
    return ppocr.build(cache)


@pytest.fixture(scope="module")
def ppocr_inputs(cache, ppocr_models):
    return ppocr.sample_inputs(cache)


@pytest.fixture(scope="module")
def ppocr_outputs(ppocr_models, ppocr_inputs):
    return {key: _common.ort_session(ppocr_models[key]).run(None, ppocr_inputs[key])[0]
            for key in ("det", "rec")}


# ----------------------------------------------------------------------------- models and inputs

@slow
def test_build_copies_both_models_once(cache, ppocr_models):
    assert set(ppocr_models) == {"det", "rec"}
    stamps = {k: p.stat().st_mtime_ns for k, p in ppocr_models.items()}
    assert ppocr.build(cache) == ppocr_models
    assert {k: p.stat().st_mtime_ns for k, p in ppocr_models.items()} == stamps, "second build must reuse the cache"
    meta = json.loads((cache / ppocr.META_FILE).read_text())
    assert meta["complete"] and meta["rapidocr"] == metadata.version("rapidocr")
    for key, info in meta["models"].items():
        assert info["sha256"] == info["sha256_listed_by_rapidocr"]
        assert info["constant_nodes"] == 0
        assert info["weight_ops_with_initializer_weight"] > 0
        assert list(info["inputs"]) == ["x"] and list(info["outputs"]) == ["fetch_name_0"]


@slow
def test_sample_inputs_shapes_files_and_cache(cache, ppocr_inputs):
    det, rec = ppocr_inputs["det"]["x"], ppocr_inputs["rec"]["x"]
    assert det.shape == (5, 3, 640, 640) and det.dtype == np.float32
    assert rec.shape[1:] == (3, 48, 320) and len(rec) >= 8 and rec.dtype == np.float32
    for x in (det, rec):
        assert -1.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1
    for key, path in ppocr.input_paths(cache).items():
        with np.load(path, allow_pickle=False) as data:
            assert data.files == ["x"]
            np.testing.assert_array_equal(data["x"], ppocr_inputs[key]["x"])
    again = ppocr.sample_inputs(cache)
    np.testing.assert_array_equal(again["rec"]["x"], rec)


@slow
def test_outputs_shapes_and_self_agreement(ppocr_inputs, ppocr_outputs):
    det, rec = ppocr_outputs["det"], ppocr_outputs["rec"]
    assert det.shape == (5, 1, 640, 640) and 0.0 <= det.min() and det.max() <= 1.0
    assert (det > ppocr.DET_THRESH).mean() > 0.01, "the page must contain detected text"
    n = len(ppocr_inputs["rec"]["x"])
    assert rec.shape == (n, 40, 18710)
    np.testing.assert_allclose(rec.sum(axis=2), 1.0, atol=1e-4)
    assert ppocr.agreement(det, det.copy()) == {"rel_l2": 0.0, "max_abs": 0.0, "mask_iou": 1.0}
    assert ppocr.agreement(rec, rec.copy()) == {"top1": 1.0, "top1_nonblank": 1.0,
                                                "sequence_match": 1.0, "rel_l2": 0.0}


@slow
def test_recogniser_reads_the_page(ppocr_models, ppocr_outputs):
    text = " ".join(ppocr.ctc_decode(ppocr_outputs["rec"], ppocr.characters(ppocr_models["rec"])))
    for word in ("Region-based", "segmentation", "markers", "background", "histogram"):
        assert word in text, text


# ----------------------------------------------------------------------------- plain numpy

def test_det_agreement_detects_changes():
    rng = np.random.default_rng(0)
    ref = rng.uniform(size=(2, 1, 8, 8)).astype(np.float32)
    cand = ref.copy()
    cand[0, 0, :4] = 1.0 - cand[0, 0, :4]
    m = ppocr.det_agreement(ref, cand)
    assert 0 < m["rel_l2"] and 0 < m["max_abs"] <= 1 and 0 < m["mask_iou"] < 1
    empty = np.zeros((1, 1, 4, 4), np.float32)
    assert ppocr.det_agreement(empty, empty)["mask_iou"] == 1.0
    with pytest.raises(ValueError):
        ppocr.det_agreement(ref, cand[:1])


def test_rec_agreement_and_ctc_decode():
    idx = np.array([[0, 3, 3, 0, 3, 5, 0, 0], [2, 2, 0, 0, 0, 0, 0, 0]])
    ref = np.eye(6, dtype=np.float32)[idx]
    assert ppocr.ctc_decode(ref) == [(3, 3, 5), (2,)]
    assert ppocr.ctc_decode(ref, list("_abcde")) == ["cce", "b"]
    cand = ref.copy()
    cand[1, 0] = np.eye(6, dtype=np.float32)[4]  # row 1 now decodes to (4, 2)
    m = ppocr.rec_agreement(ref, cand)
    assert m["top1"] == 15 / 16 and m["top1_nonblank"] == 5 / 6 and m["sequence_match"] == 0.5
    assert m["rel_l2"] > 0
    assert ppocr.agreement(ref, cand) == m
    with pytest.raises(ValueError):
        ppocr.agreement(ref[0], cand[0])


def test_missing_rapidocr_is_a_user_error(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "files", not_installed)
    with pytest.raises(OnnxlrError, match=r"pip install 'onnxlr\[models\]'"):
        ppocr.package_files()
