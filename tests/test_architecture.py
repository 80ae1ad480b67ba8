"""The layers of docs/architecture.md, checked on the imports of every module (function-level ones too).

core ← passes ← planning ← front door; runtimes depend on the core only; nothing below the front door
imports it; passes never load ONNX Runtime; no import cycle anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"onnxlr": "onnxlr", "passes": "onnxlr.passes", "runtimes": "onnxlr.runtimes", "models": "onnxlr.models"}
FRONT = {"onnxlr", "onnxlr.api", "onnxlr.cli", "onnxlr.__main__", "onnxlr.html_report", "onnxlr.browser",
         "onnxlr.tune_command", "onnxlr.tune_page", "onnxlr.html_page"}
# Which layers each layer may import (its own included). "ort": onnxruntime itself.
ALLOWED = {
    "core": {"core"},
    "passes": {"core", "passes"},
    "runtimes": {"core", "runtimes", "ort"},
    "planning": {"core", "passes", "runtimes", "planning", "ort"},
    "front": {"core", "passes", "runtimes", "planning", "front", "models", "ort"},
    "models": {"core", "passes", "runtimes", "planning", "front", "models", "ort"},
}


def layer_of(module: str) -> str:
    if module == "onnxruntime" or module.startswith("onnxruntime."):
        return "ort"
    if module in FRONT:
        return "front"
    if module == "onnxlr.report" or module.startswith("onnxlr.planning"):
        return "planning"
    for prefix, layer in (("onnxlr.passes", "passes"), ("onnxlr.runtimes", "runtimes"), ("onnxlr.models", "models")):
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return "core"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    rest = [p for p in parts[1:] if p != "__init__"]
    return ".".join([PACKAGES[parts[0]], *rest])


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules (and onnxruntime) a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # ``from pkg import sub`` imports the module pkg.sub; ``from pkg import name`` imports pkg
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            if name in modules or name.split(".")[0] == "onnxruntime":
                found.add("onnxruntime" if name.split(".")[0] == "onnxruntime" else name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    modules = set(files)
    return {module: imports_of(path, modules) - {module} for module, path in files.items()}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the layers."""
    found = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if layer_of(target) not in ALLOWED[layer_of(module)]:
                found.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_import_respects_the_layers():
    assert violations(import_graph()) == []


def test_there_is_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_checks_catch_a_forbidden_import_and_a_cycle():
    """The checker itself: a pass reaching ONNX Runtime or the runtimes, the core reaching a pass, and a
    cycle are all found."""
    graph = import_graph()
    assert graph["onnxlr.passes.factorize_matmul"]  # the real graph is read
    broken = {**graph, "onnxlr.passes.factorize_matmul": graph["onnxlr.passes.factorize_matmul"] | {"onnxruntime"},
              "onnxlr.passes.quantize_int8": graph["onnxlr.passes.quantize_int8"] | {"onnxlr.runtimes.stats"},
              "onnxlr.graph": graph["onnxlr.graph"] | {"onnxlr.passes.fold_constants"}}
    found = violations(broken)
    assert any("factorize_matmul" in v and "onnxruntime" in v for v in found)
    assert any("quantize_int8" in v and "runtimes.stats" in v for v in found)
    assert any(v.startswith("onnxlr.graph") for v in found)
    assert "onnxlr.graph" in graph["onnxlr.macs"] | graph["onnxlr.matching"]  # a core module that imports graph
    assert cycles({**graph, "onnxlr.graph": graph["onnxlr.graph"] | {"onnxlr.matching"}}) != []
