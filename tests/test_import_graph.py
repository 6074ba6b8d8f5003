"""memplan's import graph has no cycles (STYLE 23: a cycle is a responsibility in the wrong place).

What counts as an edge: every ``import memplan.x`` / ``from memplan.x import y`` / relative
import that runs, at module level or inside a function (a lazy import inside a function still
ties the two modules together; it only hides the cycle from the interpreter). Imports under
``if TYPE_CHECKING:`` are left out: they never run and exist only for annotations. When
``from memplan.x import y`` names a submodule ``memplan.x.y``, the edge goes to that submodule
(``from memplan.residency import _wire`` is ``import memplan.residency._wire``); any other name is
read from ``memplan.x``, an edge to it. The parent packages Python imports on the way (``memplan``, before
``memplan.x``) are not edges: every module would then depend on ``memplan/__init__.py``, which
imports them all back.

A package's ``__init__`` importing its own submodules and a submodule importing a sibling are
ordinary edges; so ``memplan.gpu`` (the package) importing ``memplan.gpu.device`` and
``memplan.gpu.device`` importing ``memplan.gpu`` would be a cycle, as it is one at import time.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "memplan"  # read, not imported: a cycle may break import
PACKAGE = "memplan"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: all of them but those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                yield from _runtime_imports(ast.Module(body=[child], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _runtime_imports(node)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, known: set[str]) -> set[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        source = _resolve(module, path.name == "__init__.py", node)
        # ``from memplan.x import y`` reads y from memplan.x, unless memplan.x.y is a module.
        names = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
    found: set[str] = set()
    for name in names:
        # The deepest memplan module the name reaches (``memplan.gpu.device.Device`` -> device).
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """memplan module -> the memplan modules it imports at run time."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _runtime_imports(tree):
            graph[name] |= _targets(name, path, node, known)
        graph[name].discard(name)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "{" + ", ".join(component) + "}: " + "; ".join(edges)


def test_tarjan_finds_a_cycle_and_leaves_a_chain() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_edges_cover_lazy_and_relative_imports_but_not_type_checking() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from memplan.cli import main\n"
        "from . import device\n"
        "from memplan import units, format_size\n"
        "def f():\n    import memplan.errors\n"
    )
    known = {"memplan", "memplan.gpu", "memplan.gpu.device", "memplan.units", "memplan.errors", "memplan.cli"}
    path = ROOT / "gpu" / "allocator.py"
    targets = set().union(
        *(_targets("memplan.gpu.allocator", path, n, known) for n in _runtime_imports(tree))
    )
    assert targets == {"memplan", "memplan.gpu.device", "memplan.units", "memplan.errors"}


def test_the_graph_sees_every_module() -> None:
    graph = import_graph()
    assert "memplan.gpu.device" in graph and "memplan.cli" in graph
    assert "memplan.units" in graph["memplan.gpu.device"] or "memplan.units" in graph["memplan"]


def test_memplan_imports_have_no_cycles() -> None:
    graph = import_graph()
    cycles = [_describe(component, graph) for component in strongly_connected(graph)]
    assert not cycles, "import cycles in memplan:\n" + "\n".join(cycles)


def _room(module: str) -> str:
    """The part of memplan a module belongs to: ``memplan.loaders.executors.full`` ->
    ``memplan.loaders``; a top-level module is its own (``memplan.errors``)."""
    return ".".join(module.split(".")[:2])


def test_the_rooms_of_memplan_import_each_other_one_way() -> None:
    """Module cycles aside, two packages importing each other (the loaders' quantized cache built
    on the residency disk tier, the residency manager reading the loaders' model handle) are one
    responsibility split across two rooms. ``memplan/__init__.py`` is the front door that imports
    everything, so it is left out."""
    graph = import_graph()
    rooms: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if module != PACKAGE:
            rooms.setdefault(_room(module), set()).update(
                _room(t) for t in targets if t != PACKAGE and _room(t) != _room(module)
            )
    cycles = [_describe(component, rooms) for component in strongly_connected(rooms)]
    assert not cycles, "packages of memplan importing each other:\n" + "\n".join(cycles)
