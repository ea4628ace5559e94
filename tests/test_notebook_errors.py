"""Error extraction from executed notebooks shaped like papermill and Azure ML leave them."""

from __future__ import annotations

import copy
import json

import nbformat
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from notebookops.notebook_errors import (
    committed_indexes,
    error_from_file,
    extract_error,
    source_cell_index,
    strip_ansi,
)

RED_TRACEBACK = [
    "\x1b[0;31m---------------------------------------------------------------------------\x1b[0m",
    "\x1b[0;31mKeyError\x1b[0m                                  Traceback (most recent call last)",
    "Cell \x1b[0;32mIn[3], line 1\x1b[0m\n"
    "\x1b[0;32m----> 1\x1b[0m \x1b[43mrow\x1b[49m[\x1b[33m'id'\x1b[39m]",
    "\x1b[0;31mKeyError\x1b[0m: 'id'",
]


def _tagged(cell, tag):
    cell.metadata["tags"] = [tag]
    return cell


def _executed_notebook(error_cell_outputs):
    """Committed cells: 0 md, 1 parameters, 2 ok, 3 failing, 4 not run; plus papermill's."""
    return new_notebook(
        cells=[
            _tagged(new_markdown_cell("An exception was encountered"), "papermill-error-cell-tag"),
            new_markdown_cell("# Title"),
            _tagged(new_code_cell("rows = []"), "parameters"),
            _tagged(new_code_cell("rows = [{}]"), "injected-parameters"),
            new_code_cell("row = rows[0]", outputs=[new_output("stream", text="fine\n")]),
            _tagged(new_markdown_cell("stopped here"), "papermill-error-cell-tag"),
            new_code_cell("row['id']", outputs=error_cell_outputs),
            new_code_cell("print('never')"),
        ]
    )


def test_failing_cell_is_numbered_as_in_the_committed_notebook_with_ansi_stripped():
    nb = _executed_notebook(
        [new_output("error", ename="KeyError", evalue="'id'", traceback=RED_TRACEBACK)]
    )
    error = extract_error(nb)
    assert error is not None
    assert error.to_dict()["cellIndex"] == 3
    assert (error.ename, error.evalue) == ("KeyError", "'id'")
    assert "\x1b" not in error.traceback
    assert "----> 1 row['id']" in error.traceback
    assert error.traceback.endswith("KeyError: 'id'")


def test_the_first_error_wins_and_clean_notebooks_have_none():
    nb = _executed_notebook([new_output("error", ename="ValueError", evalue="bad", traceback=[])])
    nb.cells[-1].outputs = [new_output("error", ename="TypeError", evalue="later", traceback=[])]
    assert extract_error(nb).ename == "ValueError"
    assert extract_error(_executed_notebook([])) is None


def test_sys_exit_zero_is_success_but_a_nonzero_exit_is_an_error():
    clean = _executed_notebook(
        [new_output("error", ename="SystemExit", evalue="0", traceback=["SystemExit: 0"])]
    )
    assert extract_error(clean) is None
    failing = _executed_notebook(
        [new_output("error", ename="SystemExit", evalue="3", traceback=["SystemExit: 3"])]
    )
    assert (extract_error(failing).cell_index, extract_error(failing).evalue) == (3, "3")


def test_cell_papermill_marked_as_raising_without_output_counts_as_failure():
    nb = _executed_notebook([])
    nb.cells[6].metadata["papermill"] = {"exception": True, "status": "failed"}
    error = extract_error(nb)
    assert (error.cell_index, error.ename) == (3, "CellExecutionError")


