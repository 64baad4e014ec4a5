"""Imports point one way: a static graph of every import in mmfed/ (module level and inside functions,
except `if TYPE_CHECKING:` blocks) has no cycle, and the layers keep their direction.

Why static: a lazy import inside a function is still a dependency (it runs on some path); a circle of
them is how `federation/run.py -> flower/simulation -> flower/apps -> cli -> federation/run` grew.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mmfed"

# (importer prefix, imported prefix): an import from the first into the second is wrong
FORBIDDEN = [
    *[(low, high) for low in ("mmfed.data", "mmfed.models", "mmfed.metrics", "mmfed.teacher",
                              "mmfed.ddpm", "mmfed.utils", "mmfed.protocol", "mmfed.config")
      for high in ("mmfed.algorithms", "mmfed.federation", "mmfed.cli", "mmfed.composition")],
    ("mmfed.algorithms", "mmfed.federation"),
    ("mmfed.algorithms", "mmfed.cli"),
    ("mmfed.federation", "mmfed.cli"),
    ("mmfed.federation.run", "mmfed.federation.flower.simulation"),
    ("mmfed.federation.run", "mmfed.federation.flower.apps"),
    ("mmfed.federation.run", "mmfed.eval_protocols"),
]  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The mmfed modules `path` imports anywhere (a `from pkg import name` of a submodule counts it)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


@functools.cache
def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def _ignoring_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ re-exporting its submodules is not a dependency of theirs on it."""
    return {
        name: {dep for dep in deps if not name.startswith(dep + ".")} for name, deps in graph.items()
    }


def test_the_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    assert "mmfed.federation.run" in graph["mmfed.cli"] or "mmfed.federation.launch" in graph["mmfed.cli"]
    assert graph["mmfed.composition"] >= {"mmfed.validation", "mmfed.config"}  # function-level imports


def test_no_import_cycles() -> None:
    found = cycles(_ignoring_packages(import_graph()))
    assert not found, "import cycles: " + " | ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize(("low", "high"), FORBIDDEN)
def test_layers_point_one_way(low: str, high: str) -> None:
    graph = import_graph()
    wrong = sorted(
        f"{importer} -> {dep}"
        for importer, deps in graph.items()
        if importer == low or importer.startswith(low + ".")
        for dep in deps
        if dep == high or dep.startswith(high + ".")
    )
    assert not wrong, wrong


def test_a_cycle_is_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
