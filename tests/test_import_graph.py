"""No import cycles among the modules of our packages (notebookops, devhost).

A cycle hides inside a function-level import just as well as at the top of a file (it only
shows up as a half-initialised module on the day the import order changes), so every import
statement counts: top level, inside functions, and under ``if TYPE_CHECKING``. Importing a
module also runs its package's ``__init__``; that implied edge is not counted, since a package
``__init__`` that imports nothing (notebookops.devops) is how cycles are avoided.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def module_names(root: Path, package: str) -> dict[str, Path]:
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports, from the source (nothing runs)."""
    modules = module_names(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    # `from notebookops.devops import delivery` imports the submodule; a name
                    # that is not a submodule comes from the package's (or module's) own code.
                    submodule = f"{source}.{alias.name}"
                    targets.add(submodule if submodule in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


@pytest.mark.parametrize("package", ["notebookops", "devhost"])
def test_no_import_cycle(package: str) -> None:
    graph = import_graph(ROOT, package)
    assert len(graph) > 5 and any(graph.values())  # the walk found the modules and their imports
    found = cycles(graph)
    assert not found, "modules that import each other: " + "; ".join(
        " <-> ".join(c)
        + " ("
        + ", ".join(f"{m} imports {sorted(graph[m] & set(c))}" for m in c)
        + ")"
        for c in found
    )
    # graphlib agrees: the graph has an import order.
    list(graphlib.TopologicalSorter(graph).static_order())


def test_the_check_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (package / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n"
    )
    (package / "d.py").write_text("from . import a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"}
    assert graph["pkg.d"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]


def test_the_devops_package_is_split_by_job_without_importing_upwards() -> None:
    """The orchestrator imports notebookops.devops.delivery at function_app import time: the
    package and the delivery rule import nothing of the HTTP client."""
    graph = import_graph(ROOT, "notebookops")
    assert graph["notebookops.devops"] == set()
    assert graph["notebookops.devops.delivery"] == set()
    assert "notebookops.devops.client" not in set().union(
        *(graph[m] for m in graph if m.startswith("notebookops.devops."))
    )
