"""The budget search on real (tiny) ONNX models: one-session candidate scoring, every allocator
meeting params / MACs / bytes / latency budgets within one level, the search record, tolerances."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import onnxlr
from onnxlr.planning import rank_search
from conftest import calibration_stats
from onnxlr.errors import OnnxlrError
from onnxlr.graph import count_parameters, import_graph
from onnxlr.matching import find_layers
from onnxlr.passes.factorize_matmul import FactorizeMatMul, FactorizeMatMulConfig
from onnxlr.pipeline import PassManager
from onnxlr.compare import compare, parse_tolerance
from onnxlr.factorization import Decomposer
from onnxlr.runtimes.swap import SwapRunner
from test_calibrated_pass import correlated_inputs
from test_sequential import pooled_mlp

SEARCHING = ("greedy", "knapsack", "evolutionary")


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_swapped_weights_reproduce_the_rewritten_model(mlp_proto):
    """A candidate scored in the one shared session computes what the rewritten model computes."""
    calib = [{"x": correlated_inputs(64, seed=1)}]
    stats, _ = calibration_stats(mlp_proto, calib)
    layers, _ = find_layers(import_graph(mlp_proto))
    config = FactorizeMatMulConfig(method="whitened", ranks={"fc1": 3, "fc2": 5})
    decomposer = Decomposer(config.settings)
    built = PassManager([FactorizeMatMul(config, stats)]).run(mlp_proto)[0]
    table = rank_search.level_table(layers, decomposer.decompositions(layers, stats))
    candidates = rank_search.Candidates(decomposer, layers, decomposer.decompositions(layers, stats), table)
    runner = SwapRunner(mlp_proto, layers, calib)
    weights = {key: candidates.weight(key, rank) for key, rank in ((("W1", False), 3), (("W2", True), 5))}
    got = runner.outputs(weights, 0)[0]
    np.testing.assert_allclose(got, _run(built, calib[0]), rtol=1e-4, atol=1e-5)
    # the divergence is measured against the original's outputs, and is zero for the original weights
    assert runner.divergence({}) < 1e-12
    reference = _run(mlp_proto, calib[0])
    expected = np.sum((got.astype(np.float64) - reference) ** 2) / np.sum(reference.astype(np.float64) ** 2)
    assert runner.divergence(weights) == pytest.approx(expected, rel=1e-6)
    assert runner.evaluations == 3


def _search_record(report):
    return report.pass_named("factorize_matmul").config["allocation"]


def _within_one_level(record, budget_slack_ok):
    """Cost within the budget, and (for the allocators that spend it) no layer could take one more
    level without exceeding it."""
    assert record["cost"] <= record["budget"] + 1e-6
    if budget_slack_ok:
        return
    left = record["budget"] - record["cost"]
    for row in record["layers"]:
        if row["level"] + 1 < row["levels"]:
            assert row["next_cost"] - row["cost"] > left


@pytest.mark.parametrize("allocator", ["uniform", *SEARCHING, "auto"])
def test_params_target_is_met_by_every_allocator(mlp_proto, allocator):
    calib = [{"x": correlated_inputs(128, seed=1)}]
    total = count_parameters(mlp_proto)
    out, report = onnxlr.optimize(mlp_proto, calib=calib, target="params=0.6", allocator=allocator,
                                  validate=False)
    assert count_parameters(out) <= 0.6 * total
    record = _search_record(report)
    _within_one_level(record, budget_slack_ok=allocator == "uniform")
    assert record["allocator"] == allocator or allocator == "auto"
    assert record["evaluations"] >= 1 and record["search_seconds"] >= 0
    rows = {row["weight"]: row for row in record["layers"]}
    assert set(rows) == {"W1", "W2"}
    for change in report.pass_named("factorize_matmul").layers:  # the record says what was built
        assert rows[change.details["weight"]]["rank"] == change.details.get("rank", 0)


@pytest.mark.parametrize("allocator", SEARCHING)
def test_macs_target_is_met_in_multiply_adds(allocator):
    from onnxlr.macs import count_macs

    model = pooled_mlp()
    calib = [{"x": np.random.default_rng(1).standard_normal((64, 8, 32)).astype(np.float32)}]
    before = count_macs(model, {"batch": 1}).total
    out, report = onnxlr.optimize(model, calib=calib, target="macs=0.6", dims={"batch": 1},
                                  allocator=allocator, validate=False)
    assert count_macs(out, {"batch": 1}).total <= 0.6 * before
    _within_one_level(_search_record(report), budget_slack_ok=False)


@pytest.mark.parametrize("allocator", SEARCHING)
def test_bytes_target_is_met(mlp_proto, allocator):
    calib = [{"x": correlated_inputs(128, seed=1)}]
    out, report = onnxlr.optimize(mlp_proto, calib=calib, target="bytes=7000", allocator=allocator,
                                  validate=False)
    record = _search_record(report)
    _within_one_level(record, budget_slack_ok=False)
    # the weights fit; the new node and factor names add a few hundred bytes on a model this small
    assert out.ByteSize() <= 7000 * 1.05


def test_evolutionary_is_deterministic_for_a_seed_and_no_worse_than_its_start(mlp_proto):
    calib = [{"x": correlated_inputs(64, seed=s)} for s in range(4)]
    records = []
    for _ in range(2):
        _, report = onnxlr.optimize(mlp_proto, calib=calib, target="params=0.5", allocator="evolutionary",
                                    seed=3, validate=False)
        records.append(_search_record(report))
    assert [r["rank"] for r in records[0]["layers"]] == [r["rank"] for r in records[1]["layers"]]
    record = records[0]
    assert record["seed"] == 3 and record["generations"] >= 1
    assert record["calib_divergence"]["evolutionary"] <= record["calib_divergence"][record["started_from"]]
    assert record["batch_runs"] > record["evaluations"]  # staged selection scores on subsets of batches


def test_latency_target_uses_the_lookup_table(mlp_proto, monkeypatch):
    """A latency budget is spent in the milliseconds the table reports (a fake table here: the real
    one is timed in bench/allocators.py and tested in test_latency_table.py)."""
    from onnxlr.runtimes import latency, latency_table

    class FakeTable:
        def __init__(self, **_):
            pass

        def layer_costs(self, rows, k, n, ranks):  # ms proportional to multiply-adds, plus overhead
            return 0.01 + rows * k * n * 1e-6, np.array([0.02 + rows * r * (k + n) * 1e-6 for r in ranks])

    monkeypatch.setattr(latency_table, "LatencyTable", FakeTable)
    # The whole model "takes" its two layers' dense time (0.108 + 0.084 ms at 64 rows) plus 0.058 ms;
    # re-measured, the first result misses the target (0.9 of the original), the second meets it.
    ratios = iter([0.9, 0.7])

    def fake_measure(sessions, feeds, **_):
        if "model" in sessions:
            return {"model": latency.Latency(0.25, 0.25, 1)}
        ratio = next(ratios)
        return {"original": latency.Latency(1.0, 1.0, 1), "optimized": latency.Latency(ratio, ratio, 1)}

    monkeypatch.setattr(latency, "measure", fake_measure)
    calib = [{"x": correlated_inputs(64, seed=1)}]
    out, report = onnxlr.optimize(mlp_proto, calib=calib, target="latency=0.8", dims={"batch": 64},
                                  allocator="knapsack", validate=False)
    record = _search_record(report)
    _within_one_level(record, budget_slack_ok=False)
    # searched again with the share lowered by the miss (0.8 - 0.1), then met
    assert record["latency_checks"] == [{"share_searched": 0.8, "measured_ratio": 0.9},
                                        {"share_searched": 0.7, "measured_ratio": 0.7}]
    assert record["latency_met"]
    assert record["budget"] == pytest.approx(0.7 * 0.25 - (0.25 - (0.01 + 64 * 32 * 48e-6) - (0.01 + 64 * 48 * 24e-6)))
    assert report.pass_named("factorize_matmul").rewritten
    with pytest.raises(OnnxlrError, match="out of reach"):
        onnxlr.optimize(mlp_proto, calib=calib, target="latency=0.01", dims={"batch": 64}, validate=False)


def test_allocator_errors(mlp_proto):
    calib = [{"x": correlated_inputs(64, seed=1)}]
    with pytest.raises(OnnxlrError, match="unknown allocator"):
        onnxlr.optimize(mlp_proto, calib=calib, target="params=0.5", allocator="random", validate=False)
    with pytest.raises(OnnxlrError, match="give --target"):
        onnxlr.optimize(mlp_proto, calib=calib, rank_ratio=0.5, allocator="knapsack", validate=False)
    with pytest.raises(OnnxlrError, match="needs --calib"):
        onnxlr.optimize(mlp_proto, target="params=0.5", allocator="evolutionary", validate=False)


def test_a_user_rank_is_kept_and_paid_for(mlp_proto):
    calib = [{"x": correlated_inputs(128, seed=1)}]
    total = count_parameters(mlp_proto)
    out, report = onnxlr.optimize(mlp_proto, calib=calib, target="params=0.6", ranks={"fc1": 4},
                                  allocator="knapsack", validate=False)
    assert count_parameters(out) <= 0.6 * total
    ranks = {c.node: c.details.get("rank") for c in report.pass_named("factorize_matmul").layers}
    assert ranks["fc1"] == 4
    assert [row["weight"] for row in _search_record(report)["layers"]] == ["W2"]


def test_kl_and_top1_tolerances():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    same = compare("y", ref, ref)
    assert same.kl == pytest.approx(0.0, abs=1e-12) and same.top1 == 1.0
    flipped = compare("y", ref, ref[:, ::-1].copy())
    assert flipped.top1 == 0.0 and flipped.kl > 0.5
    assert parse_tolerance("top1=0.99").holds(same)
    assert not parse_tolerance("top1=0.99").holds(flipped)
    assert not parse_tolerance("kl=0.1").holds(flipped)


def test_cli_allocator_writes_the_search_into_the_report(mlp_path, tmp_path, capsys):
    import json

    from onnxlr.cli import main

    calib = tmp_path / "calib.npz"
    np.savez(calib, x=correlated_inputs(96, seed=5))
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["optimize", str(mlp_path), "-o", str(out), "--calib", str(calib), "--target", "params=0.6",
                 "--allocator", "evolutionary", "--seed", "1", "--repeats", "2", "--report", str(report)]) == 0
    text = capsys.readouterr().out
    assert "allocation: evolutionary" in text and "level " in text
    allocation = json.loads(report.read_text())["passes"][-1]["config"]["allocation"]
    assert allocation["seed"] == 1 and len(allocation["layers"]) == 2
    assert main(["optimize", str(mlp_path), "-o", str(tmp_path / "x.onnx"), "--calib", str(calib),
                 "--rank-ratio", "0.5", "--allocator", "knapsack"]) == 2
    assert "give --target" in capsys.readouterr().err
