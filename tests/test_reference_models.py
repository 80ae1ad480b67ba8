"""End to end on the reference models: exactness at full rank, the CLI on MiniLM, the demo."""

import json

import numpy as np
import onnx
import pytest

import onnxlr
import onnxlr.io
from onnxlr.graph import count_parameters
from onnxlr.cli import main
from onnxlr.models import metrics, minilm, mnist
from onnxlr.runtimes.providers import make_session

pytestmark = pytest.mark.slow


def test_minilm_full_rank_reproduces_the_embeddings(minilm_path, eval_feeds):
    optimized, report = onnxlr.optimize(minilm_path, rank_ratio=1.0, force=True, validate=False)
    record = report.pass_named("factorize_matmul")
    assert len(record.rewritten) == 36  # Q, K, V, O, FFN-in, FFN-out x 6 layers
    feeds = {k: v[:64] for k, v in eval_feeds.items()}
    reference = minilm.embed(minilm_path, feeds)
    produced = minilm.embed(optimized, feeds)
    assert np.abs(produced - reference).max() < 1e-5
    assert metrics.cosine_rows(reference, produced).min() > 0.99999


def test_mnist_gemm_layers_at_full_rank_keep_every_prediction(mnist_path, cache):
    optimized, report = onnxlr.optimize(mnist_path, rank_ratio=1.0, force=True, conv="none", validate=False)
    assert [c.op for c in report.pass_named("factorize_matmul").rewritten] == ["Gemm"] * 3
    images, _ = mnist.load_test(cache)
    ref = make_session(str(mnist_path), "CPUExecutionProvider", 2).run(None, {"image": images})[0]
    out = make_session(optimized.SerializeToString(), "CPUExecutionProvider", 2).run(None, {"image": images})[0]
    assert np.abs(out - ref).max() < 1e-4 * np.abs(ref).max()
    assert metrics.top1_agreement(ref, out) == 1.0


def test_mnist_convs_factorized_with_calibration_keep_the_accuracy(mnist_path, cache):
    images, labels = mnist.load_test(cache)
    run = lambda m: make_session(m.SerializeToString(), "CPUExecutionProvider", 2).run(None, {"image": images})[0]  # noqa: E731
    original = onnxlr.io.load_model(mnist_path)
    optimized, report = onnxlr.optimize(original, calib=cache / mnist.CALIB_FILE, conv="auto", conv_ratio=0.5,
                                        ranks={"/7/Gemm": 60}, validate=False)
    record = report.pass_named("factorize_conv")
    assert len(record.rewritten) == 2 and all(c.details["data_aware"] for c in record.rewritten)
    assert count_parameters(optimized) < count_parameters(original)
    # measured: 0.962 for the original, about 0.955 with both convs at half their parameters
    assert metrics.accuracy(run(optimized), labels) > 0.94


def test_cli_optimizes_minilm_at_rank_ratio_half(minilm_path, text_paths, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    report_path = tmp_path / "report.json"
    code = main(["optimize", str(minilm_path), "-o", str(out), "--rank-ratio", "0.5",
                 "--inputs", str(text_paths[1]), "--repeats", "5", "--report", str(report_path)])
    text = capsys.readouterr().out
    assert code == 0
    onnx.checker.check_model(str(out))
    report = json.loads(report_path.read_text())
    assert report["optimized"]["params"] < report["original"]["params"]
    assert report["optimized"]["bytes"] < report["original"]["bytes"]
    cpu = report["validation"]["providers"][0]
    assert cpu["provider"] == "CPUExecutionProvider" and cpu["available"]
    assert cpu["latency_original"]["median_ms"] > 0 and cpu["speedup"] > 0
    embedding = cpu["outputs"][0]
    assert embedding["name"] == "embedding" and 0 < embedding["cosine"] < 1 and embedding["rel_l2"] > 0
    assert report["validation"]["samples"] == 512
    for figure in ("params", "bytes", "rel L2", "cosine", "latency", "speed-up"):
        assert figure in text
    # the written model is the validated one: it runs and gives the reported agreement
    feeds = dict(np.load(text_paths[1]))
    got, ref = minilm.embed(str(out), feeds), minilm.embed(str(minilm_path), feeds)
    flat = float(np.sum(got * ref) / (np.linalg.norm(got) * np.linalg.norm(ref)))
    assert flat == pytest.approx(embedding["cosine"], abs=1e-4)


def test_demo_builds_optimizes_and_reports(cache, minilm_path, text_paths, capsys):
    assert main(["demo", "--cache-dir", str(cache)]) == 0
    captured = capsys.readouterr()
    assert "pass quantize_int8" in captured.out and "CPUExecutionProvider" in captured.out
    assert "WARNING" not in captured.out + captured.err  # the demo's result is one a newcomer can use
    onnx.checker.check_model(str(cache / "minilm.small.onnx"))


def test_minilm_whitened_beats_plain_svd_at_a_ten_percent_reduction(minilm_path, text_paths, eval_feeds):
    import math

    from conftest import calibration_stats
    from onnxlr.io import load_model
    from onnxlr.passes.factorize_matmul import FactorizeMatMul, FactorizeMatMulConfig
    from onnxlr.pipeline import PassManager

    model = load_model(minilm_path)
    stats, _ = calibration_stats(model, text_paths[0])
    feeds = {k: v[:128] for k, v in eval_feeds.items()}
    reference = minilm.embed(model, feeds)
    ranks = {}
    for name, (k, n) in (("query", (384, 384)), ("key", (384, 384)), ("value", (384, 384)),
                         ("attention/output/dense", (384, 384)), ("intermediate/dense", (384, 1536)),
                         ("output/dense", (1536, 384))):
        for layer in range(6):
            node = (f"/encoder/encoder/layer.{layer}/attention/self/{name}/MatMul" if name in ("query", "key", "value")
                    else f"/encoder/encoder/layer.{layer}/{name}/MatMul")
            ranks[node] = math.floor(0.9 * k * n / (k + n))
    cosine = {}
    for method in ("svd", "whitened"):
        candidate = PassManager([FactorizeMatMul(FactorizeMatMulConfig(method=method, ranks=ranks),
                                                 None if method == "svd" else stats)]).run(model)[0]
        cosine[method] = metrics.cosine_rows(reference, minilm.embed(candidate, feeds)).mean()
    assert cosine["whitened"] > cosine["svd"] + 0.1
    assert cosine["whitened"] > 0.94  # regression floor; the 0.97 goal of issue #3 is not met yet
