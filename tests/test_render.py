"""Rendered notebooks and per-cell timing, from notebooks papermill really executed."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import papermill
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from notebookops import cell_timing, redact
from notebookops.render import describe_output, html_path_for, render_html
from notebookops.report import junit_xml, summary_table


def _notebook(tmp_path: Path, cells: list, name: str = "nb.ipynb") -> Path:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = tmp_path / name
    nbformat.write(nb, path)
    return path


def _execute(source: Path, parameters: dict | None = None) -> Path:
    out = source.with_name("executed-" + source.name)
    for attempt in range(2):  # kernels are noisy: one retry of a failed start
        try:
            papermill.execute_notebook(
                str(source),
                str(out),
                parameters=parameters or {},
                kernel_name="python3",
                progress_bar=False,
                start_timeout=120,
            )
            break
        except papermill.PapermillExecutionError:
            break  # the notebook failed on purpose; its output is what we render
        except RuntimeError:
            if attempt:
                raise
    return out


class _Cells(HTMLParser):
    """Element ids and the classes of each notebookops cell wrapper, in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.hrefs: list[str] = []
        self.scripts = 0
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.append(attrs["id"])
        if tag == "a" and attrs.get("href"):
            self.hrefs.append(attrs["href"])
        if tag == "script":
            self.scripts += 1
        for key in ("src", "href"):
            if (attrs.get(key) or "").startswith(("http:", "https:", "//")):
                self.external.append(attrs[key])


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("render")
    source = _notebook(
        tmp,
        [
            new_markdown_cell("# Title <b>bold</b>"),
            _tag(new_code_cell("alpha = 1"), "parameters"),
            new_code_cell("import time\ntime.sleep(0.6)\nprint('slept')"),
            new_code_cell("raise ValueError('bad <input> & worse')"),
            new_code_cell("print('never')"),
        ],
    )
    return _execute(source, {"alpha": 2})


def _tag(cell, tag):
    cell.metadata["tags"] = [tag]
    return cell


@pytest.mark.slow
def test_slowest_cells_and_execution_time_come_from_papermill(failing_run):
    nb = json.loads(failing_run.read_text())
    timing = cell_timing.timing(nb)
    # Committed numbering: 0 markdown, 1 parameters, 2 sleep, 3 raise; the injected cell is not counted.
    assert timing["slowestCells"][0]["cellIndex"] == 2
    assert timing["slowestCells"][0]["seconds"] >= 0.6
    assert 0.6 <= timing["executionSeconds"] < 30
    assert len(timing["slowestCells"]) <= cell_timing.SLOWEST_CELLS
    assert [c["cellIndex"] for c in timing["slowestCells"]].count(2) == 1


@pytest.mark.slow
def test_rendered_notebook_links_the_failing_cell_and_marks_the_injected_one(failing_run):
    described = describe_output(failing_run, "nb/failing.ipynb", "failed")
    html_file = Path(described["outputHtml"])
    assert html_file == html_path_for(failing_run)
    page = html_file.read_text(encoding="utf-8")
    cells = _Cells()
    cells.feed(page)
    # The banner links to the failing cell, which is the one that raised.
    assert "#failing-cell" in cells.hrefs
    failing_at = page.index('id="failing-cell"')
    assert (
        page.index('id="cell-3"')
        < failing_at
        < page.index("bad &lt;input&gt; &amp; worse", failing_at)
    )
    assert "Failed in cell 3" in page
    # papermill's injected parameters are marked; its red marker cells are gone.
    assert "injected-parameters" in cells.ids and "Parameters injected by papermill" in page
    assert "An Exception was encountered" not in page
    # Each executed cell shows its duration; the sleep cell's is at least 0.6 s.
    sleep = page.index('id="cell-2"')
    shown = re.search(r'class="nbo-duration"[^>]*>([0-9.]+) s<', page[sleep:])
    assert shown and float(shown.group(1)) >= 0.6
    # Self-contained: no script and nothing loaded from elsewhere.
    assert cells.scripts == 0 and cells.external == []
    assert described["slowestCells"][0]["cellIndex"] == 2
    assert described["executionSeconds"] >= 0.6


