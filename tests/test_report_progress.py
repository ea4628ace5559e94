"""What people read: the summary table, JUnit XML, and live progress on a terminal."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET

from notebookops.local_run import Progress
from notebookops.report import error_line, junit_xml, summary_table

SUMMARY = {
    "instanceId": "nb-1",
    "result": "failed",
    "commit": "0123456789abcdef0123456789abcdef01234567",
    "startedAt": "2024-01-01T00:00:00.000000Z",
    "finishedAt": "2024-01-01T00:01:00.000000Z",
    "counts": {"total": 3, "succeeded": 1, "failed": 1, "timedOut": 1, "canceled": 0},
    "errors": [],
    "notebooks": [
        {
            "path": "nb/a.ipynb",
            "state": "succeeded",
            "allowFailure": False,
            "durationSeconds": 1.5,
            "error": None,
            "message": None,
            "outputNotebook": "notebooks/nb/a.ipynb",
        },
        {
            "path": "nb/b.ipynb",
            "state": "failed",
            "allowFailure": True,
            "durationSeconds": 2.0,
            "error": {"cellIndex": 3, "ename": "KeyError", "evalue": "'x'", "traceback": "tb <&>"},
            "message": None,
            "outputNotebook": None,
        },
        {
            "path": "c.ipynb",
            "state": "timedOut",
            "allowFailure": False,
            "durationSeconds": 60.0,
            "error": None,
            "message": "the notebook's timeoutMinutes was reached",
            "outputNotebook": None,
        },
    ],
}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_error_line_names_the_cell():
    assert error_line(SUMMARY["notebooks"][1]) == "KeyError: 'x' (cell 3)"
    assert error_line(SUMMARY["notebooks"][2]) == "the notebook's timeoutMinutes was reached"


def test_summary_table_lists_every_notebook_and_ends_with_the_result():
    lines = summary_table(SUMMARY).splitlines()
    assert lines[0].split() == ["notebook", "state", "seconds", "detail"]
    assert "nb/b.ipynb" in lines[3] and "failed (allowed)" in lines[3] and "(cell 3)" in lines[3]
    assert lines[-1] == (
        "result: failed  (1/3 succeeded, 1 failed, 1 timedOut, commit 0123456789ab)"
    )


def test_junit_has_one_case_per_notebook_with_failures_and_escaped_text():
    root = ET.fromstring(junit_xml(SUMMARY).split("\n", 1)[1])
    suite = root.find("testsuite")
    assert suite.get("tests") == "3" and suite.get("failures") == "2"
    cases = {c.get("file"): c for c in suite.iter("testcase")}
    assert cases["nb/b.ipynb"].find("failure").get("message") == "KeyError: 'x' (cell 3)"
    assert cases["nb/b.ipynb"].find("failure").text == "tb <&>"
    assert cases["c.ipynb"].get("classname") == "notebooks"
    assert cases["nb/a.ipynb"].find("failure") is None


def test_progress_prints_one_line_per_change_and_a_bar_on_a_terminal():
    stream = Terminal()
    progress = Progress(stream, started=0.0)
    custom = {
        "phase": "running",
        "commit": "abc",
        "counts": {"total": 2, "succeeded": 0, "running": 1},
        "notebooks": [{"path": "a", "state": "running"}, {"path": "b", "state": "queued"}],
    }
    progress.update(custom)
    progress.update(custom)  # nothing changed: no new lines
    custom = {
        **custom,
        "counts": {"total": 2, "succeeded": 1, "running": 1},
        "notebooks": [{"path": "a", "state": "succeeded"}, {"path": "b", "state": "running"}],
    }
    progress.update(custom)
    progress.close()
    text = stream.getvalue()
    lines = [line.split("\r")[-1] for line in text.split("\n")]
    changes = [line.split("] ", 1)[1] for line in lines if "] " in line and "s]" in line]
    assert changes == [
        "commit abc, 2 notebook(s)",
        "a: running",
        "b: queued",
        "a: succeeded",
        "b: running",
    ]
    assert "[###############...............] 1/2 finished, 1 running" in text


def test_progress_draws_no_bar_when_piped():
    stream = io.StringIO()
    progress = Progress(stream, started=0.0)
    progress.update(
        {
            "phase": "running",
            "counts": {"total": 1, "succeeded": 0},
            "notebooks": [{"path": "a", "state": "running"}],
        }
    )
    assert "#" not in stream.getvalue() and "\r" not in stream.getvalue()
