"""The pipeline's summary tab: a Markdown page attached to the task's timeline record.

Azure DevOps shows record attachments of type ``Distributedtask.Core.Summary`` as a tab of the
run (the mechanism behind ``##vso[task.uploadsummary]``). Everything taken from notebooks or
messages is escaped, so a notebook's error text cannot inject links or HTML into the page.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import quote

from notebookops.devops.transport import DevOpsTransport, segment
from notebookops.report import error_line

__all__ = ["PUBLIC_URL_SETTING", "attach_summary", "status_url", "summary_markdown"]

# Not in the Swagger file: the route and api-version of TaskClient.create_attachment (v7_1 SDK).
ATTACHMENTS_API_VERSION = "7.1-preview.1"
SUMMARY_ATTACHMENT_TYPE = "Distributedtask.Core.Summary"

# Where people reach the app; Azure sets WEBSITE_HOSTNAME for every function app.
PUBLIC_URL_SETTING = "NOTEBOOKOPS_PUBLIC_URL"
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~])")
_RESULT_WORDS = {
    "succeeded": "✅ succeeded",
    "succeededWithIssues": "⚠️ succeeded with issues",
    "failed": "❌ failed",
    "canceled": "⏹ canceled",
}


def status_url(instance_id: str) -> str | None:
    """The run's status page (GET /api/runs/{id}), or None when the app's address is unknown."""
    base = os.environ.get(PUBLIC_URL_SETTING, "").strip().rstrip("/")
    if not base and os.environ.get("WEBSITE_HOSTNAME", "").strip():
        base = "https://" + os.environ["WEBSITE_HOSTNAME"].strip().rstrip("/")
    if not base:
        return None
    return f"{base}/api/runs/{quote(instance_id, safe='')}"


def attach_summary(client: DevOpsTransport, markdown: str, name: str = "notebookops.md") -> bool:
    """The task's summary tab: a Markdown record attachment of type
    Distributedtask.Core.Summary (what ##vso[task.uploadsummary] makes); best effort."""
    url = (
        f"{client.timeline_base}/records/{segment(client.task_instance_id)}"
        f"/attachments/{segment(SUMMARY_ATTACHMENT_TYPE)}/{segment(name)}"
    )
    answer = client.side_call(
        "summary",
        "attach summary",
        "PUT",
        url,
        ATTACHMENTS_API_VERSION,
        data=client.scrub(markdown).encode("utf-8"),
        content_type="application/octet-stream",
    )
    return answer is not None


def summary_markdown(summary: dict[str, Any], link: str | None = None) -> str:
    """Result, one table row per notebook (state, duration, failing cell, error), the link."""
    link = link if link is not None else status_url(str(summary.get("instanceId") or ""))
    result = str(summary.get("result") or "failed")
    counts = summary.get("counts") or {}
    lines = [
        f"### Notebooks: {_RESULT_WORDS.get(result, _escape(result))}",
        "",
        f"{counts.get('succeeded', 0)} of {counts.get('total', 0)} succeeded"
        + (f" at commit `{_code(summary['commit'][:12])}`" if summary.get("commit") else ""),
        "",
    ]
    for error in summary.get("errors") or []:
        lines.append(f"- {_escape(str(error))}")
    if summary.get("errors"):
        lines.append("")
    notebooks = summary.get("notebooks") or []
    if notebooks:
        lines += ["| notebook | state | duration | failing cell | error |", "|---|---|---|---|---|"]
        for notebook in notebooks:
            error = notebook.get("error") or {}
            cell = error.get("cellIndex")
            seconds = notebook.get("durationSeconds")
            state = _escape(str(notebook.get("state") or ""))
            if notebook.get("allowFailure") and notebook.get("state") != "succeeded":
                state += " (allowed)"
            detail = error_line(dict(notebook)) if notebook.get("state") != "succeeded" else ""
            lines.append(
                "| "
                + " | ".join(
                    (
                        _escape(str(notebook.get("path") or "")),
                        state,
                        f"{seconds:.1f} s" if isinstance(seconds, int | float) else "",
                        str(cell) if isinstance(cell, int) else "",
                        _escape(detail[:300]),
                    )
                )
                + " |"
            )
        lines.append("")
    if link:
        lines.append(f"[Status page with every notebook]({_url(link)})")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    flat = " ".join(text.split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", flat)


def _code(text: str) -> str:
    return text.replace("`", "")


def _url(link: str) -> str:
    return quote(link, safe=":/?&=%#@+,;~-._")
