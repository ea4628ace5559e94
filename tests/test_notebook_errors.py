"""Error extraction from executed notebooks shaped like papermill and Azure ML leave them."""

from __future__ import annotations

import json

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from notebookops.notebook_errors import (
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
