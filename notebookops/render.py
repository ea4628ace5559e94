"""Executed notebook -> a self-contained HTML page people open instead of raw JSON.

The page itself is notebookops.render_page's (nbconvert's lab template with a banner: state,
execution time, the failing cell, the slowest cells). Here it is masked of every secret this
process knows, and written beside the notebook.

`describe_output` is what the monitor calls after fetching a notebook, for every backend:
it writes `<name>.html` beside `<name>.ipynb` and returns the per-cell timing for the summary.
Rendering is best effort: a notebook nbconvert cannot render still gets its verdict.

`prewarm` (called by submit) starts a render worker process (notebookops.render_worker) that
pays nbconvert's start-up on another core while the notebooks run; pages are then rendered
there. Without it, or once it is gone, pages are rendered in this process, the same pages.
`notebookops run` chooses the moment itself (`hold_prewarm`): the worker's second of CPU must
not compete with the clone, the submits and the first kernels.
"""

from __future__ import annotations

import atexit
import logging
import threading
from pathlib import Path
from typing import Any

from notebookops import cell_timing, redact, render_page
from notebookops.notebook_errors import load_notebook_json

log = logging.getLogger(__name__)

_lock = threading.Lock()  # one page at a time: one exporter, or one worker's pipe
_worker: list[Any] = []  # the render worker, once prewarm started one
_held: list[bool] = []  # hold_prewarm was called: prewarm() starts nothing, prewarm(now=True) does


def html_path_for(ipynb: Path) -> Path:
    """`a/b.ipynb` -> `a/b.html`: the rendering lives beside the notebook it shows."""
    return ipynb.with_suffix(".html")


def hold_prewarm() -> None:
    """From now on only `prewarm(now=True)` starts the worker: the caller knows better than
    submit when the CPUs are free for it."""
    _held.append(True)


def prewarm(*, now: bool = False) -> None:
    """Start the render worker, once per process; returns at once (the worker warms up on its
    own, and the first page waits for it only if it is not ready by then)."""
    if _held and not now:
        return
    from notebookops.render_worker import Worker

    with _lock:
        if _worker:
            return
        try:
            worker = Worker()
        except OSError as exc:  # pages are then rendered here, as without prewarm
            log.warning("render worker not started: %s", exc)
            return
        _worker.append(worker)
    atexit.register(worker.close, wait=False)


def render_html(nb: dict[str, Any], path: str, state: str | None = None) -> str:
    """The HTML page of one executed notebook (a JSON dict as nbformat 4 stores it)."""
    from notebookops.render_worker import WorkerGone

    with _lock:  # activities run on a thread pool
        worker = _worker[0] if _worker else None
        body = None
        if worker is not None:
            try:
                body = worker.render(nb, path, state)
            except WorkerGone as exc:
                log.warning("render worker ended (%s); pages are rendered in this process", exc)
                _worker[0] = None
        if body is None:
            body = render_page.page(nb, path, state)
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
