"""Which parameters a notebook declares: the names its ``parameters``-tagged cell assigns.

papermill injects any name it is given and only logs "Passed unknown parameter", so a
misspelt parameter would run the notebook with its default silently. This reads the cell
papermill would use (the first code cell tagged ``parameters``) without executing anything.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import nbformat

__all__ = ["declared_parameters", "unknown_parameters"]


def declared_parameters(notebook_file: str | Path) -> set[str] | None:
    """Names assigned at the top level of the parameters cell; None when there is no such
    cell (papermill then injects at the top, and no name is known to the notebook)."""
    nb = nbformat.read(str(notebook_file), as_version=4)
    for cell in nb.cells:
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get(
            "tags", []
        ):
            return _assigned_names(cell.get("source", ""))
    return None


def _assigned_names(source: str) -> set[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:
        # IPython magics or a syntax error: fall back to `name = ...` lines.
        return {
            line.split("=", 1)[0].strip()
            for line in source.splitlines()
            if "=" in line and line.split("=", 1)[0].strip().isidentifier()
        }
    names: set[str] = set()
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        for target in targets:
            for leaf in ast.walk(target):
                if isinstance(leaf, ast.Name):
                    names.add(leaf.id)
    return names


def unknown_parameters(notebook_file: str | Path, names: Iterable[str]) -> list[str]:
    """The given names the notebook does not declare, sorted; every name when it declares
    none (no parameters cell)."""
    declared = declared_parameters(notebook_file) or set()
    return sorted(set(names) - declared)
