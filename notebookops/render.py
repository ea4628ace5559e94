"""Executed notebook -> a self-contained HTML page people open instead of raw JSON.

nbconvert's HTML exporter with the lab template, minus every script it would load from a CDN
(require.js, MathJax, widgets, mermaid), plus a banner: state, execution time, the error line
linked to the failing cell, the slowest cells. papermill's injected parameter cell is marked
and each cell shows its duration. papermill's own red error-marker cells are left out: the
banner says the same and links to the same cell.

`describe_output` is what the monitor calls after fetching a notebook, for every backend:
it writes `<name>.html` beside `<name>.ipynb` and returns the per-cell timing for the summary.
Rendering is best effort: a notebook nbconvert cannot render still gets its verdict.
"""

from __future__ import annotations

import copy
import logging
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

from notebookops import cell_timing, redact
from notebookops.notebook_errors import _INSERTED_TAGS, extract_error, load_notebook_json

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates" / "nbconvert"
TEMPLATE_NAME = "notebookops"
_PAPERMILL_ERROR_TAG = "papermill-error-cell-tag"
_INJECTED_TAG = "injected-parameters"


def html_path_for(ipynb: Path) -> Path:
    """`a/b.ipynb` -> `a/b.html`: the rendering lives beside the notebook it shows."""
    return ipynb.with_suffix(".html")


def annotate(nb: dict[str, Any], path: str, state: str | None) -> dict[str, Any]:
    """A copy of the notebook with what the template shows: per-cell marks in
    `cell.metadata.notebookops` and the banner's facts in `metadata.notebookops`."""
    nb = copy.deepcopy(nb)
    error = extract_error(nb)
    timing = cell_timing.timing(nb)
    cells = []
    index = 0
    injected = False
    failing_cell = False
    for cell in nb.get("cells") or []:
        metadata = cell.setdefault("metadata", {})
        tags = metadata.get("tags") or []
        if _PAPERMILL_ERROR_TAG in tags:
            continue
        seconds = cell_timing._duration(metadata)
        mark: dict[str, Any] = {"seconds": seconds}
        if _INJECTED_TAG in tags:
            mark.update(injected=True, anchor="injected-parameters")
            injected = True
        elif not _INSERTED_TAGS.intersection(tags):
            mark["anchor"] = f"cell-{index}"
            if error is not None and error.cell_index == index:
                mark["failed"] = True
                failing_cell = True
            index += 1
        metadata["notebookops"] = mark
        cells.append(cell)
    nb["cells"] = cells
    nb.setdefault("metadata", {})["notebookops"] = {
        "path": path,
        "state": state or ("failed" if error else "succeeded"),
        "executionSeconds": timing["executionSeconds"],
        "slowestCells": timing["slowestCells"],
        "injected": injected,
        "failingCell": failing_cell,
        "error": error.to_dict() if error else None,
    }
    return nb


@lru_cache(maxsize=1)
def _exporter() -> Any:
    """One exporter per process: its template environment and inlined CSS are built once."""
    from nbconvert import HTMLExporter

    return HTMLExporter(
        template_name=TEMPLATE_NAME,
        extra_template_basedirs=[str(TEMPLATES)],
        embed_images=True,
    )


_lock = threading.Lock()
_warming: list[threading.Thread] = []


def prewarm() -> None:
    """Import nbconvert and build the exporter in the background, once per process, so the
    first finished notebook is not kept waiting for it (submit calls this; the notebooks
    run meanwhile)."""
    with _lock:
        if _warming:
            return
        thread = threading.Thread(target=_warm, name="render-prewarm", daemon=True)
        _warming.append(thread)
    thread.start()


def _warm() -> None:
    try:
        with _lock:
            _exporter()
    except Exception as exc:  # rendering stays best effort; the first render says why
        log.warning("nbconvert exporter not prepared: %s", exc)


def render_html(nb: dict[str, Any], path: str, state: str | None = None) -> str:
    """The HTML page of one executed notebook (a JSON dict as nbformat 4 stores it)."""
    import json

    import nbformat

    # reads() rejoins multi-line sources stored as lists, as nbconvert expects.
    node = nbformat.reads(json.dumps(annotate(nb, path, state)), as_version=4)
    with _lock:  # one exporter, and activities run on a thread pool
        body, _ = _exporter().from_notebook_node(node, resources={"metadata": {"name": path}})
    # The notebook's own text is shown as is, but a secret this process knows never is.
    return redact.redact_known(body)


def describe_output(ipynb: Path, path: str, state: str | None) -> dict[str, Any]:
    """Per-cell timing for the summary, and `outputHtml` when the rendering was written."""
    nb = load_notebook_json(ipynb)
    if nb is None:
        return {}
    described: dict[str, Any] = dict(cell_timing.timing(nb))
    target = html_path_for(ipynb)
    try:
        target.write_text(render_html(nb, path, state), encoding="utf-8")
    except Exception as exc:  # a notebook nbconvert cannot render keeps its verdict
        log.warning("%s: not rendered to HTML: %s", path, redact.redact_known(str(exc)))
        return described
    described["outputHtml"] = str(target)
    return described
