"""What ONNX Runtime's per-node profile says about a rewrite (plain functions on the runner's dicts).

A profile maps each node ONNX Runtime ran to ``{"op", "provider", "ms"}`` (median kernel time).
Rewrites keep a layer's name on the node that replaces it and name the nodes they add below it
(``layer/lr_A``, ``layer/lr_B``…), so the optimized nodes of an original node ``n`` are ``n`` itself
and every ``n/…``. ONNX Runtime's own fusions rename the node they keep (``fused fc1/MatMulAddFusion``);
such names are read back as the node they came from (``fc1``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

CPU = "CPUExecutionProvider"


@dataclass
class LayerTiming:
    """One rewritten node: its kernel time before and the summed time of what replaced it."""

    node: str
    op: str
    before_ms: float
    after_ms: float
    after_nodes: list[str]


@dataclass
class ProfileSummary:
    """Per-node profiles of the original and optimized model on one provider, side by side.

    total_ms : summed kernel time, (original, optimized).
    by_op : op type -> summed kernel ms (original, optimized).
    layers : the rewritten nodes (see the module docstring), slowest first.
    placement : model label -> provider -> number of nodes it ran.
    fallback_ops : model label -> op types that ran on the CPU fallback under another provider
        (empty lists on the CPU provider). Times are rounded to 0.1 µs.
    """

    total_ms: tuple[float, float]
    by_op: dict[str, tuple[float, float]]
    layers: list[LayerTiming]
    placement: dict[str, dict[str, int]]
    fallback_ops: dict[str, list[str]] = field(default_factory=dict)


def graph_node_name(profiled: str) -> str:
    """The graph node a profiled node stands for: ``fused fc1/MatMulAddFusion`` -> ``fc1``."""
    if profiled.startswith("fused "):
        head, _, last = profiled[len("fused "):].rpartition("/")
        return head if head and last.endswith("Fusion") else profiled[len("fused "):]
    return profiled


def _op_kind(op: str) -> str:
    """``OpenVINO-EP-subgraph_3`` -> ``OpenVINO-EP-subgraph``: a provider's compiled subgraphs are
    numbered per session, so the original's and the optimized model's would never line up."""
    head, _, tail = op.rpartition("_")
    return head if "subgraph" in head.lower() and tail.isdigit() else op


def _by_graph_node(profile: dict[str, dict]) -> dict[str, dict]:
    merged: dict[str, dict] = {}
    for name, entry in profile.items():
        entry = {**entry, "op": _op_kind(entry["op"])}
        key = graph_node_name(name)
        if key in merged:
            merged[key] = {**merged[key], "ms": merged[key]["ms"] + entry["ms"]}
        else:
            merged[key] = dict(entry)
    return merged


def summarize(original: dict[str, dict], optimized: dict[str, dict], provider: str) -> ProfileSummary:
    """Compare two node profiles (name -> {op, provider, ms}) taken on ``provider``."""
    original, optimized = _by_graph_node(original), _by_graph_node(optimized)
    by_op: dict[str, list[float]] = {}
    for i, profile in enumerate((original, optimized)):
        for entry in profile.values():
            by_op.setdefault(entry["op"], [0.0, 0.0])[i] += entry["ms"]
    layers = []
    for name, entry in original.items():
        replacements = sorted(n for n in optimized if n.startswith(name + "/"))
        if not replacements:
            continue
        if name in optimized:
            replacements.insert(0, name)
        layers.append(LayerTiming(name, entry["op"], round(entry["ms"], 4),
                                  round(sum(optimized[n]["ms"] for n in replacements), 4), replacements))
    layers.sort(key=lambda t: -t.before_ms)
    placement = {label: dict(Counter(e["provider"] for e in profile.values()))
                 for label, profile in (("original", original), ("optimized", optimized))}
    # on the CPU provider nothing is a fallback: both lists stay empty
    fallback = {label: sorted({e["op"] for e in profile.values() if e["provider"] == CPU and provider != CPU})
                for label, profile in (("original", original), ("optimized", optimized))}
    return ProfileSummary(
        total_ms=(round(sum(e["ms"] for e in original.values()), 4), round(sum(e["ms"] for e in optimized.values()), 4)),
        by_op={op: (round(a, 4), round(b, 4)) for op, (a, b) in sorted(by_op.items(), key=lambda kv: -max(kv[1]))},
        layers=layers, placement=placement, fallback_ops=fallback)


def fallback_warning(summary: ProfileSummary, provider: str) -> str:
    """A line when the optimized model leaves more of itself to the CPU fallback than the original."""
    if provider == CPU:
        return ""
    shares = {}
    for label, counts in summary.placement.items():
        total = sum(counts.values())
        shares[label] = (counts.get(CPU, 0), total)
    (cpu_a, n_a), (cpu_b, n_b) = shares["original"], shares["optimized"]
    if n_b == 0 or (n_a and cpu_b / n_b <= cpu_a / n_a):
        return ""
    new_ops = sorted(set(summary.fallback_ops.get("optimized", [])) - set(summary.fallback_ops.get("original", [])))
    ops = f"; new fallback ops: {', '.join(new_ops)}" if new_ops else ""
    return (f"{provider}: the optimized model runs {cpu_b} of {n_b} nodes on the CPU fallback "
            f"(original: {cpu_a} of {n_a}){ops}")
