"""tlkit's modules import downward only: no import cycle, no reaching into another tlkit module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tlkit"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def tlkit_imports(path: Path, modules: set[str]) -> list[tuple[str, str]]:
    """``(imported module, imported name or "")`` of every tlkit import in ``path``, at any depth (function-level
    and ``TYPE_CHECKING`` imports included: they are dependencies too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.startswith("tlkit")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tlkit"):
            for alias in node.names:  # `from tlkit.data import sources` imports the submodule
                submodule = f"{node.module}.{alias.name}"
                found.append((submodule, "") if submodule in modules else (node.module, alias.name))
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # A package's __init__ re-exports its modules (edges into it are not edges back out of them).
    return {name: {m for m, _ in tlkit_imports(path, set(paths)) if m != name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_tlkit_modules_import_without_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_imports_another_modules_private_names():
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    private = [
        f"{name} imports {module}.{imported}"
        for name, path in paths.items()
        for module, imported in tlkit_imports(path, set(paths))
        if imported.startswith("_")
    ]
    assert private == []


def test_the_graph_sees_function_level_and_submodule_imports():
    graph = import_graph()
    assert "tlkit.export" in graph["tlkit.features"]  # a function-level import (checkpoint paths)
    assert "tlkit.data._tvsource" in graph["tlkit.data.sources"]  # `from tlkit.data import _tvsource`, lazily
