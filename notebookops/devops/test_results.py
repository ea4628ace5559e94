"""Per-notebook results in the build's Tests tab: one test run, one result per notebook.

Best effort by design: the pipeline's pass/fail comes from TaskCompleted, so a failure here is
logged and never stops the caller from completing the task.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from notebookops.devops.transport import DevOpsError, DevOpsTransport, response_json
from notebookops.report import error_line

__all__ = ["OUTCOMES", "output_under", "publish_test_results", "result_body", "run_name"]

log = logging.getLogger(__name__)

TEST_API_VERSION = "7.1"
ATTACHMENT_API_VERSION = "7.1"  # test.json declares 7.1 for it

# Notebook state -> TestCaseResult.outcome (valid values listed on the TestCaseResult page:
# https://learn.microsoft.com/en-us/javascript/api/azure-devops-extension-api/testcaseresult).
OUTCOMES = {
    "succeeded": "Passed",
    "failed": "Failed",
    "timedOut": "Timeout",
    "canceled": "NotExecuted",
}
# The TestCaseResult docs give stackTrace and comment a maximum of 1000 characters.
STACK_TRACE_MAX = 1000
COMMENT_MAX = 1000
ERROR_MESSAGE_MAX = 1000
ATTACHMENT_MAX_BYTES = 100 * 1024 * 1024
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

Resolver = Callable[[Mapping[str, Any]], str | Path | None]


def output_under(root: str | Path) -> Resolver:
    """A resolver for summaries whose outputNotebook paths are relative to an output folder."""

    def resolve(notebook: Mapping[str, Any]) -> Path | None:
        out = notebook.get("outputNotebook")
        return Path(root) / out if out else None

    return resolve


def rendering_of(resolve: Resolver) -> Resolver:
    """The HTML rendering beside an executed notebook (notebookops.render), when there is one:
    the Tests tab opens it in the browser, where the .ipynb only downloads as JSON."""

    def resolve_html(notebook: Mapping[str, Any]) -> Path | None:
        found = resolve(notebook)
        html = Path(found).with_suffix(".html") if found else None
        return html if html is not None and html != Path(found) and html.is_file() else None

    return resolve_html


def _default_resolver(notebook: Mapping[str, Any]) -> Path | None:
    out = notebook.get("outputNotebook")
    return Path(out) if out else None


def result_body(notebook: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """The TestCaseResult body for one notebook (what people see in the Tests tab)."""
    path = str(notebook["path"])
    state = str(notebook.get("state") or "failed")
    result: dict[str, Any] = {
        "testCaseTitle": path,
        "automatedTestName": path,
        "automatedTestStorage": "notebooks",
        "automatedTestType": "notebook",
        "outcome": OUTCOMES.get(state, "Failed"),
        "state": "Completed",
        "durationInMs": round(float(notebook.get("durationSeconds") or 0) * 1000),
    }
    if summary.get("startedAt"):
        result["startedDate"] = summary["startedAt"]
    if summary.get("finishedAt"):
        result["completedDate"] = summary["finishedAt"]
    if state != "succeeded":
        message = error_line(dict(notebook)) or state
        result["errorMessage"] = message[:ERROR_MESSAGE_MAX]
        trace = (notebook.get("error") or {}).get("traceback")
        if trace:
            clean = _ANSI.sub("", "\n".join(trace) if isinstance(trace, list) else str(trace))
            # The end of a traceback names the failing line; keep that end when cutting.
            result["stackTrace"] = clean[-STACK_TRACE_MAX:]
    comments = []
    if notebook.get("allowFailure") and state != "succeeded":
        comments.append("allowFailure: this notebook does not fail the pipeline")
    if notebook.get("portalUrl"):
        comments.append(f"run: {notebook['portalUrl']}")
    if comments:
        result["comment"] = "\n".join(comments)[:COMMENT_MAX]
    return result


def publish_test_results(
    client: DevOpsTransport,
    summary: Mapping[str, Any],
    resolve_output: Resolver | None = None,
) -> int | None:
    """Publish once per run: a retried or re-run report finds its own test run by name (it
    carries the instance id), adds only the results it lacks and completes it; a run already
    completed is left alone. Every call is a best-effort "tests" side call."""
    if not client.build_id or "tests" in client.disabled:
        return None
    notebooks = list(summary.get("notebooks") or [])
    resolve = resolve_output or _default_resolver
    base = f"{client.project_base}/_apis/test"
    name = run_name(summary)
    existing = _find_run(client, base, name)
    if existing is None and "tests" in client.disabled:
        return None
    if existing is not None and existing.get("state") == "Completed":
        log.info("test run %s (%s) was already published", existing["id"], name)
        return int(existing["id"])
    run_id = int(existing["id"]) if existing is not None else _create_run(client, base, summary)
    if run_id is None:
        return None
    done = _existing_results(client, base, run_id) if existing is not None else set()
    todo = [n for n in notebooks if str(n["path"]) not in done]
    if todo and "tests" not in client.disabled:
        result_ids = _add_results(client, base, run_id, [result_body(n, summary) for n in todo])
        for notebook, result_id in zip(todo, result_ids, strict=False):
            _attach(client, base, run_id, result_id, notebook, resolve)
            _attach(client, base, run_id, result_id, notebook, rendering_of(resolve))
    # A run left InProgress shows as running forever in the Tests tab.
    _complete_run(client, base, run_id, summary)
    return run_id


def run_name(summary: Mapping[str, Any]) -> str:
    return f"notebookops {summary.get('instanceId') or ''}".strip()


def _find_run(client: DevOpsTransport, base: str, name: str) -> dict[str, Any] | None:
    # Runs - List, filtered by the build (test.json Runs_List: buildUri, automated).
    response = client.side_call(
        "tests",
        "find test run",
        "GET",
        f"{base}/runs",
        TEST_API_VERSION,
        params={"buildUri": f"vstfs:///Build/Build/{client.build_id}", "automated": "true"},
    )
    if response is None:
        return None
    runs = response_json(response).get("value")
    for run in runs if isinstance(runs, list) else []:
        if isinstance(run, Mapping) and run.get("name") == name and isinstance(run.get("id"), int):
            return dict(run)
    return None


def _existing_results(client: DevOpsTransport, base: str, run_id: int) -> set[str]:
    response = client.side_call(
        "tests", "list test results", "GET", f"{base}/Runs/{run_id}/results", TEST_API_VERSION
    )
    results = response_json(response).get("value") if response is not None else None
    return {
        str(r.get("automatedTestName"))
        for r in (results if isinstance(results, list) else [])
        if isinstance(r, Mapping)
    }


def _create_run(client: DevOpsTransport, base: str, summary: Mapping[str, Any]) -> int | None:
    body: dict[str, Any] = {
        "name": run_name(summary),
        "automated": True,
        "build": {"id": str(client.build_id)},
        "state": "InProgress",
    }
    if summary.get("startedAt"):
        body["startDate"] = summary["startedAt"]  # RunCreateModel says startDate
    if summary.get("commit"):
        body["comment"] = f"commit {summary['commit']}"
    # Runs - Create: https://learn.microsoft.com/en-us/rest/api/azure/devops/test/runs/create
    response = client.side_call(
        "tests", "create test run", "POST", f"{base}/runs", TEST_API_VERSION, json_body=body
    )
    if response is None:
        return None
    run_id = response_json(response).get("id")
    if not isinstance(run_id, int):
        client.disable("tests", "create test run: Azure DevOps answered without a run id")
        return None
    return run_id


def _add_results(
    client: DevOpsTransport, base: str, run_id: int, results: list[dict[str, Any]]
) -> list[int | None]:
    # Results - Add: https://learn.microsoft.com/en-us/rest/api/azure/devops/test/results/add
    response = client.side_call(
        "tests",
        "add test results",
        "POST",
        f"{base}/Runs/{run_id}/results",
        TEST_API_VERSION,
        json_body=[_redacted(client, r) for r in results],
    )
    body = response_json(response) if response is not None else {}
    added = body.get("value") if isinstance(body.get("value"), list) else []
    return [item.get("id") if isinstance(item, Mapping) else None for item in added]


def _attach(
    client: DevOpsTransport,
    base: str,
    run_id: int,
    result_id: int | None,
    notebook: Mapping[str, Any],
    resolve: Resolver,
) -> None:
    if not isinstance(result_id, int) or "tests" in client.disabled:
        return
    try:
        found = resolve(notebook)
    except Exception as exc:  # a resolver bug must not cost the other notebooks
        log.warning("%s: executed notebook not attached: %s", notebook.get("path"), exc)
        return
    if not found:
        return
    path = Path(found)
    try:
        size = path.stat().st_size
        if size > ATTACHMENT_MAX_BYTES:
            log.warning("%s: executed notebook not attached, %d bytes is too large", path, size)
            return
        content = path.read_bytes()
    except OSError as exc:
        log.warning("%s: executed notebook not attached: %s", notebook.get("path"), exc)
        return
    body = {
        "stream": base64.b64encode(content).decode("ascii"),
        "fileName": path.name,
        "comment": f"executed notebook {notebook.get('path')}",
        "attachmentType": "GeneralAttachment",
    }
    # Attachments - Create Test Result Attachment (test.json: api-version 7.1):
    # https://learn.microsoft.com/en-us/rest/api/azure/devops/test/attachments/create-test-result-attachment
    client.side_call(
        "tests",
        "attach executed notebook",
        "POST",
        f"{base}/Runs/{run_id}/Results/{result_id}/attachments",
        ATTACHMENT_API_VERSION,
        json_body=body,
    )


def _complete_run(
    client: DevOpsTransport, base: str, run_id: int, summary: Mapping[str, Any]
) -> None:
    body: dict[str, Any] = {"state": "Completed"}
    if summary.get("finishedAt"):
        body["completedDate"] = summary["finishedAt"]
    # Runs - Update: https://learn.microsoft.com/en-us/rest/api/azure/devops/test/runs/update.
    # Tried even after another "tests" call was refused: a run left InProgress looks stuck.
    try:
        client.call(
            "complete test run", "PATCH", f"{base}/runs/{run_id}", TEST_API_VERSION, json_body=body
        )
    except DevOpsError as exc:
        log.warning("test run %s could not be completed: %s", run_id, exc)


def _redacted(client: DevOpsTransport, value: Any) -> Any:
    if isinstance(value, str):
        return client.scrub(value)
    if isinstance(value, Mapping):
        return {k: _redacted(client, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(client, v) for v in value]
    return value
