"""Find why an executed notebook failed, from the notebook itself.

Works on the JSON of any executed notebook (papermill output, a notebook downloaded from Azure ML),
so every backend reports errors the same way. Needs nothing beyond the standard library.

Cell indexes count all cells of the notebook as committed, 0-based, markdown and raw cells included.
Cells that papermill inserts (the `injected-parameters` cell and its red error markers) are not
counted, so the index points at the same cell in the repository's notebook.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from notebookops.compute.base import RunError

# CSI sequences (colours, cursor moves) and OSC sequences (hyperlinks, titles), as IPython emits.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")

_INSERTED_TAGS = frozenset({"injected-parameters", "papermill-error-cell-tag"})


def strip_ansi(text: str) -> str:
    """Remove terminal escape codes, which render as garbage in DevOps logs and JUnit XML."""
    return _ANSI.sub("", text)


def _source_cells(nb: Mapping[str, Any]) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """Yield (index in the committed notebook, cell), skipping cells papermill inserted."""
    index = 0
    for cell in nb.get("cells") or []:
        tags = (cell.get("metadata") or {}).get("tags") or []
        if _INSERTED_TAGS.intersection(tags):
            continue
        yield index, cell
        index += 1


def _traceback_text(lines: Any) -> str:
    if isinstance(lines, str):
        return strip_ansi(lines)
    return strip_ansi("\n".join(str(line) for line in lines or []))


def extract_error(nb: Mapping[str, Any]) -> RunError | None:
    """The first error of an executed notebook, or None when it ran clean.

    Follows papermill's own verdict: `SystemExit` with code 0 or no code is not an error, and a cell
    papermill marked as raising without an error output counts as a `CellExecutionError`.
    """
    for index, cell in _source_cells(nb):
        if cell.get("cell_type") != "code":
            continue
        clean_exit = False
        for output in cell.get("outputs") or []:
            if output.get("output_type") != "error":
                continue
            ename = str(output.get("ename", ""))
            evalue = str(output.get("evalue", ""))
            if ename == "SystemExit" and evalue in ("", "0"):
                clean_exit = True
                continue
            return RunError(
                cell_index=index,
                ename=strip_ansi(ename),
                evalue=strip_ansi(evalue),
                traceback=_traceback_text(output.get("traceback")),
            )
        papermill = (cell.get("metadata") or {}).get("papermill") or {}
        if not clean_exit and papermill.get("exception") is True:
            return RunError(cell_index=index, ename="CellExecutionError", evalue="", traceback="")
    return None


def source_cell_index(nb: Mapping[str, Any], executed_index: int | None) -> int | None:
    """Map an index into the executed notebook's cells (papermill's own numbering, which counts the
    cells it inserted) to the committed notebook's numbering; None if it names an inserted cell."""
    if executed_index is None:
        return None
    cells = nb.get("cells") or []
    if not 0 <= executed_index < len(cells):
        return None
    for index, cell in _source_cells({"cells": cells[: executed_index + 1]}):
        if cell is cells[executed_index]:
            return index
    return None


def load_notebook_json(path: Path) -> dict[str, Any] | None:
    """An executed notebook's JSON; None when missing or unreadable (e.g. cut short by a kill)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def error_from_file(path: Path) -> RunError | None:
    """`extract_error` for a notebook on disk; None when the file is missing or unreadable."""
    nb = load_notebook_json(path)
    return extract_error(nb) if nb is not None else None
