"""Turn a run summary into what people and CI systems read: a text table and JUnit XML."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any


def one_line(text: str) -> str:
    """The first non-blank line, with an ellipsis when more lines follow: multi-line error
    values would break the table and the JUnit message (the full text stays in evalue)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] + (" …" if len(lines) > 1 else "")


def error_line(notebook: dict[str, Any]) -> str:
    """`ename: evalue (cell N)`, the one line a person needs to see first."""
    error = notebook.get("error")
    if not error:
        return one_line(notebook.get("message") or "")
    text = f"{error.get('ename')}: {one_line(error.get('evalue') or '')}"
    if error.get("cellIndex") is not None:
        text += f" (cell {error['cellIndex']})"
    return text


def execution_seconds(notebook: dict[str, Any]) -> float | None:
    """Time the notebook's cells ran (papermill's clock), else the backend's run time: queue
    time, image builds and kernel start are not the notebook's."""
    seconds = notebook.get("executionSeconds")
    return seconds if seconds is not None else notebook.get("durationSeconds")


def summary_table(summary: dict[str, Any]) -> str:
    rows = [("notebook", "state", "seconds", "detail")]
    for notebook in summary["notebooks"]:
        seconds = execution_seconds(notebook)
        state = notebook["state"] + (
            " (allowed)"
            if notebook.get("allowFailure") and notebook["state"] != "succeeded"
            else ""
        )
        rows.append(
            (
                notebook["path"],
                state,
                "" if seconds is None else f"{seconds:.1f}",
                error_line(notebook)[:100],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip()
        for r in rows
    ]
    lines.insert(1, "-" * max(len(line) for line in lines))
    for error in summary.get("errors") or []:
        lines.append(f"error: {error}")
    for notebook in summary["notebooks"]:
        lines.extend(f"warning: {notebook['path']}: {w}" for w in notebook.get("warnings") or [])
    counts = summary["counts"]
    lines.append(
        f"result: {summary['result']}  ({counts['succeeded']}/{counts['total']} succeeded"
        + "".join(f", {counts[k]} {k}" for k in ("failed", "timedOut", "canceled") if counts[k])
        + (f", commit {summary['commit'][:12]}" if summary.get("commit") else "")
        + ")"
    )
    return "\n".join(lines)


def junit_xml(summary: dict[str, Any]) -> str:
    """One testcase per notebook; failures carry `ename: evalue (cell N)` and the traceback."""
    counts = summary["counts"]
    failures = sum(1 for n in summary["notebooks"] if n["state"] in ("failed", "timedOut"))
    skipped = sum(1 for n in summary["notebooks"] if n["state"] == "canceled")
    total_time = sum(execution_seconds(n) or 0 for n in summary["notebooks"])
    suites = ET.Element("testsuites")
    suite = ET.SubElement(
        suites,
        "testsuite",
        {
            "name": "notebookops",
            "tests": str(counts["total"] + (1 if summary.get("errors") else 0)),
            "failures": str(failures),
            "errors": str(1 if summary.get("errors") else 0),
            "skipped": str(skipped),
            "time": f"{total_time:.3f}",
            "timestamp": summary.get("startedAt") or "",
        },
    )
    for notebook in summary["notebooks"]:
        path = notebook["path"]
        folder, _, name = path.rpartition("/")
        case = ET.SubElement(
            suite,
            "testcase",
            {
                "classname": folder.replace("/", ".") or "notebooks",
                "name": name,
                "file": path,
                "time": f"{execution_seconds(notebook) or 0:.3f}",
            },
        )
        state = notebook["state"]
        if state in ("failed", "timedOut"):
            kind = "failure"
            element = ET.SubElement(
                case,
                kind,
                {
                    "message": error_line(notebook) or state,
                    "type": (notebook.get("error") or {}).get("ename") or state,
                },
            )
            element.text = (
                (notebook.get("error") or {}).get("traceback") or notebook.get("message") or ""
            )
        elif state == "canceled":
            ET.SubElement(case, "skipped", {"message": notebook.get("message") or "canceled"})
        if notebook.get("outputNotebook"):
            out = ET.SubElement(case, "system-out")
            out.text = f"executed notebook: {notebook['outputNotebook']}"
    errors = summary.get("errors") or []
    if errors:
        # One testcase for the run (an invalid request, a failed clone...), every error in it.
        case = ET.SubElement(suite, "testcase", {"classname": "notebookops", "name": "run"})
        message = errors[0] if len(errors) == 1 else f"{errors[0]} (and {len(errors) - 1} more)"
        ET.SubElement(case, "error", {"message": message, "type": "RunError"}).text = "\n".join(
            errors
        )
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"
