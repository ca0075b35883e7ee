"""The package's import graph has no cycle.

Every module of ``plugins/gpu_training`` is parsed with ``ast``; every ``import`` of a ``gpu_training``
module is an edge, at module level or inside a function (a lazy import is still a cycle, only a later
one), and so is each package ``__init__`` above the imported module, except the importer's own packages
(they were imported before it ran). Imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "gpu_training"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / "plugins" / PACKAGE

#: Cycles kept on purpose, each as its sorted modules -> why. Add none lightly.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}


def module_name(path: Path) -> str:
    """``plugins/gpu_training/a/b.py`` -> ``gpu_training.a.b``; a package's ``__init__.py`` -> the package."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (``ui_dist`` and migrations' folders included)."""
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module that can run, however deep, skipping ``if TYPE_CHECKING:`` bodies."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return found


def _with_packages(name: str, modules: dict[str, Path]) -> list[str]:
    """``name`` and each package above it that is a module of ours (importing ``a.b.c`` runs ``a`` and ``a.b``)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules]


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that module ``name`` imports."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    targets.update(_with_packages(alias.name, modules))
            continue
        if node.level:
            base_parts = name.split(".") if is_package else name.split(".")[:-1]
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base.split(".")[0] != PACKAGE:
            continue
        targets.update(_with_packages(base, modules))
        for alias in node.names:
            if f"{base}.{alias.name}" in modules:
                targets.add(f"{base}.{alias.name}")
    parts = name.split(".")
    own_packages = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return targets - own_packages


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []

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
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_path(graph, set(component)) for component in components]


def _cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, ``a -> b -> a``, for the failure message."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for succ in sorted(graph[node] & component):
                if succ == start:
                    return [*paths[node], start]
                if succ not in paths:
                    paths[succ] = [*paths[node], succ]
                    nxt.append(succ)
        frontier = nxt
    return sorted(component)


def test_the_package_has_no_import_cycle() -> None:
    found = cycles(import_graph())
    unexpected = [c for c in found if tuple(sorted(set(c))) not in KNOWN_CYCLES]
    assert not unexpected, "import cycles in plugins/gpu_training:\n" + "\n".join(" -> ".join(c) for c in unexpected)


def test_known_cycles_are_still_there() -> None:
    """An exception that no longer exists is removed from ``KNOWN_CYCLES``."""
    found = {tuple(sorted(set(c))) for c in cycles(import_graph())}
    assert not set(KNOWN_CYCLES) - found, f"no longer cycles, remove them: {sorted(set(KNOWN_CYCLES) - found)}"


def test_the_graph_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The graph reads imports in functions, relative ones and ``import a.b``, but not TYPE_CHECKING ones."""
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from gpu_training.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from .. import c\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nimport gpu_training.a\nif TYPE_CHECKING:\n    from gpu_training import d\n"
    )
    (pkg / "d.py").write_text("from gpu_training import c\n")
    modules = {module_name_in(tmp_path, p): p for p in sorted(pkg.rglob("*.py"))}
    graph = {name: imported_modules(name, path, modules) for name, path in modules.items()}
    assert graph["gpu_training.a"] == {"gpu_training.sub", "gpu_training.sub.b"}
    assert graph["gpu_training.sub.b"] == {"gpu_training.c"}
    assert graph["gpu_training.c"] == {"gpu_training.a"}
    assert cycles(graph) == [["gpu_training.a", "gpu_training.sub.b", "gpu_training.c", "gpu_training.a"]]


def module_name_in(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