def test_notebook_on_disk_and_unreadable_files(tmp_path):
    path = tmp_path / "out.ipynb"
    nbformat.write(
        _executed_notebook([new_output("error", ename="OSError", evalue="x", traceback=[])]), path
    )
    assert error_from_file(path).ename == "OSError"
    (tmp_path / "cut.ipynb").write_text('{"cells": [', encoding="utf-8")  # killed mid-write
    assert error_from_file(tmp_path / "cut.ipynb") is None
    assert error_from_file(tmp_path / "missing.ipynb") is None
    # Plain JSON (as downloaded from Azure ML) works as well as NotebookNode.
    assert extract_error(json.loads(path.read_text(encoding="utf-8"))).cell_index == 3


def test_executed_index_maps_to_committed_index():
    nb = _executed_notebook([])
    assert source_cell_index(nb, 6) == 3  # papermill's index of the failing cell
    assert source_cell_index(nb, 3) is None  # the injected-parameters cell is not the user's
    assert source_cell_index(nb, 99) is None
    assert source_cell_index(nb, None) is None


def test_strip_ansi_removes_colours_and_hyperlinks_only():
    text = "\x1b[1;31mError\x1b[0m see \x1b]8;;file:///x.py\x1b\\x.py\x1b]8;;\x1b\\ [ok]"
    assert strip_ansi(text) == "Error see x.py [ok]"


# -- mapping executed cells back to the committed notebook -----------------------------------


def _with_ids(nb):
    for number, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{number}"
    return nb


def _marker(text="An Exception was encountered"):
    return _tagged(new_markdown_cell(text), "papermill-error-cell-tag")


def _committed_with_old_markers():
    """A notebook saved from an earlier failed papermill run: its markers were committed."""
    return _with_ids(
        new_notebook(
            cells=[
                _marker(),
                new_markdown_cell("# Title"),
                _tagged(new_code_cell("n = 1"), "parameters"),
                _marker("stopped here"),
                new_code_cell("1 / (n - 1)"),
                new_code_cell("print('after')"),
            ]
        )
    )


def _as_papermill_ran(committed, parameters_source, fail_at, *, keep_ids=True):
    """What papermill writes: old markers stripped, a parameters cell injected after the
    `parameters` cell, the failing cell's error, and two fresh markers. Without `keep_ids`
    every cell has a new id, as when papermill upgrades an nbformat 4.4 notebook."""
    tags = "papermill-error-cell-tag"
    cells = [copy.deepcopy(c) for c in committed.cells if tags not in c.metadata.get("tags", [])]
    for number, cell in enumerate(cells):
        if not keep_ids:
            cell["id"] = f"random-{number}"
    at = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    cells.insert(at + 1, _tagged(new_code_cell(parameters_source), "injected-parameters"))
    failing = next(i for i, c in enumerate(cells) if c.source == fail_at)
    cells[failing].outputs = [
        new_output("error", ename="ZeroDivisionError", evalue="division by zero")
    ]
    cells.insert(failing, _marker("stopped here"))
    cells.insert(0, _marker())
    return new_notebook(cells=cells)


@pytest.mark.parametrize("keep_ids", [True, False], ids=["by-id", "by-source"])
def test_committed_error_markers_and_injected_cells_do_not_shift_the_index(keep_ids):
    committed = _committed_with_old_markers()
    executed = _as_papermill_ran(committed, "n = 1", "1 / (n - 1)", keep_ids=keep_ids)
    error = extract_error(executed, committed)
    # Committed cells: 0 marker, 1 title, 2 parameters, 3 marker, 4 the failing cell.
    assert (error.cell_index, error.ename) == (4, "ZeroDivisionError")
    # Without the committed notebook only papermill's own cells are discounted: 2 too low.
    assert extract_error(executed).cell_index == 2
    indexes = committed_indexes(executed, committed)
    assert [
        indexes[i]
        for i, c in enumerate(executed.cells)
        if "injected-parameters" in c.metadata.get("tags", [])
    ] == [None]


