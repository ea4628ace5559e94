"""Find why an executed notebook failed, from the notebook itself.

Works on the JSON of any executed notebook (papermill output, a notebook downloaded from Azure ML),
so every backend reports errors the same way. Needs nothing beyond the standard library.

Cell indexes count all cells of the notebook as committed, 0-based, markdown and raw cells included.
Executors add and remove cells: papermill strips its red error-marker cells from the input (so a
notebook committed with them runs shorter), adds new ones on failure, and inserts or replaces an
`injected-parameters` cell. Given the committed notebook, each executed cell is mapped back to its
committed cell by cell id, falling back to position and source; without it, cells papermill
inserted are skipped and the rest counted.

Cell tags follow the Jupyter tools (nbclient, nbmake): an error in a cell tagged `raises-exception`
is expected and does not fail the notebook; a cell tagged `skip-execution` is not run, so whatever
outputs it carries say nothing about this run.
"""

from __future__ import annotations

import difflib
import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from notebookops.compute.base import RunError

# CSI sequences (colours, cursor moves) and OSC sequences (hyperlinks, titles), as IPython emits.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")

ERROR_MARKER_TAG = "papermill-error-cell-tag"
INJECTED_TAG = "injected-parameters"
ALLOW_ERRORS_TAG = "raises-exception"
SKIP_TAG = "skip-execution"
_INSERTED_TAGS = frozenset({INJECTED_TAG, ERROR_MARKER_TAG})


def strip_ansi(text: str) -> str:
    """Remove terminal escape codes, which render as garbage in DevOps logs and JUnit XML."""
    return _ANSI.sub("", text)


def _tags(cell: Mapping[str, Any]) -> list[Any]:
    tags = (cell.get("metadata") or {}).get("tags")
    return tags if isinstance(tags, list) else []


def _source(cell: Mapping[str, Any]) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else str(source)