def test_notebook_text_is_escaped_in_the_banner_and_secrets_are_scrubbed():
    secret = "s3cr3t-t0ken-value-for-render"
    redact.register_secret(secret)
    try:
        cell = new_code_cell("x")
        cell.outputs = [
            nbformat.v4.new_output(
                "error", ename="<script>alert(1)</script>", evalue=f"leak {secret}", traceback=[]
            )
        ]
        nb = json.loads(nbformat.writes(new_notebook(cells=[cell])))
        page = render_html(nb, "nb/<x>.ipynb", "failed")
    finally:
        redact.forget_secret(secret)
    banner = page[page.index('id="notebookops-summary"') :]
    banner = banner[: banner.index("</section>")]
    assert "<script>" not in banner and "&lt;script&gt;" in banner
    assert "nb/&lt;x&gt;.ipynb" in banner
    assert secret not in page


def test_unrenderable_output_keeps_the_timing_and_no_html(tmp_path):
    broken = tmp_path / "broken.ipynb"
    broken.write_text(json.dumps({"cells": "not a list", "metadata": {}}))
    assert "outputHtml" not in describe_output(broken, "broken.ipynb", "failed")
    assert not html_path_for(broken).exists()
    assert describe_output(tmp_path / "missing.ipynb", "missing.ipynb", "failed") == {}


def test_table_and_junit_use_execution_time_not_wall_time():
    summary = {
        "instanceId": "i",
        "result": "succeeded",
        "commit": "abc",
        "startedAt": "2026-01-01T00:00:00Z",
        "counts": {"total": 2, "succeeded": 2, "failed": 0, "timedOut": 0, "canceled": 0},
        "errors": [],
        "notebooks": [
            {
                "path": "a.ipynb",
                "state": "succeeded",
                "durationSeconds": 95.0,
                "executionSeconds": 2.5,
            },
            {
                "path": "b.ipynb",
                "state": "succeeded",
                "durationSeconds": 4.0,
                "executionSeconds": None,
            },
        ],
    }
    table = summary_table(summary)
    assert re.search(r"a\.ipynb\s+succeeded\s+2\.5", table)
    assert re.search(r"b\.ipynb\s+succeeded\s+4\.0", table)
    xml = junit_xml(summary)
    assert 'name="a.ipynb" file="a.ipynb" time="2.500"' in xml
    assert 'time="6.500"' in xml  # the suite's total


def test_untimed_notebook_has_no_execution_time():
    nb = json.loads(nbformat.writes(new_notebook(cells=[new_code_cell("1")])))
    assert cell_timing.timing(nb) == {"executionSeconds": None, "slowestCells": []}


@pytest.mark.slow
def test_the_rendering_is_attached_beside_the_notebook_in_the_tests_tab(failing_run, tmp_path):
    """The real DevOps client against the fake Azure DevOps on loopback."""
    from notebookops.devops.client import DevOpsClient
    from notebookops.devops.test_results import output_under
    from tests.fake_devops import FakeDevOps

    out = tmp_path / "out"
    (out / "notebooks" / "nb").mkdir(parents=True)
    (out / "notebooks" / "nb" / "bare.ipynb").write_text(failing_run.read_text())
    executed = out / "notebooks" / "nb" / "failing.ipynb"
    executed.write_text(failing_run.read_text())
    assert describe_output(executed, "nb/failing.ipynb", "failed")["outputHtml"]
    summary = {
        "instanceId": "nbops-render",
        "result": "failed",
        "commit": "0" * 40,
        "counts": {"total": 2, "succeeded": 0, "failed": 2, "timedOut": 0, "canceled": 0},
        "notebooks": [
            {"path": p, "state": "failed", "outputNotebook": f"notebooks/{p}"}
            for p in ("nb/failing.ipynb", "nb/bare.ipynb")
        ],
    }
    with FakeDevOps(token="render-test-token") as devops:
        client = DevOpsClient.from_callback(devops.callback(), sleep=lambda _: None, timeout=5.0)
        client.publish_test_results(summary, output_under(out))
        (run,) = devops.test_runs()
    results = {r["testCaseTitle"]: r["attachments"] for r in run["results"]}
    assert [a["fileName"] for a in results["nb/failing.ipynb"]] == ["failing.ipynb", "failing.html"]
    assert 'id="notebookops-summary"' in results["nb/failing.ipynb"][1]["content"]
    # No rendering beside it: the notebook alone, as before.
    assert [a["fileName"] for a in results["nb/bare.ipynb"]] == ["bare.ipynb"]
