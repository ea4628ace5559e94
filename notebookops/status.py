"""The run view RunStatus serves: progress from the custom status, the summary when done."""

from __future__ import annotations

from typing import Any

from notebookops import redact


def run_view(status: Any) -> dict[str, Any] | None:
    if status is None or getattr(status, "runtime_status", None) is None:
        return None
    custom = status.custom_status if isinstance(status.custom_status, dict) else {}
    view: dict[str, Any] = {
        "instanceId": status.instance_id,
        "runtimeStatus": status.runtime_status.name,
        "phase": custom.get("phase"),
        "commit": custom.get("commit"),
        "counts": custom.get("counts"),
        "notebooks": custom.get("notebooks", []),
        "errors": custom.get("errors", []),
        "createdTime": status.created_time.isoformat() if status.created_time else None,
        "lastUpdatedTime": status.last_updated_time.isoformat()
        if status.last_updated_time
        else None,
    }
    output = status.output
    if isinstance(output, dict) and "result" in output:
        view["result"] = output["result"]
        view["summary"] = output
    elif status.runtime_status.name == "Failed":
        view["result"] = "failed"
        view["errors"] = [*view["errors"], str(output)]
    # Belt and braces: nothing in here should hold a secret, but scrub what we know.
    return redact.redact_mapping(view)
