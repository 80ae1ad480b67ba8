"""Where independent pieces of work run: in this process, in a local process pool, or on Ray.

One interface, ``executor.map(fn, items, shared=obj) -> [fn(obj, item) for item in items]`` (results in
the order of ``items``; ``imap`` yields them one by one, so a caller can store each and let it go
before the next arrives), serves the two kinds of work onnxlr spreads out: the per-weight fits of the
factorization passes and the candidate evaluations of the evolutionary rank search. ``shared`` is
what every call needs and is expensive to send (a model, calibration batches): it travels once per
worker, not once per item. ``fn`` must be a module-level function and ``shared`` and the items
picklable, so the same call runs unchanged on any executor.

- :class:`SerialExecutor` (the default): a plain loop, nothing started.
- :class:`LocalPool`: ``workers`` processes (started with ``spawn``: a forked copy of a process whose
  BLAS or ONNX Runtime threads are running can deadlock), each limited to ``blas_threads`` BLAS
  threads (threadpoolctl) so that workers × threads never exceeds the cores.
- :class:`RayExecutor`: the same on a Ray cluster (``ray.init(address)``; a local one when no address
  is given), one actor per worker holding ``shared``. Ray is optional (``pip install onnxlr[ray]``).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from onnxlr.errors import OnnxlrError

EXECUTORS = ("local", "ray")


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class SerialExecutor:
    """Runs every item here, one after another."""

    workers = 1
    blas_threads = None  # whatever this process has
    name = "serial"

    def map(self, fn: Callable, items: Iterable, *, shared: Any = None) -> list:
        return list(self.imap(fn, items, shared=shared))

    def imap(self, fn: Callable, items: Iterable, *, shared: Any = None) -> Iterator:
        return (fn(shared, item) for item in items)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "workers": 1}


# State of a pool worker: the shared object installed once by the pool's initializer.
_SHARED: Any = None


def _install(shared: Any, blas_threads: int) -> None:
    global _SHARED
    from threadpoolctl import threadpool_limits

    threadpool_limits(blas_threads)
    _SHARED = shared


def _call(fn: Callable, item: Any) -> Any:
    return fn(_SHARED, item)


class LocalPool(SerialExecutor):
    """``workers`` local processes, each with ``blas_threads`` BLAS threads (default: the cores this
    process may use divided among the workers, at least 1). With one worker, or one item, the work
    runs here instead: starting a process costs more than it saves."""

    name = "local"

    def __init__(self, workers: int | None = None, blas_threads: int | None = None):
        cores = available_cores()
        self.workers = max(1, int(workers or cores))
        self.blas_threads = max(1, int(blas_threads or cores // self.workers))
        self._pool: ProcessPoolExecutor | None = None
        self._shared_id: int | None = None

    def _pool_for(self, shared: Any) -> ProcessPoolExecutor:
        if self._pool is None or self._shared_id != id(shared):
            self.close()
            # BLAS reads its thread count when the worker imports numpy, before the initializer runs
            env = {name: str(self.blas_threads) for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
            saved = {name: os.environ.get(name) for name in env}
            os.environ.update(env)
            try:
                self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_install, initargs=(shared, self.blas_threads))
                self._pool.submit(int).result()  # start the workers while the environment is set
            finally:
                for name, value in saved.items():
                    if value is None:
                        os.environ.pop(name, None)
                    else:
                        os.environ[name] = value
            self._shared_id = id(shared)
        return self._pool

    def imap(self, fn: Callable, items: Iterable, *, shared: Any = None) -> Iterator:
        items = list(items)
        if self.workers == 1 or len(items) <= 1:
            yield from (fn(shared, item) for item in items)
            return
        pool = self._pool_for(shared)
        # the pool pickles an item only when a worker is about to take it: items that are memory maps
        # are read one (per worker) at a time
        yield from pool.map(_call, [fn] * len(items), items)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool, self._shared_id = None, None

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "workers": self.workers, "blas_threads": self.blas_threads}


class _RayWorker:
    """A Ray actor's state: the shared object, and BLAS limited like a pool worker."""

    def __init__(self, shared: Any, blas_threads: int):
        _install(shared, blas_threads)

    def call(self, fn: Callable, item: Any) -> Any:
        return _call(fn, item)


class RayExecutor(SerialExecutor):
    """``workers`` Ray actors (default: the cluster's CPUs), each with ``blas_threads`` BLAS threads.

    address : a running cluster (``ray://host:10001``, ``auto``); None starts a local Ray instance
        with ``workers`` CPUs (and stops it in :meth:`close`)."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, blas_threads: int = 1):
        try:
            import ray
        except ImportError:
            raise OnnxlrError("the Ray executor needs Ray: pip install 'onnxlr[ray]'") from None
        self._ray = ray
        self._started = not ray.is_initialized()
        address = address or os.environ.get("RAY_ADDRESS")
        if self._started:
            options = {"address": address} if address else {"num_cpus": workers or available_cores()}
            ray.init(**options, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": str(blas_threads)}})
        self.workers = max(1, int(workers or ray.cluster_resources().get("CPU", 1)))
        self.blas_threads = max(1, int(blas_threads))
        self._actors: list = []
        self._shared_id: int | None = None

    def imap(self, fn: Callable, items: Iterable, *, shared: Any = None) -> Iterator:
        ray = self._ray
        items = list(items)
        if not items:
            return
        if not self._actors or self._shared_id != id(shared):
            self._actors = []
            remote = ray.remote(num_cpus=1)(_RayWorker)
            shared_ref = ray.put(shared)
            self._actors = [remote.remote(shared_ref, self.blas_threads) for _ in range(self.workers)]
            self._shared_id = id(shared)
        fn_ref = ray.put(fn)
        # Round-robin, item i on actor i mod workers, at most two items per actor in flight: each item
        # submitted is copied into Ray's object store, so the window bounds what a large model puts there.
        window = 2 * len(self._actors)
        refs = []
        for i, item in enumerate(items):
            refs.append(self._actors[i % len(self._actors)].call.remote(fn_ref, item))
            if len(refs) > window:
                yield ray.get(refs.pop(0))
        for ref in refs:
            yield ray.get(ref)

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors, self._shared_id = [], None
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False

    def describe(self) -> dict[str, Any]:
        return {"executor": self.name, "workers": self.workers, "blas_threads": self.blas_threads}


def make_executor(kind: str = "local", workers: int | None = None, *, address: str | None = None) -> SerialExecutor:
    """An executor by name: ``local`` (a :class:`LocalPool`; with one worker, this process) or ``ray``."""
    if workers is not None and workers < 1:
        raise OnnxlrError(f"workers must be at least 1, got {workers}")
    if kind == "local":
        return LocalPool(workers) if (workers or 1) > 1 else SerialExecutor()
    if kind == "ray":
        return RayExecutor(address, workers)
    raise OnnxlrError(f"unknown executor {kind!r} (choose from {', '.join(EXECUTORS)})")

