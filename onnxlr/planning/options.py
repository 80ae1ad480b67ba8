"""What a run is told, as small validated option groups with their defaults in one place.

- :class:`RankRule`: how each factorized layer's rank is chosen (a share of its rank, an energy share,
  or a whole-model :class:`~onnxlr.planning.targets.Target` spread by an allocator), per-layer ranks
  overriding it, and how weights are fitted.
- :class:`ConvRule`: how convolutions are factorized.
- :class:`CalibrationOptions`: the calibration data and how much of it to read.
- :class:`ValidationOptions`: where and on what the result is checked, and the tolerance it must meet.
- :class:`ExecutionOptions`: ONNX Runtime threads and the workers that fit weights side by side.

:func:`optimize_options` maps the flat keywords of :func:`onnxlr.optimize` (and the CLI's flags) onto
the groups; it is the only place that does.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence


from onnxlr import linalg
from onnxlr.compare import Tolerance, parse_tolerance
from onnxlr.errors import OnnxlrError
from onnxlr.executors import EXECUTORS
from onnxlr.factorization import METHODS
from onnxlr.passes.factorize_conv import DECOMPOSITIONS
from onnxlr.planning.recipes import Recipe, get_recipe
from onnxlr.planning.targets import Target, parse_target

# Used when no rank rule is given at all: keep half the singular values of every layer.
DEFAULT_RANK_RATIO = 0.5
# Share of each conv's parameters its replacement may keep, unless a ratio is given.
DEFAULT_CONV_RATIO = 0.5
# The relative output error a composed chain of linear layers may cost (``--chains`` without a value).
DEFAULT_CHAIN_ERROR = 1e-3
ALLOCATORS = ("auto", "uniform", "greedy", "knapsack", "evolutionary")



def _share(value, what: str) -> float | None:
    if value is not None and not 0.0 < value <= 1.0:
        raise OnnxlrError(f"{what} must be in (0, 1], got {value}")
    return value


def _at_least_one(value, what: str) -> None:
    if value is not None and (isinstance(value, bool) or value < 1):
        raise OnnxlrError(f"{what} must be at least 1")


@dataclass(frozen=True)
class RankRule:
    """How the rank of each factorized layer is chosen and its weight fitted.

    rank_ratio : keep ``ceil(R * min(k, n))`` singular values of each ``(k, n)`` weight; the default
        (:data:`DEFAULT_RANK_RATIO`) when neither ``energy`` nor ``target`` is given.
    energy : keep the smallest rank holding this share of each layer's squared (calibrated) spectrum.
    target : a whole-model :class:`~onnxlr.planning.targets.Target`, spread over the layers by
        ``allocator`` (:data:`ALLOCATORS`; ``evolutionary`` is seeded by ``seed``).
    ranks : per-layer ranks by node or weight name (MatMul/Gemm, Conv or embedding table), overriding
        the rule; 0 keeps the layer dense.
    method : ``svd``, ``whitened``, ``fisher``, ``asvd`` or ``isvt``; None: ``whitened`` with calibration
        data, ``svd`` without.
    sequential : fit the layers stage by stage to the input the already-compressed ones give them.
    force, refit, bias_correction, svd_solver : see :class:`~onnxlr.passes.factorize_matmul.FactorizeMatMulConfig`.
    embeddings : also factorize embedding tables under the same rule.
    """

    rank_ratio: float | None = None
    energy: float | None = None
    target: Target | None = None
    allocator: str = "auto"
    seed: int = 0
    ranks: Mapping[str, int] = field(default_factory=dict)
    method: str | None = None
    sequential: bool = False
    force: bool = False
    refit: bool = True
    bias_correction: bool = True
    svd_solver: str = "auto"
    embeddings: bool = False

    def __post_init__(self):
        if sum(x is not None for x in (self.rank_ratio, self.energy, self.target)) > 1:
            raise OnnxlrError("give one of a rank ratio, an energy share or a target")
        _share(self.rank_ratio, "rank ratio")
        _share(self.energy, "energy")
        if self.target is not None and not isinstance(self.target, Target):
            object.__setattr__(self, "target", parse_target(self.target))
        if self.allocator not in ALLOCATORS:
            raise OnnxlrError(f"unknown allocator {self.allocator!r} (choose from {', '.join(ALLOCATORS)})")
        if self.allocator != "auto" and self.target is None:
            raise OnnxlrError("--allocator spreads a --target budget over the layers: give --target too")
        if self.method is not None and self.method not in METHODS:
            raise OnnxlrError(f"unknown method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.svd_solver not in linalg.SVD_SOLVERS:
            raise OnnxlrError(f"unknown SVD solver {self.svd_solver!r} (choose from {', '.join(linalg.SVD_SOLVERS)})")
        if self.target is not None and self.embeddings:
            raise OnnxlrError("--target does not allocate embedding tables yet; use --rank-ratio or --energy "
                              "with --embeddings")
        for name, rank in self.ranks.items():
            if isinstance(rank, bool) or int(rank) != rank or rank < 0:
                raise OnnxlrError(f"rank for layer {name!r} must be a non-negative integer (0 keeps it dense), "
                                  f"got {rank}")
        object.__setattr__(self, "ranks", dict(self.ranks))

    @property
    def ratio(self) -> float | None:
        """The rank ratio in force: the one given, or the default when no other rule is."""
        if self.rank_ratio is None and self.energy is None and self.target is None and not self.ranks:
            return DEFAULT_RANK_RATIO
        return self.rank_ratio

    def method_for(self, calibrated: bool) -> str:
        return self.method or ("whitened" if calibrated else "svd")


@dataclass(frozen=True)
class ConvRule:
    """How Conv layers are factorized: ``decomposition`` (``auto``, ``channel``, ``spatial``,
    ``tucker2`` or ``none``), the share of each conv's parameters its replacement may keep (``ratio``;
    :data:`DEFAULT_CONV_RATIO` when not given — and with a target and no ratio, convs are left alone),
    ranks rounded to ``rank_multiple``, ``max_error`` per layer, and the ``latency_guard``."""

    decomposition: str = "auto"
    ratio: float | None = None
    rank_multiple: int = 8
    max_error: float | None = None
    latency_guard: bool = False

    def __post_init__(self):
        if self.decomposition not in ("auto", *DECOMPOSITIONS, "none"):
            raise OnnxlrError(f"unknown conv decomposition {self.decomposition!r} "
                              f"(choose from auto, {', '.join(DECOMPOSITIONS)}, none)")
        _share(self.ratio, "conv parameter ratio")
        _at_least_one(self.rank_multiple, "--rank-multiple")


@dataclass(frozen=True)
class CalibrationOptions:
    """The calibration data (``source``: an .npz, a folder of .npz/.npy files, a dict of arrays or an
    iterable of feed dicts; None: data-free), at most ``samples`` of it, read ``batch_size`` at a time."""

    source: Any = None
    samples: int | None = None
    batch_size: int = 8

    def __post_init__(self):
        if isinstance(self.source, Iterator):  # read more than once (statistics of every step)
            object.__setattr__(self, "source", list(self.source))
        if self.samples is not None and self.samples < 1:
            raise OnnxlrError("--calib-samples must be at least 1")
        _at_least_one(self.batch_size, "--batch-size")

    @property
    def given(self) -> bool:
        return self.source is not None


@dataclass(frozen=True)
class ValidationOptions:
    """Where and on what the result is checked: ``providers`` (``"cpu,cuda"``, ``"all"``…), other
    ``devices`` (command prefixes of other Pythons), sample ``inputs`` (.npz or dict; None: synthetic,
    with symbolic dimensions from ``dims``), the ``max_error`` tolerance, ``batch_size`` samples per run
    and ``repeats`` timed runs. ``enabled=False`` skips running the result."""

    enabled: bool = True
    providers: str | Sequence[str] = ("cpu",)
    devices: str | Sequence[str] = ()
    inputs: Any = None
    dims: Mapping[str, int] | None = None
    max_error: Tolerance | None = None
    batch_size: int = 8
    repeats: int = 20

    def __post_init__(self):
        object.__setattr__(self, "max_error", parse_tolerance(self.max_error))
        _at_least_one(self.batch_size, "--batch-size")
        _at_least_one(self.repeats, "--repeats")


@dataclass(frozen=True)
class ExecutionOptions:
    """ONNX Runtime's intra-op ``threads`` (None: all cores of this process), and ``workers`` fitting
    weights side by side on an ``executor`` (``local`` processes, ``ray``, or an executor object of
    :mod:`onnxlr.executors`, which the caller keeps open)."""

    threads: int | None = None
    workers: int | None = None
    executor: Any = "local"

    def __post_init__(self):
        _at_least_one(self.threads, "--threads")
        _at_least_one(self.workers, "--workers")
        if isinstance(self.executor, str) and self.executor not in EXECUTORS:
            raise OnnxlrError(f"unknown executor {self.executor!r} (choose from {', '.join(EXECUTORS)})")


@dataclass(frozen=True)
class OptimizeOptions:
    """Everything :func:`onnxlr.optimize` does to one model: the ``recipe``, its factorization rules
    (``rank``, ``conv``; None when the recipe does not factorize), linear ``chains`` composed within
    that error (None: left alone), and the data, validation and execution groups."""

    recipe: Recipe
    rank: RankRule | None = None
    conv: ConvRule | None = None
    chains: float | None = None
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    validation: ValidationOptions = field(default_factory=ValidationOptions)
    execution: ExecutionOptions = field(default_factory=ExecutionOptions)

    def __post_init__(self):
        recipe = self.recipe
        if recipe.factorize:
            object.__setattr__(self, "rank", self.rank or RankRule())
            object.__setattr__(self, "conv", self.conv or ConvRule())
        if recipe.needs_calib and not self.calibration.given:
            raise OnnxlrError(f"recipe {recipe.name!r} needs calibration data (--calib)")
        rank = self.rank
        if recipe.mixed_bits and (rank.target is None or rank.target.kind != "bytes"):
            raise OnnxlrError(f"recipe {recipe.name!r} spreads a file size over the layers: give --target bytes=SIZE")
        if rank is not None and rank.target is not None and rank.target.lossless and (
                self.validation.max_error is None or not self.calibration.given):
            raise OnnxlrError("--target lossless needs --max-error (the tolerance to keep) and --calib "
                              "(the data the search runs on)")
        if rank is not None and rank.allocator == "evolutionary" and not self.calibration.given:
            raise OnnxlrError("the evolutionary allocator scores candidates end to end: it needs --calib")

    def describe(self) -> dict[str, Any]:
        """The settings as plain JSON values: what the report shows and the written model records."""
        def plain(value):
            if isinstance(value, (str, int, float, bool)) or value is None:
                return value
            if isinstance(value, Mapping):
                return {str(k): plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
                return [plain(v) for v in value]
            return str(value)

        calib, v = self.calibration, self.validation
        out = {"recipe": self.recipe.name, "chains": self.chains,
               "calibration": {"data": _source(calib.source), "samples": calib.samples, "batch_size": calib.batch_size},
               "validation": {"enabled": v.enabled, "providers": plain(v.providers), "devices": plain(v.devices),
                              "inputs": _source(v.inputs), "dims": plain(v.dims), "max_error": plain(v.max_error),
                              "batch_size": v.batch_size, "repeats": v.repeats},
               "execution": {"threads": self.execution.threads, "workers": self.execution.workers,
                             "executor": plain(self.execution.executor) if isinstance(self.execution.executor, str)
                             else type(self.execution.executor).__name__}}
        if self.rank is not None:
            out["rank"] = {k: plain(v) for k, v in dataclasses.asdict(self.rank).items()}
            out["rank"]["target"] = str(self.rank.target) if self.rank.target else None
            out["conv"] = {k: plain(v) for k, v in dataclasses.asdict(self.conv).items()}
        return out


def _source(data) -> str | None:
    """A data source as the settings show it: its path, or what kind of object was given."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return None if data is None else str(data)
    return f"in memory ({type(data).__name__})"