def test_a_committed_injected_cell_is_the_one_papermill_replaced():
    committed = _with_ids(
        new_notebook(
            cells=[
                _tagged(new_code_cell("n = 1"), "parameters"),
                _tagged(new_code_cell("n = 5  # from an old run"), "injected-parameters"),
                new_code_cell("assert n == 1"),
            ]
        )
    )
    executed = new_notebook(
        cells=[
            committed.cells[0],
            _tagged(new_code_cell("n = 2"), "injected-parameters"),  # new id, new text
            new_code_cell(
                "assert n == 1",
                outputs=[new_output("error", ename="AssertionError", evalue="")],
            ),
        ]
    )
    executed.cells[2]["id"] = "elsewhere"
    assert committed_indexes(executed, committed) == [0, 1, 2]
    assert extract_error(executed, committed).cell_index == 2


def test_duplicate_sources_are_matched_in_order():
    committed = _with_ids(new_notebook(cells=[new_code_cell("x += 1") for _ in range(4)]))
    executed = new_notebook(cells=[_marker(), *[new_code_cell("x += 1") for _ in range(4)]])
    assert committed_indexes(executed, committed) == [None, 0, 1, 2, 3]


# -- tags --------------------------------------------------------------------------------------


def test_raises_exception_cells_are_allowed_and_a_later_real_error_is_reported():
    expected = _tagged(
        new_code_cell("1/0", outputs=[new_output("error", ename="ZeroDivisionError", evalue="")]),
        "raises-exception",
    )
    real = new_code_cell("x", outputs=[new_output("error", ename="NameError", evalue="x")])
    nb = new_notebook(cells=[new_markdown_cell("t"), expected, new_code_cell("ok"), real])
    error = extract_error(nb)
    assert (error.cell_index, error.ename) == (3, "NameError")
    assert extract_error(new_notebook(cells=nb.cells[:3])) is None


def test_skip_execution_cells_are_not_judged_by_the_outputs_they_carry():
    stale = _tagged(
        new_code_cell("boom()", outputs=[new_output("error", ename="OSError", evalue="old")]),
        "skip-execution",
    )
    assert extract_error(new_notebook(cells=[stale, new_code_cell("1")])) is None


# -- the mapping survives whatever papermill does to any notebook -----------------------------


_SOURCES = st.sampled_from(["x = 1", "x = 1", "print(x)", "# note", "", "y"])
_CELL = st.tuples(st.sampled_from(["code", "markdown", "marker"]), _SOURCES)


@given(
    cells=st.lists(_CELL, max_size=12),
    parameters_at=st.none() | st.integers(0, 12),
    committed_injected_at=st.none() | st.integers(0, 12),
    inject=st.booleans(),
    new_ids=st.booleans(),
    marker_at=st.none() | st.integers(0, 14),
)
def test_every_committed_cell_is_found_again_after_papermill(
    cells, parameters_at, committed_injected_at, inject, new_ids, marker_at
):
    committed = []
    for kind, source in cells:
        if kind == "marker":
            committed.append(_marker(source))
        elif kind == "code":
            committed.append(new_code_cell(source))
        else:
            committed.append(new_markdown_cell(source))
    if parameters_at is not None:
        committed.insert(
            min(parameters_at, len(committed)), _tagged(new_code_cell("n = 1"), "parameters")
        )
    if committed_injected_at is not None:
        old = _tagged(new_code_cell("n = 5  # an old run's"), "injected-parameters")
        committed.insert(min(committed_injected_at, len(committed)), old)
    for number, cell in enumerate(committed):
        cell["id"] = f"c{number}"
    committed_nb = new_notebook(cells=committed)

    # papermill: strip the markers, inject (replacing an old injected cell in place, else after
    # the parameters cell, else at the top), maybe new ids (4.4 upgrade), add fresh markers.
    executed = [(i, copy.deepcopy(c)) for i, c in enumerate(committed) if not _is_marker(c)]
    if inject:
        fresh = (None, _tagged(new_code_cell("n = 2"), "injected-parameters"))
        tags = [c.metadata.get("tags", []) for _, c in executed]
        old_at = next((k for k, t in enumerate(tags) if "injected-parameters" in t), None)
        param_at = next((k for k, t in enumerate(tags) if "parameters" in t), None)
        if old_at is not None:
            executed[old_at] = (executed[old_at][0], fresh[1])  # papermill's replacement
        elif param_at is not None:
            executed.insert(param_at + 1, fresh)
        else:
            executed.insert(0, fresh)
    for number, (_, cell) in enumerate(executed):
        if new_ids or "injected-parameters" in cell.metadata.get("tags", []):
            cell["id"] = f"new{number}"
    if marker_at is not None:
        executed.insert(min(marker_at, len(executed)), (None, _marker("stopped here")))
        executed.insert(0, (None, _marker("An Exception was encountered")))
    executed_nb = new_notebook(cells=[c for _, c in executed])

    assert committed_indexes(executed_nb, committed_nb) == [origin for origin, _ in executed]


