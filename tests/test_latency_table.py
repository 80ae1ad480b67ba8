"""Latency table for MatMul candidates: real timings, the disk cache and its keys, damaged files.

Timings are noisy, so no test compares two of them; tiny shapes and ``min_seconds=0.01`` keep the
real measurements to milliseconds.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from onnxlr.runtimes import latency_table as lt
from onnxlr.runtimes.latency_cache import DiskCache
from onnxlr.runtimes.providers import make_session

SHAPE = dict(rows=4, k=16, n=8)


def fake_measure(ms: float, calls: list):
    """A stand-in for ``LatencyTable._measure`` that records what it was asked for."""
    def fake(self, rows, k, n, ranks):
        calls.append(list(ranks))
        return [ms] * len(ranks)
    return fake


def forbid_measuring(monkeypatch):
    def fail(*args):
        raise AssertionError("measured although the value is cached")
    monkeypatch.setattr(lt.LatencyTable, "_measure", fail)


def test_models_are_valid_onnx_and_compute_the_product():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 16)).astype(np.float32)
    for rank, op_count in ((None, 1), (3, 2)):
        model = lt.matmul_model(4, 16, 8, rank, rng)
        onnx.checker.check_model(model, full_check=True)
        assert [n.op_type for n in model.graph.node] == ["MatMul"] * op_count
        assert model.opset_import[0].version == 17 and model.ir_version == 8
        weights = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer]
        (y,) = make_session(model.SerializeToString(), "CPUExecutionProvider", 1).run(None, {"x": x})
        np.testing.assert_allclose(y, np.linalg.multi_dot([x, *weights]), rtol=1e-4, atol=1e-5)


def test_real_timing_is_positive_finite_and_cached(tmp_path, monkeypatch):
    cache = tmp_path / "table.json"
    table = lt.LatencyTable(cache=cache, min_seconds=0.01)
    dense = table.matmul_ms(**SHAPE, rank=None)
    low = table.matmul_ms(**SHAPE, rank=2)
    assert all(np.isfinite(v) and v > 0 for v in (dense, low))
    assert len(json.loads(cache.read_text())) == 2  # dense and rank 2, one entry each

    forbid_measuring(monkeypatch)
    again = lt.LatencyTable(cache=cache, min_seconds=0.01)
    assert again.matmul_ms(**SHAPE, rank=None) == dense
    assert again.matmul_ms(**SHAPE, rank=2) == low


def test_layer_costs_shapes_and_dense_measured_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(lt.LatencyTable, "_measure", fake_measure(1.5, calls))
    table = lt.LatencyTable(cache=tmp_path / "table.json")
    dense, costs = table.layer_costs(**SHAPE, ranks=[1, 2, 4])
    assert isinstance(dense, float) and costs.shape == (3,) and costs.dtype == np.float64
    assert calls == [[None, 1, 2, 4]]  # one interleaved run for the whole layer
    dense, costs = table.layer_costs(**SHAPE, ranks=np.array([4, 6, 6]))
    assert costs.shape == (3,) and calls[-1] == [6]  # dense and rank 4 came from the cache
    assert table.layer_costs(**SHAPE, ranks=[])[1].shape == (0,)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="positive"):
        table.layer_costs(**SHAPE, ranks=[0])


def test_threads_and_provider_are_part_of_the_key(tmp_path, monkeypatch):
    cache = tmp_path / "table.json"
    calls = []
    monkeypatch.setattr(lt.LatencyTable, "_measure", fake_measure(1.0, calls))
    assert lt.LatencyTable(cache=cache).matmul_ms(**SHAPE, rank=2) == 1.0
    for ms, options in ((2.0, dict(threads=2)), (3.0, dict(provider="OtherExecutionProvider"))):
        monkeypatch.setattr(lt.LatencyTable, "_measure", fake_measure(ms, calls))
        assert lt.LatencyTable(cache=cache, **options).matmul_ms(**SHAPE, rank=2) == ms
    assert len(calls) == 3 and len(json.loads(cache.read_text())) == 6
    forbid_measuring(monkeypatch)
    assert lt.LatencyTable(cache=cache).matmul_ms(**SHAPE, rank=2) == 1.0


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", ""])
def test_damaged_cache_file_is_an_empty_cache(tmp_path, monkeypatch, content):
    cache = tmp_path / "table.json"
    cache.write_text(content)
    calls = []
    monkeypatch.setattr(lt.LatencyTable, "_measure", fake_measure(0.25, calls))
    assert lt.LatencyTable(cache=cache).matmul_ms(**SHAPE, rank=None) == 0.25
    assert calls == [[None]] and list(json.loads(cache.read_text()).values()) == [0.25]


def test_bad_entries_are_measured_again(tmp_path, monkeypatch):
    cache = tmp_path / "table.json"
    calls = []
    monkeypatch.setattr(lt.LatencyTable, "_measure", fake_measure(1.0, calls))
    lt.LatencyTable(cache=cache).matmul_ms(**SHAPE, rank=None)
    cache.write_text(json.dumps({key: "fast" for key in json.loads(cache.read_text())}))
    assert lt.LatencyTable(cache=cache).matmul_ms(**SHAPE, rank=None) == 1.0 and len(calls) == 2


def test_disk_cache_merges_concurrent_writers_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "cache.json"
    first, second = DiskCache(path), DiskCache(path)
    first.put("a", 1.0)
    first.save()
    second.put("b", [1.0, 2.0])
    second.save()
    assert json.loads(path.read_text()) == {"a": 1.0, "b": [1.0, 2.0]}
    assert [p.name for p in path.parent.iterdir()] == ["cache.json"]
    memory = DiskCache(None)
    memory.put("a", 1.0)
    memory.save()
    assert memory.get("a") == 1.0 and memory.get("b") is None