# The flat keywords of onnxlr.optimize (and the CLI's flags) that belong to the factorization.
RANK_KEYWORDS = ("rank_ratio", "energy", "target", "allocator", "seed", "ranks", "method", "sequential", "force",
                 "refit", "bias_correction", "svd_solver", "embeddings")
CONV_KEYWORDS = {"conv": "decomposition", "conv_ratio": "ratio", "rank_multiple": "rank_multiple",
                 "conv_max_error": "max_error", "latency_guard": "latency_guard"}
# keywords that, given, only make sense with a recipe that factorizes
FACTORIZE_ONLY = ("method", "rank_ratio", "energy", "ranks", "target", "sequential", "conv_ratio", "embeddings")


def optimize_options(recipe: str = "lowrank", *, calib=None, calib_samples: int | None = None,
                     chains: float | None = None, providers: str | Sequence[str] = ("cpu",),
                     devices: str | Sequence[str] = (), inputs=None, dims: Mapping[str, int] | None = None,
                     max_error=None, threads: int | None = None, batch_size: int = 8, repeats: int = 20,
                     validate: bool = True, workers: int | None = None, executor: Any = "local",
                     **factorization) -> OptimizeOptions:
    """The option groups of :func:`onnxlr.optimize`'s keywords (the factorization ones:
    :data:`RANK_KEYWORDS` and :data:`CONV_KEYWORDS`, with the defaults of :class:`RankRule` and
    :class:`ConvRule`)."""
    unknown = set(factorization) - set(RANK_KEYWORDS) - set(CONV_KEYWORDS)
    if unknown:
        raise TypeError(f"optimize() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    chosen = get_recipe(recipe)
    given = [k for k in FACTORIZE_ONLY if factorization.get(k) not in (None, False, {}, ())]
    if not chosen.factorize and given:
        raise OnnxlrError(f"{given[0].replace('_', '-')} applies to low-rank factorization; recipe {recipe!r} does not "
                          f"factorize (use lowrank or lowrank+int8)")
    rank = conv = None
    if chosen.factorize:
        rank = RankRule(**{k: v for k, v in factorization.items() if k in RANK_KEYWORDS and v is not None})
        conv = ConvRule(**{CONV_KEYWORDS[k]: v for k, v in factorization.items() if k in CONV_KEYWORDS and v is not None})
    return OptimizeOptions(
        chosen, rank, conv, chains,
        CalibrationOptions(calib, calib_samples, batch_size),
        ValidationOptions(validate, providers, devices, inputs, dims, max_error, batch_size, repeats),
        ExecutionOptions(threads, workers, executor))
