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
from typing import TYPE_CHECKING, Any

from notebookops.report import error_line

if TYPE_CHECKING:
    from notebookops.devops import DevOpsClient

__all__ = ["OUTCOMES", "output_under", "publish_test_results", "result_body"]

log = logging.getLogger(__name__)

TEST_API_VERSION = "7.1"
ATTACHMENT_API_VERSION = "7.1-preview.1"

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
    client: DevOpsClient,
    summary: Mapping[str, Any],
    resolve_output: Resolver | None = None,
) -> int | None:
    from notebookops.devops import DevOpsError

    if not client.build_id:
        return None
    notebooks = list(summary.get("notebooks") or [])
    resolve = resolve_output or _default_resolver
    base = f"{client.project_base}/_apis/test"
    try:
        run_id = _create_run(client, base, summary)
    except DevOpsError as exc:
        log.warning("test results not published: %s", exc)
        return None
    try:
        if notebooks:
            result_ids = _add_results(
                client, base, run_id, [result_body(n, summary) for n in notebooks]
            )
            for notebook, result_id in zip(notebooks, result_ids, strict=False):
                _attach(client, base, run_id, result_id, notebook, resolve)
                _attach(client, base, run_id, result_id, notebook, rendering_of(resolve))
    except DevOpsError as exc:
        log.warning("test run %s: results not published: %s", run_id, exc)
    finally:
        # A run left InProgress shows as running forever in the Tests tab.
        try:
            _complete_run(client, base, run_id, summary)
        except DevOpsError as exc:
            log.warning("test run %s could not be completed: %s", run_id, exc)
    return run_id


def _create_run(client: DevOpsClient, base: str, summary: Mapping[str, Any]) -> int:
    body: dict[str, Any] = {
        "name": f"notebookops {summary.get('instanceId') or ''}".strip(),
        "automated": True,
        "build": {"id": str(client.build_id)},
        "state": "InProgress",
    }
    if summary.get("startedAt"):
        body["startedDate"] = summary["startedAt"]
    if summary.get("commit"):
        body["comment"] = f"commit {summary['commit']}"
    # Runs - Create: https://learn.microsoft.com/en-us/rest/api/azure/devops/test/runs/create
    response = client.call(
        "create test run", "POST", f"{base}/runs", TEST_API_VERSION, json_body=body
    )
    run_id = _body(response).get("id")
    if not isinstance(run_id, int):
        from notebookops.devops import CallbackUnavailable

        raise CallbackUnavailable(
            "create test run: no run id in the answer", operation="create test run"
        )
    return run_id


def _add_results(
    client: DevOpsClient, base: str, run_id: int, results: list[dict[str, Any]]
) -> list[int | None]:
    # Results - Add: https://learn.microsoft.com/en-us/rest/api/azure/devops/test/results/add
    response = client.call(
        "add test results",
        "POST",
        f"{base}/Runs/{run_id}/results",
        TEST_API_VERSION,
        json_body=[_redacted(client, r) for r in results],
    )
    body = _body(response)
    added = body.get("value") if isinstance(body.get("value"), list) else []
    return [item.get("id") if isinstance(item, Mapping) else None for item in added]


def _attach(
    client: DevOpsClient,
    base: str,
    run_id: int,
    result_id: int | None,
    notebook: Mapping[str, Any],
    resolve: Resolver,
) -> None:
    from notebookops.devops import CallbackRejected, DevOpsError

    if not isinstance(result_id, int):
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
    # Attachments - Create Test Result Attachment:
    # https://learn.microsoft.com/en-us/rest/api/azure/devops/test/attachments/create-test-result-attachment
    try:
        client.call(
            "attach executed notebook",
            "POST",
            f"{base}/Runs/{run_id}/Results/{result_id}/attachments",
            ATTACHMENT_API_VERSION,
            json_body=body,
        )
    except CallbackRejected:
        raise
    except DevOpsError as exc:
        # One notebook's upload failing is no reason to drop the others' attachments.
        log.warning("%s: executed notebook not attached: %s", notebook.get("path"), exc)


def _complete_run(client: DevOpsClient, base: str, run_id: int, summary: Mapping[str, Any]) -> None:
    body: dict[str, Any] = {"state": "Completed"}
    if summary.get("finishedAt"):
        body["completedDate"] = summary["finishedAt"]
    # Runs - Update: https://learn.microsoft.com/en-us/rest/api/azure/devops/test/runs/update
    client.call(
        "complete test run", "PATCH", f"{base}/runs/{run_id}", TEST_API_VERSION, json_body=body
    )


def _redacted(client: DevOpsClient, value: Any) -> Any:
    if isinstance(value, str):
        return client.scrub(value)
    if isinstance(value, Mapping):
        return {k: _redacted(client, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(client, v) for v in value]
    return value


def _body(response: Any) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {"value": body}