def _cells(nb: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    cells = (nb or {}).get("cells")
    return [c for c in cells if isinstance(c, Mapping)] if isinstance(cells, list) else []


def committed_indexes(
    executed: Mapping[str, Any], committed: Mapping[str, Any] | None = None
) -> list[int | None]:
    """For each cell of `executed`, the index of the same cell in `committed`, or None for a cell
    the executor inserted.

    Cells are matched by id first (ids survive execution when the committed notebook has them),
    then the rest are aligned by cell type and source, and cells left over between two matches
    are paired by position (an executor may rewrite a cell it owns, such as the parameters an
    earlier papermill run left in an `injected-parameters` cell). Without `committed`, cells that
    papermill inserts are skipped and the others counted in order.
    """
    cells = _cells(executed)
    if committed is None:
        out: list[int | None] = []
        index = 0
        for cell in cells:
            if _INSERTED_TAGS.intersection(_tags(cell)):
                out.append(None)
            else:
                out.append(index)
                index += 1
        return out

    originals = _cells(committed)
    mapping: list[int | None] = [None] * len(cells)
    ids: dict[str, int] = {}
    for index, cell in enumerate(originals):
        cell_id = cell.get("id")
        if isinstance(cell_id, str) and cell_id:
            ids[cell_id] = -1 if cell_id in ids else index  # -1: not unique, never matched by id
    used: set[int] = set()
    for i, cell in enumerate(cells):
        index = ids.get(cell.get("id"), -1) if isinstance(cell.get("id"), str) else -1
        if index >= 0 and index not in used and not _marker(cell):
            mapping[i] = index
            used.add(index)

    # Papermill strips committed error markers before running and adds its own: never a match.
    left = [i for i, c in enumerate(cells) if mapping[i] is None and not _marker(c)]
    right = [j for j, c in enumerate(originals) if j not in used and not _marker(c)]
    # Matching only between anchors keeps the mapping in order around id matches.
    for lo, hi in _segments(mapping, len(originals)):
        seg_left = [i for i in left if lo[0] < i < hi[0]]
        seg_right = [j for j in right if lo[1] < j < hi[1]]
        _align(cells, originals, seg_left, seg_right, mapping)
    return mapping


def _marker(cell: Mapping[str, Any]) -> bool:
    return ERROR_MARKER_TAG in _tags(cell)


def _segments(
    mapping: list[int | None], n_committed: int
) -> Iterator[tuple[tuple[int, int], tuple[int, int]]]:
    """Stretches between consecutive id matches, as ((executed, committed) lower, upper) bounds."""
    anchors = [(-1, -1)]
    for i, j in enumerate(mapping):
        if j is not None and j > anchors[-1][1]:
            anchors.append((i, j))
    anchors.append((len(mapping), n_committed))
    return itertools.pairwise(anchors)


def _align(
    cells: Sequence[Mapping[str, Any]],
    originals: Sequence[Mapping[str, Any]],
    left: list[int],
    right: list[int],
    mapping: list[int | None],
) -> None:
    def key(cell: Mapping[str, Any]) -> tuple[str, str, bool]:
        return (str(cell.get("cell_type")), _source(cell), INJECTED_TAG in _tags(cell))

    matcher = difflib.SequenceMatcher(
        None, [key(cells[i]) for i in left], [key(originals[j]) for j in right], autojunk=False
    )
    for op, a0, a1, b0, b1 in matcher.get_opcodes():
        if op == "equal":
            for k in range(a1 - a0):
                mapping[left[a0 + k]] = right[b0 + k]
        elif op == "replace":
            # Same place, other text: pair by position only cells of the same kind, and never
            # a freshly injected cell with a cell the user wrote.
            for k in range(min(a1 - a0, b1 - b0)):
                mine, theirs = cells[left[a0 + k]], originals[right[b0 + k]]
                if key(mine)[0] == key(theirs)[0] and key(mine)[2] == key(theirs)[2]:
                    mapping[left[a0 + k]] = right[b0 + k]


def _traceback_text(lines: Any) -> str:
    if isinstance(lines, str):
        return strip_ansi(lines)
    return strip_ansi("\n".join(str(line) for line in lines or []))


def first_error(
    nb: Mapping[str, Any], committed: Mapping[str, Any] | None = None
) -> tuple[int, RunError] | None:
    """(index in the executed notebook, error) of the first error that fails the notebook."""
    indexes = committed_indexes(nb, committed)
    for position, cell in enumerate(_cells(nb)):
        if cell.get("cell_type") != "code" or _marker(cell):
            continue
        tags = _tags(cell)
        if ALLOW_ERRORS_TAG in tags or SKIP_TAG in tags:
            continue
        index = indexes[position]
        clean_exit = False
        for output in cell.get("outputs") or []:
            if not isinstance(output, Mapping) or output.get("output_type") != "error":
                continue
            ename = str(output.get("ename", ""))
            evalue = str(output.get("evalue", ""))
            if ename == "SystemExit" and evalue in ("", "0"):
                clean_exit = True
                continue
            return position, RunError(
                cell_index=index,
                ename=strip_ansi(ename),
                evalue=strip_ansi(evalue),
                traceback=_traceback_text(output.get("traceback")),
            )
        papermill = (cell.get("metadata") or {}).get("papermill") or {}
        if not clean_exit and isinstance(papermill, Mapping) and papermill.get("exception") is True:
            return position, RunError(
                cell_index=index, ename="CellExecutionError", evalue="", traceback=""
            )
    return None


def extract_error(
    nb: Mapping[str, Any], committed: Mapping[str, Any] | None = None
) -> RunError | None:
    """The first error of an executed notebook that fails it, or None when it ran clean.

    Follows papermill's own verdict (`SystemExit` with code 0 or no code is not an error, and a
    cell papermill marked as raising without an error output counts as a `CellExecutionError`),
    except that errors in cells tagged `raises-exception` are allowed, as nbclient and nbmake
    allow them, and cells tagged `skip-execution` are not looked at.
    """
    found = first_error(nb, committed)
    return found[1] if found is not None else None


def source_cell_index(
    nb: Mapping[str, Any], executed_index: int | None, committed: Mapping[str, Any] | None = None
) -> int | None:
    """Map an index into the executed notebook's cells (papermill's own numbering, which counts the
    cells it inserted) to the committed notebook's numbering; None if it names an inserted cell."""
    if executed_index is None:
        return None
    indexes = committed_indexes(nb, committed)
    if not 0 <= executed_index < len(indexes):
        return None
    return indexes[executed_index]


def running_cell_index(
    nb: Mapping[str, Any], committed: Mapping[str, Any] | None = None
) -> int | None:
    """The committed index of the cell a stopped run was executing: the last cell papermill
    started (it records `metadata.papermill.start_time`; a cell cut short by a kill is marked
    completed like any other, so the status alone cannot tell). None before the first cell.
    With `committed`, counted against it (committed papermill markers do not shift it)."""
    cells = nb.get("cells") or []
    for executed in range(len(cells) - 1, -1, -1):
        papermill = (cells[executed].get("metadata") or {}).get("papermill") or {}
        if papermill.get("start_time"):
            return source_cell_index(nb, executed, committed)
    return None


def load_notebook_json(path: Path) -> dict[str, Any] | None:
    """An executed notebook's JSON; None when missing or unreadable (e.g. cut short by a kill)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def error_from_file(path: Path, committed: Mapping[str, Any] | None = None) -> RunError | None:
    """`extract_error` for a notebook on disk; None when the file is missing or unreadable."""
    nb = load_notebook_json(path)
    return extract_error(nb, committed) if nb is not None else None
