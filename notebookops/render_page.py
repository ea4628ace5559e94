"""One executed notebook -> its HTML page, in this process (the work behind notebookops.render).

nbconvert's HTML exporter with the lab template, minus every script it would load from a CDN
(require.js, MathJax, widgets, mermaid), plus a banner: state, execution time, the error line
linked to the failing cell, the slowest cells. papermill's injected parameter cell is marked
and each cell shows its duration. papermill's own red error-marker cells are left out: the
banner says the same and links to the same cell.

The first page a process renders pays for compiling nbconvert's Jinja templates (about a
quarter of a second); the compiled templates are kept on disk (`template_cache`) so the next
process loads them instead. Secrets are not masked here: notebookops.render does that.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import stat
import sys
import tempfile
from functools import lru_cache
from hashlib import sha256
from pathlib import Path
from types import CodeType
from typing import Any

from notebookops import cell_timing
from notebookops.notebook_errors import _INSERTED_TAGS, extract_error

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates" / "nbconvert"
TEMPLATE_NAME = "notebookops"
CACHE_DIR_SETTING = "NOTEBOOKOPS_RENDER_CACHE_DIR"
# Part of every cache key: bump it when the exporter's Jinja settings change here.
_CACHE_FORMAT = "1"
_PAPERMILL_ERROR_TAG = "papermill-error-cell-tag"
_INJECTED_TAG = "injected-parameters"


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


def page(nb: dict[str, Any], path: str, state: str | None = None) -> str:
    """The page of one executed notebook (a JSON dict as nbformat 4 stores it), unredacted.
    One exporter serves the process: callers on several threads take turns (render._lock)."""
    import json

    import nbformat

    # reads() rejoins multi-line sources stored as lists, as nbconvert expects.
    node = nbformat.reads(json.dumps(annotate(nb, path, state)), as_version=4)
    body, _ = exporter().from_notebook_node(node, resources={"metadata": {"name": path}})
    return body


@lru_cache(maxsize=1)
def exporter() -> Any:
    """One exporter per process: its template environment and inlined CSS are built once."""
    from nbconvert import HTMLExporter

    html = HTMLExporter(
        template_name=TEMPLATE_NAME,
        extra_template_basedirs=[str(TEMPLATES)],
        embed_images=True,
    )
    cache = template_cache()
    if cache is not None:
        html.environment.bytecode_cache = cache
    return html


def template_cache() -> Any:
    """Jinja's on-disk cache of compiled templates, in a folder only this user can write
    (`NOTEBOOKOPS_RENDER_CACHE_DIR`, default `<tmp>/notebookops-render-cache-<uid>`), or None
    when that folder cannot be had: pages then render as well, only the first one slower."""
    from jinja2 import FileSystemBytecodeCache
    from jinja2.bccache import Bucket

    folder = _cache_folder()
    if folder is None:
        return None
    import jinja2
    import nbconvert

    # Compiled code depends on Jinja (the runtime it calls), nbconvert (the environment it
    # builds) and the interpreter (marshal and bytecode format); jinja checks the source.
    salt = "\0".join(
        (
            _CACHE_FORMAT,
            jinja2.__version__,
            nbconvert.__version__,
            sys.implementation.cache_tag or "",
            importlib.util.MAGIC_NUMBER.hex(),
        )
    )

    class TemplateCache(FileSystemBytecodeCache):
        """Written by rename, so concurrent processes never read half an entry (jinja); an
        entry that cannot be read (truncated, corrupt, foreign) is compiled again and
        rewritten, and a cache that cannot be written only costs the compile."""

        def get_cache_key(self, name: str, filename: str | None = None) -> str:
            return sha256(f"{salt}\0{name}\0{filename}".encode()).hexdigest()

        def load_bytecode(self, bucket: Bucket) -> None:
            try:
                super().load_bytecode(bucket)
            except Exception:  # unpickling a damaged header raises anything
                bucket.reset()
            if bucket.code is not None and not isinstance(bucket.code, CodeType):
                bucket.reset()

        def dump_bytecode(self, bucket: Bucket) -> None:
            try:
                super().dump_bytecode(bucket)
            except OSError as exc:
                log.debug("compiled template not cached in %s: %s", self.directory, exc)

    return TemplateCache(str(folder), "%s.jinja")


def _cache_folder() -> Path | None:
    """The cache folder, created if needed; None unless it is a real folder owned by this user
    that nobody else can write to (its files are executed as code)."""
    configured = os.environ.get(CACHE_DIR_SETTING, "").strip()
    default = f"notebookops-render-cache-{os.getuid()}"
    folder = Path(configured) if configured else Path(tempfile.gettempdir()) / default
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.lstat()
    except OSError as exc:
        log.debug("no template cache at %s: %s", folder, exc)
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        log.warning(
            "template cache %s not used: it must be a folder owned by this user that no one "
            "else can write to",
            folder,
        )
        return None
    return folder
