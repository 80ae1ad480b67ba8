"""Named recipes: which compression passes run after the optional low-rank factorization, and how.

A recipe is a short list of steps; each step is a pass class and a function giving its config from
whether calibration data was given. The optimizer (:mod:`onnxlr.planning.optimizer`) runs the steps
in order on the (factorized) model, collecting fresh calibration statistics before every step that
uses them — pruning changes the shapes the next step sees — and validates the end result like any
other run. ``onnxlr recipes`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from onnxlr.errors import OnnxlrError
from onnxlr.passes.compose_chains import ComposeChainsConfig, ComposeLinearChains
from onnxlr.passes.equalize_conv import EqualizeConv, EqualizeConvConfig
from onnxlr.passes.fold_batchnorm import FoldBatchNorm, FoldBatchNormConfig
from onnxlr.passes.fuse_activations import FuseActivations, FuseActivationsConfig
from onnxlr.passes.gate_conv import GateConv, GateConvConfig
from onnxlr.passes.quantize_conv_int8 import QuantizeConvInt8, QuantizeConvInt8Config
from onnxlr.passes.prune_structured import PruneStructured, PruneStructuredConfig
from onnxlr.passes.prune_unstructured import PruneUnstructured, PruneUnstructuredConfig
from onnxlr.passes.quantize_int8 import QuantizeInt8, QuantizeInt8Config
from onnxlr.passes.quantize_nbits import QuantizeMatMulNBits, QuantizeMatMulNBitsConfig
from onnxlr.passes.quantize_table_blocks import QuantizeTableBlocks, QuantizeTableBlocksConfig

COMPENSATION_RANK = 16
PRUNE_RATIO = 0.1


@dataclass(frozen=True)
class Step:
    """One pass of a recipe: ``config(calibrated)`` builds its config."""

    pass_class: type
    config: Callable[[bool], Any]


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    factorize: bool = False  # run the low-rank factorization (optimize's rank options) first
    steps: tuple[Step, ...] = field(default_factory=tuple)
    needs_calib: bool = False
    # one storage format per layer (float, int8, 4-bit, low rank) chosen under --target bytes=SIZE:
    # the optimizer runs planning.mixed_precision.MixedPlanner in the factorizer's place
    mixed_bits: bool = False
    # With calibration data, a planning function that replaces the steps: ``search(model, service, *,
    # provider, threads) -> onnxlr.planning.conv_int8.Result`` (choices judged by running the candidates).
    search: Callable[..., Any] | None = None


def _int8(calibrated: bool, **overrides) -> QuantizeInt8Config:
    """int8 everywhere: with calibration data, static activation ranges in ORT's fused form, GPTQ
    rounding and SmoothQuant chosen per layer input; without, dynamic ranges and nearest rounding
    (what ``onnxruntime.quantization.quantize_dynamic`` does, plus per-row embedding tables). Conv
    weights stay float: ONNX Runtime keeps a DequantizeLinear before a Conv unfolded and the Conv out
    of its fused kernels (docs/benchmarks.md)."""
    if calibrated:
        return QuantizeInt8Config(activations="static", static_format="ort", convs=False, **overrides)
    return QuantizeInt8Config(activations="dynamic", rounding="nearest", smooth_alpha=None, convs=False,
                              **overrides)


_INT8 = Step(QuantizeInt8, _int8)
_TABLES_INT8 = Step(QuantizeInt8, lambda calibrated: QuantizeInt8Config(matmuls=False, convs=False))
# 4-bit tables in blocks of 64 along the hidden axis (GatherBlockQuantized, float16 scales): on MiniLM
# 6.2 MB instead of 11.8 MB (int8 rows) for the word table, at held-out cosine -0.0007 (docs/benchmarks.md)
_TABLES_4BIT = Step(QuantizeTableBlocks, lambda calibrated: QuantizeTableBlocksConfig(bits=4, block_size=64))


def _nbits(compensation_rank: int) -> Step:
    return Step(QuantizeMatMulNBits, lambda calibrated: QuantizeMatMulNBitsConfig(
        bits=4, block_size=32, rounding="gptq" if calibrated else "nearest",
        compensation_rank=compensation_rank if calibrated else 0))


def _conv_int8_search(model, service, **kwargs):
    from onnxlr.planning import conv_int8  # planning module that runs ONNX Runtime: loaded when used

    return conv_int8.search(model, service, **kwargs)


# Without the search (or for its defaults): the same passes with fixed choices.
_CNN_INT8 = (Step(FoldBatchNorm, lambda calibrated: FoldBatchNormConfig()),
             Step(FuseActivations, lambda calibrated: FuseActivationsConfig()),
             Step(GateConv, lambda calibrated: GateConvConfig()),
             Step(EqualizeConv, lambda calibrated: EqualizeConvConfig()),
             Step(QuantizeConvInt8, lambda calibrated: QuantizeConvInt8Config()))

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("lowrank", "low-rank factorization of MatMul/Gemm (and Conv) layers; the rank options apply",
           factorize=True),
    Recipe("chains", "compose chains of linear layers (MatMul/Gemm/1x1 Conv with only biases, scales, reshapes "
           "and transposes between) into one map at the width its calibrated rank needs (--chains E sets the "
           "error allowed, default 1e-3)", steps=(Step(ComposeLinearChains, lambda calibrated: ComposeChainsConfig()),)),
    Recipe("int8", "int8 MatMul/Gemm weights and activations, int8 embedding tables; with --calib: static ranges, GPTQ "
           "rounding, SmoothQuant per layer input (ORT's fused integer MatMul); without: dynamic ranges",
           steps=(_INT8,)),
    Recipe("int8-cnn", "static int8 convolutions for CNNs in the QDQ forms ONNX Runtime runs as integer kernels "
           "(QLinearConv, integer Add/Mul/Concat/Sigmoid/pooling between them), after exact float rewrites "
           "(BatchNorm folding, HardSwish fusion); equalization, range rule, bias correction, GPTQ or nearest "
           "rounding and a float head chosen by the calibration outputs, a range-mixing Concat (a YOLO head) "
           "and the pixel arithmetic before it kept float automatically; int8 kept only if measured faster on "
           "the target, else the float rewrites alone where they are faster, else the original",
           steps=_CNN_INT8, needs_calib=True, search=_conv_int8_search),
    Recipe("int8-qdq", "as int8 with --calib, written as QuantizeLinear/DequantizeLinear pairs: portable "
           "to mobile providers, slower than int8 on ONNX Runtime CPU (bias not fused)",
           steps=(Step(QuantizeInt8, lambda calibrated: QuantizeInt8Config(activations="static", convs=False)),),
           needs_calib=True),
    Recipe("int8-weights", "int8 weights, tables and conv weights, float compute: 4x smaller file, no faster "
           "(CNNs slower: ORT keeps the conv weights' DequantizeLinear)",
           steps=(Step(QuantizeInt8, lambda calibrated: QuantizeInt8Config(activations="none")),)),
    Recipe("lowrank+int8", "low-rank factorization, then int8 of the factors and the rest", factorize=True,
           steps=(_INT8,)),
    Recipe("prune+int8", f"structured pruning of {PRUNE_RATIO:.0%} of the hidden units of two-layer blocks "
           "(MLPs, conv pairs; refit on --calib), then int8", steps=(
               Step(PruneStructured, lambda calibrated: PruneStructuredConfig(ratio=PRUNE_RATIO)), _INT8)),
    Recipe("int4", "4-bit block-wise MatMul/Gemm weights (MatMulNBits, block 32; GPTQ with --calib), "
           "4-bit embedding tables (GatherBlockQuantized, block 64); int8 tables whose rows do not split into "
           "blocks of 64", steps=(_nbits(0), _TABLES_4BIT, _TABLES_INT8)),
    Recipe("int4+comp", f"int4 plus a float rank-{COMPENSATION_RANK} correction of each layer's 4-bit error "
           "fitted in the activation eigenspace (EoRA)", steps=(_nbits(COMPENSATION_RANK), _TABLES_4BIT, _TABLES_INT8),
           needs_calib=True),
    Recipe("mixed", "one storage format per MatMul/Gemm weight and embedding table -- float, int8, 4-bit blocks "
           "(32/64/128), low rank in float, int8 or 4-bit; tables also 2-bit -- chosen by a knapsack on each "
           "format's exact bytes and calibrated output error (weighted by end-to-end sensitivity) to fit "
           "--target bytes=SIZE", factorize=True, needs_calib=True, mixed_bits=True),
    Recipe("sparse+comp", f"2:4 Wanda sparsity of MatMul weights plus a rank-{COMPENSATION_RANK} correction "
           "(EoRA); ONNX Runtime CPU has no sparse kernels, so this saves nothing there (reported)",
           steps=(Step(PruneUnstructured, lambda calibrated: PruneUnstructuredConfig(
               pattern="2:4", score="wanda", compensation_rank=COMPENSATION_RANK)),), needs_calib=True),
)}


def get_recipe(name: str) -> Recipe:
    """The recipe called ``name``; a clear error naming the choices otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise OnnxlrError(f"unknown recipe {name!r} (choose from {', '.join(RECIPES)})") from None
