"""Executors (onnxlr.executors): the local process pool and Ray give what the serial loop gives, with
BLAS threads limited per worker; factorization and the evolutionary search do not depend on them."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

import onnxlr
from onnxlr.errors import OnnxlrError
from onnxlr.executors import LocalPool, SerialExecutor, make_executor
from test_calibrated_pass import correlated_inputs

HAS_RAY = importlib.util.find_spec("ray") is not None


def _probe(shared, item):
    """An executor job: what the worker sees (its pid, BLAS threads, the shared object)."""
    from threadpoolctl import threadpool_info

    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return item * shared["scale"], os.getpid(), blas


def test_local_pool_keeps_order_limits_blas_threads_and_sends_shared_once():
    shared = {"scale": 3, "payload": np.ones(10)}
    with LocalPool(workers=2, blas_threads=1) as pool:
        results = pool.map(_probe, range(20), shared=shared)
        again = pool.map(_probe, range(4), shared=shared)
    assert [r[0] for r in results] == [3 * i for i in range(20)]
    pids = {r[1] for r in results + again}
    assert os.getpid() not in pids and len(pids) <= 2  # the same two workers served both calls
    assert all(blas == [1] * len(blas) for _, _, blas in results)
    assert SerialExecutor().map(_probe, range(3), shared=shared)[2][0] == 6


def test_make_executor_names_and_refusals():
    assert isinstance(make_executor("local", 1), SerialExecutor)
    pool = make_executor("local", 2)
    assert isinstance(pool, LocalPool) and pool.describe() == {"executor": "local", "workers": 2,
                                                               "blas_threads": max(1, pool.blas_threads)}
    with pytest.raises(OnnxlrError, match="unknown executor"):
        make_executor("dask")
    with pytest.raises(OnnxlrError, match="at least 1"):
        make_executor("local", 0)


def test_factorization_on_a_pool_is_byte_identical_to_serial(mlp_proto):
    calib = [{"x": correlated_inputs(64, seed=1)}]
    serial, _ = onnxlr.optimize(mlp_proto, calib=calib, rank_ratio=0.5, validate=False)
    pooled, report = onnxlr.optimize(mlp_proto, calib=calib, rank_ratio=0.5, validate=False, workers=2)
    # the same model; only the provenance's settings (workers=2) differ
    assert pooled.graph.SerializeToString() == serial.graph.SerializeToString()
    assert report.pass_named("factorize_matmul").rewritten


def _evolved_ranks(model, workers, executor):
    calib = [{"x": correlated_inputs(64, seed=s)} for s in range(4)]
    _, report = onnxlr.optimize(model, calib=calib, target="params=0.5", allocator="evolutionary", seed=3,
                                validate=False, workers=workers, executor=executor)
    record = report.pass_named("factorize_matmul").config["allocation"]
    return [(row["weight"], row["rank"]) for row in record["layers"]], record


def test_evolutionary_search_on_a_local_pool_matches_serial(mlp_proto):
    serial, record = _evolved_ranks(mlp_proto, 1, "local")
    pooled, pooled_record = _evolved_ranks(mlp_proto, 2, "local")
    assert pooled == serial
    assert pooled_record["batch_runs"] == record["batch_runs"]  # the workers' runs are counted too


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance (2 CPUs) for the Ray tests."""
    if not HAS_RAY:
        if os.environ.get("ONNXLR_REQUIRE_RAY"):  # make test installs Ray: there it must run
            pytest.fail("ONNXLR_REQUIRE_RAY is set but Ray is not installed")
        pytest.skip("Ray is not installed (pip install 'onnxlr[ray]'; make test installs it)")
    from onnxlr.executors import RayExecutor

    executor = RayExecutor(workers=2)
    yield executor
    executor.close()


def test_ray_executor_gives_the_local_pools_allocation(mlp_proto, local_ray):
    """On a local Ray instance, for a fixed seed, the same ranks as the local pool."""
    local, _ = _evolved_ranks(mlp_proto, 2, "local")
    on_ray, _ = _evolved_ranks(mlp_proto, None, local_ray)
    assert on_ray == local


def test_ray_executor_fits_weights_like_serial(mlp_proto, local_ray):
    calib = [{"x": correlated_inputs(64, seed=1)}]
    serial, _ = onnxlr.optimize(mlp_proto, calib=calib, rank_ratio=0.5, validate=False)
    on_ray, _ = onnxlr.optimize(mlp_proto, calib=calib, rank_ratio=0.5, validate=False, executor=local_ray)
    assert on_ray.graph.SerializeToString() == serial.graph.SerializeToString()
    assert local_ray.describe() == {"executor": "ray", "workers": 2, "blas_threads": 1}


@pytest.mark.parametrize("method", ["svd", "whitened", "asvd", "isvt", "fisher"])
def test_candidates_travel_to_workers_and_build_the_same_weights(mlp_proto, method):
    """What a worker of the evolutionary search receives (pickled once) builds the weights the
    parent builds: every decomposition's rank -> factors function pickles."""
    import pickle

    from conftest import calibration_stats, output_sensitivities
    from onnxlr.factorization import Decomposer, FitSettings
    from onnxlr.graph import import_graph
    from onnxlr.matching import find_layers
    from onnxlr.planning import rank_search

    calib = [{"x": correlated_inputs(64, seed=1)}]
    stats, _ = calibration_stats(mlp_proto, calib)
    sensitivity = output_sensitivities(mlp_proto, calib, probes=2) if method == "fisher" else None
    layers, _ = find_layers(import_graph(mlp_proto))
    decomposer = Decomposer(FitSettings(method=method))
    decompositions = decomposer.decompositions(layers, None if method == "svd" else stats, sensitivity)
    table = rank_search.level_table(layers, decompositions)
    candidates = rank_search.Candidates(decomposer, layers, decompositions, table)
    travelled = pickle.loads(pickle.dumps(candidates))
    for key, ranks in zip(table.keys, table.ranks):
        for rank in (int(ranks[1]), int(ranks[-1])):
            here, there = candidates.weight(key, rank), travelled.weight(key, rank)
            np.testing.assert_array_equal(here[0], there[0])
            assert (here[1] is None) == (there[1] is None)
