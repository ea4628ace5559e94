"""Which parameters a notebook declares, read from its parameters-tagged cell."""

from __future__ import annotations

import nbformat
from nbformat import v4

from notebookops.parameters import declared_parameters, unknown_parameters


def _write(tmp_path, *cells):
    nb = v4.new_notebook(cells=list(cells))
    path = tmp_path / "nb.ipynb"
    nbformat.write(nb, str(path))
    return path


def _parameters_cell(source):
    return v4.new_code_cell(source, metadata={"tags": ["parameters"]})


def test_names_assigned_in_the_parameters_cell(tmp_path):
    path = _write(
        tmp_path,
        v4.new_markdown_cell("# title"),
        v4.new_code_cell("not_a_parameter = 1"),
        _parameters_cell(
            "alpha = 0.1\nname: str = 'x'\na, (b, c) = 1, (2, 3)\nn += 0\nprint(alpha)"
        ),
        _parameters_cell("ignored = 'only the first tagged cell counts, as for papermill'"),
    )
    assert declared_parameters(path) == {"alpha", "name", "a", "b", "c", "n"}
    assert unknown_parameters(path, {"alpha": 1, "alpah": 2, "ignored": 3}) == ["alpah", "ignored"]


def test_a_cell_with_magics_still_yields_its_assignments(tmp_path):
    path = _write(tmp_path, _parameters_cell("%matplotlib inline\nalpha = 1\nbeta=2"))
    assert declared_parameters(path) == {"alpha", "beta"}


def test_without_a_parameters_cell_every_name_is_unknown(tmp_path):
    path = _write(tmp_path, v4.new_code_cell("alpha = 1"))
    assert declared_parameters(path) is None
    assert unknown_parameters(path, ["alpha"]) == ["alpha"]
