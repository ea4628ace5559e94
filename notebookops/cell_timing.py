"""Per-cell execution times from an executed notebook (papermill records them in metadata).

papermill writes `metadata.papermill.duration` (seconds) on every cell it ran and on the
notebook itself (execution only: the kernel start comes before papermill's clock starts).
Cell indexes count the cells of the committed notebook, as `cellIndex` in errors does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from notebookops.notebook_errors import _INSERTED_TAGS as INSERTED_TAGS

SLOWEST_CELLS = 5


def _duration(metadata: Any) -> float | None:
    papermill = (metadata or {}).get("papermill") if isinstance(metadata, Mapping) else None
    value = papermill.get("duration") if isinstance(papermill, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def cell_durations(nb: Mapping[str, Any]) -> list[tuple[int, float]]:
    """(committed cell index, seconds) for every cell papermill timed, in notebook order."""
    timed = []
    index = 0
    cells = nb.get("cells")
    for cell in cells if isinstance(cells, list) else []:
        metadata = cell.get("metadata") if isinstance(cell, Mapping) else None
        if not isinstance(metadata, Mapping):
            metadata = {}
        if INSERTED_TAGS.intersection(metadata.get("tags") or []):
            continue
        seconds = _duration(metadata)
        if seconds is not None:
            timed.append((index, seconds))
        index += 1
    return timed


def timing(nb: Mapping[str, Any], slowest: int = SLOWEST_CELLS) -> dict[str, Any]:
    """`executionSeconds` (papermill's notebook duration, else the sum of its cells') and the
    `slowestCells` ({cellIndex, seconds}, slowest first); both empty for an untimed notebook."""
    durations = cell_durations(nb)
    total = _duration(nb.get("metadata"))
    if total is None and durations:
        total = sum(seconds for _, seconds in durations)
    ranked = sorted(durations, key=lambda item: (-item[1], item[0]))[:slowest]
    return {
        "executionSeconds": None if total is None else round(total, 3),
        "slowestCells": [{"cellIndex": i, "seconds": round(s, 3)} for i, s in ranked],
    }
