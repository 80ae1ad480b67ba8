"""SoftenAttentionMask: a moderate value for the additive attention mask, so Softmax stays fast.

Transformer exports add a mask to the attention scores before ``Softmax``: 0 on real tokens and a huge
negative number on padding (``-FLT_MAX`` in the eager export, ``-inf`` in torch's SDPA export, ``-10000``
in older ones). ``exp`` of such a logit is not 0 but a *denormal* float in ONNX Runtime's CPU kernels
(its exp clamps its input near -104), and arithmetic on denormals is about ten times slower: on
all-MiniLM-L6-v2 the Softmax of the padded rows cost more than every integer MatMul of the int8 model
(docs/benchmarks.md). A mask of ``value`` (default -30) instead keeps ``exp(masked - row max)`` a normal
float that still vanishes next to the real keys: below float32's resolution whenever a masked score sits
less than ``-value - 17`` above the row maximum. The planner picks the value on the calibration data
and keeps the rewrite only where the outputs stay equal (:mod:`onnxlr.planning.attention_masks`).

Recognised: ``Softmax(Add(scores, mask))`` where ``scores`` comes from a MatMul (through a scale) and
``mask`` is computed from constants and the model inputs by the ops of :data:`MASK_OPS`; every float
constant at or below ``threshold`` on that path takes ``value``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxlr.matching import float_constant, standard
from onnxlr.pipeline import LayerChange, Pass

# the ops an additive mask is built with from the 0/1 attention_mask input (walked upwards from the Add)
MASK_OPS = {"Where", "Expand", "Cast", "Sub", "Mul", "Unsqueeze", "Reshape", "And", "Or", "Not", "Equal", "Less",
            "Greater", "GreaterOrEqual", "LessOrEqual", "Slice", "Concat", "ConstantOfShape", "Tile", "Squeeze",
            "Flatten", "Min", "Max", "Add", "Identity"}
SCORE_OPS = {"MatMul", "FusedMatMul", "Gemm"}


@dataclass
class SoftenAttentionMaskConfig:
    """value : what the mask's large negative constants become. threshold : a constant at or below
    this is a mask value."""

    value: float = -30.0
    threshold: float = -1e3


@dataclass
class MaskConstant:
    """One constant input (``index``) of ``node`` holding mask values."""

    node: gs.Node
    index: int
    values: np.ndarray


class SoftenAttentionMask(Pass):
    """Give the additive attention masks ahead of Softmax a moderate value (see the module docstring)."""

    name = "soften_attention_mask"
    config_class = SoftenAttentionMaskConfig

    def match(self, graph: gs.Graph):
        # all found before any is rewritten: masks shared by several Softmax nodes (one per layer) would
        # otherwise look already softened from the second layer on
        return list(self._found(graph))

    def _found(self, graph: gs.Graph):
        seen: set[tuple[int, int]] = set()
        for softmax in graph.nodes:
            if softmax.op != "Softmax" or not standard(softmax):
                continue
            add = _producer(softmax.inputs[0])
            if add is None or add.op != "Add" or len(add.inputs) != 2:
                continue
            sides = [t for t in add.inputs if not _reaches_scores(t)]
            if len(sides) != 1:  # the mask is the one side not computed from the scores
                continue
            found = list(_mask_constants(sides[0], self.config.threshold))
            if not found and not any(_mask_constants(sides[0], float("inf"))):
                yield LayerChange(add.name, add.op, "skipped", "the term added before Softmax holds no mask constant "
                                  f"at or below {self.config.threshold:g} built by {'/'.join(sorted(MASK_OPS))[:60]}…")
            for constant in found:
                if (id(constant.node), constant.index) not in seen:
                    seen.add((id(constant.node), constant.index))
                    yield constant

    def check(self, graph: gs.Graph, candidate: MaskConstant) -> str:
        if float(candidate.values.min()) >= self.config.value:
            return f"mask values already at or above {self.config.value:g}"
        return ""

    def rewrite(self, graph: gs.Graph, candidate: MaskConstant) -> LayerChange:
        old = candidate.node.inputs[candidate.index]
        values = candidate.values
        softened = np.where(values <= self.config.threshold, self.config.value, values).astype(values.dtype)
        candidate.node.inputs[candidate.index] = gs.Constant(f"{old.name}/softened", softened)
        low = float(values.min())
        return LayerChange(candidate.node.name, candidate.node.op, "rewritten", details={
            "mask_value": low if np.isfinite(low) else str(low), "value": self.config.value})

    def skip(self, candidate: MaskConstant, reason: str) -> LayerChange:
        return LayerChange(candidate.node.name, candidate.node.op, "skipped", reason)


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if isinstance(tensor, gs.Variable) and tensor.inputs else None


def _reaches_scores(tensor: gs.Tensor, depth: int = 4) -> bool:
    """Whether ``tensor`` is computed from a MatMul within ``depth`` nodes (the scores, scaled)."""
    node = _producer(tensor)
    if node is None or depth == 0:
        return False
    return node.op in SCORE_OPS or any(_reaches_scores(t, depth - 1) for t in node.inputs)


def _mask_constants(tensor: gs.Tensor, threshold: float):
    """The float constants at or below ``threshold`` the mask expression ``tensor`` is built from."""
    stack, visited = [tensor], set()
    while stack:
        node = _producer(stack.pop())
        if node is None or id(node) in visited or node.op not in MASK_OPS:
            continue
        visited.add(id(node))
        for index, source in enumerate(node.inputs):
            values = float_constant(source)
            if values is None:
                stack.append(source)
            elif values.size and float(values.min()) <= threshold:
                yield MaskConstant(node, index, values)