def _is_marker(cell):
    return "papermill-error-cell-tag" in cell.metadata.get("tags", [])


def test_the_monitor_numbers_a_remote_backends_failing_cell_against_the_commit(
    tmp_path, monkeypatch
):
    """A backend that sees only the executed notebook (Azure ML's status reads the download)
    counts 2 too low when the committed notebook holds papermill's old markers; the monitor
    activity renumbers the failing cell against the checkout. The backend here is an
    in-process stand-in for the remote service; the monitor, its fetch and its numbering are
    the app's own."""
    from notebookops import activities
    from notebookops.compute import registry
    from notebookops.compute.base import RunHandle, RunStatus

    committed = _committed_with_old_markers()
    executed = _as_papermill_ran(committed, "n = 1", "1 / (n - 1)")
    checkout = tmp_path / "checkout"
    (checkout / "nb").mkdir(parents=True)
    nbformat.write(committed, checkout / "nb" / "a.ipynb")

    class RemoteLike:
        name = "remote"

        def status(self, handle):
            return RunStatus(state="failed", raw_status="Failed", error=extract_error(executed))

        def fetch_output(self, handle, dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(executed, dest)
            return dest

    monkeypatch.setitem(registry._factories, "remote", RemoteLike)
    monkeypatch.setenv("NOTEBOOKOPS_OUTPUT_DIR", str(tmp_path / "outputs"))
    handle = RunHandle(backend="remote", run_id="job-1", portal_url=None, data={})
    run = {"path": "nb/a.ipynb", "handle": handle.to_dict()}
    answer = activities.monitor({"instanceId": "i-1", "runs": [run], "checkout": str(checkout)})
    [result] = answer["runs"]
    assert result["state"] == "failed"
    assert (result["error"]["cellIndex"], result["error"]["ename"]) == (4, "ZeroDivisionError")
    # Without a checkout (an older orchestration's input) the backend's own count stands.
    answer = activities.monitor({"instanceId": "i-2", "runs": [run]})
    assert answer["runs"][0]["error"]["cellIndex"] == 2


def test_the_running_cell_of_a_stopped_run_is_counted_against_the_commit():
    """A run stopped from outside (a deadline) names the cell papermill started last; committed
    papermill markers must not shift it."""
    from notebookops.notebook_errors import running_cell_index

    committed = _committed_with_old_markers()
    executed = _as_papermill_ran(committed, "n = 1", "1 / (n - 1)")
    started = False
    for cell in executed.cells:
        cell.metadata["papermill"] = {}
    for cell in executed.cells:
        if cell.source == "1 / (n - 1)":
            started = True
            cell.metadata["papermill"]["start_time"] = "2026-01-01T00:00:01Z"
            break
        cell.metadata["papermill"]["start_time"] = "2026-01-01T00:00:00Z"
    assert started
    # Committed cells: 0 marker, 1 title, 2 parameters, 3 marker, 4 the running cell.
    assert running_cell_index(executed, committed) == 4
    assert running_cell_index(executed) == 2  # counted without the commit: 2 too low
