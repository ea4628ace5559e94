"""What RunStatus serves: a redacted view of one run, the list of runs, and the files of a run.

Views are built from the durable status only (custom status while running, the summary once
done). They carry no server path: executed notebooks are offered as links to
`/api/runs/{id}/notebooks/{path}`, only when the file is in the run's outputs, and portal
links only when they are http(s) (the local backend's are `file://` paths on the server).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlencode

from notebookops import redact

RUNNING_RUNTIME = {"Pending", "Running", "ContinuedAsNew"}
RUN_STATES = ("running", "succeeded", "succeededWithIssues", "failed", "canceled")
PAGE_SIZE = 20
PAGE_SIZE_MAX = 100
SERVED_SUFFIXES = {".html", ".ipynb"}
_INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}$")


class BadQuery(ValueError):
    """A query parameter with a value the list cannot use (names the parameter and value)."""


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def run_state(runtime: str | None, output: Any) -> str:
    """One word for a run: its result once finished, `running` before."""
    if isinstance(output, Mapping) and output.get("result") in RUN_STATES:
        return str(output["result"])
    if runtime in RUNNING_RUNTIME:
        return "running"
    if runtime == "Terminated":
        return "canceled"
    return "failed"


def _public_url(url: Any) -> str | None:
    return url if isinstance(url, str) and url.startswith(("https://", "http://")) else None


def notebook_url(instance_id: str, path: str, suffix: str, query: Mapping[str, str]) -> str:
    target = str(PurePosixPath(path).with_suffix(suffix))
    link = f"/api/runs/{quote(instance_id, safe='')}/notebooks/{quote(target)}"
    return f"{link}?{urlencode(query)}" if query else link


def _error_line(error: Mapping[str, Any] | None, message: Any) -> str:
    if not error:
        return str(message or "")
    text = f"{error.get('ename')}: {error.get('evalue')}"
    if error.get("cellIndex") is not None:
        text += f" (cell {error['cellIndex']})"
    return text


def _notebook(
    entry: Mapping[str, Any], instance_id: str, outputs: Path | None, query: Mapping[str, str]
) -> dict[str, Any]:
    path = str(entry.get("path") or "")
    error = entry.get("error") if isinstance(entry.get("error"), Mapping) else None
    view: dict[str, Any] = {
        "path": path,
        "state": entry.get("state"),
        "allowFailure": bool(entry.get("allowFailure", False)),
        "durationSeconds": entry.get("durationSeconds"),
        "executionSeconds": entry.get("executionSeconds"),
        "slowestCells": list(entry.get("slowestCells") or []),
        "error": None
        if error is None
        else {k: error.get(k) for k in ("cellIndex", "ename", "evalue", "traceback") if k in error},
        "errorLine": _error_line(error, entry.get("message")),
        "message": entry.get("message"),
        "portalUrl": _public_url(entry.get("portalUrl")),
        "links": {},
    }
    for kind, suffix in (("html", ".html"), ("ipynb", ".ipynb")):
        relative = str(PurePosixPath(path).with_suffix(suffix))
        if outputs is not None and resolve_output(outputs, relative) is not None:
            view["links"][kind] = notebook_url(instance_id, path, suffix, query)
    return view


def run_view(
    status: Any, outputs: Path | None = None, query: Mapping[str, str] | None = None
) -> dict[str, Any] | None:
    """One run for people and programs; `outputs` is the run's output folder (for links)."""
    if status is None or getattr(status, "runtime_status", None) is None:
        return None
    query = dict(query or {})
    custom = status.custom_status if isinstance(status.custom_status, dict) else {}
    output = status.output if isinstance(status.output, dict) else None
    runtime = status.runtime_status.name
    source = output if output and "notebooks" in output else custom
    errors = list((output or custom).get("errors") or [])
    if runtime == "Failed" and not output:
        errors.append(str(status.output))
    view: dict[str, Any] = {
        "instanceId": status.instance_id,
        "runtimeStatus": runtime,
        "state": run_state(runtime, output),
        "result": output.get("result") if output else ("failed" if runtime == "Failed" else None),
        "phase": custom.get("phase"),
        "commit": (output or custom).get("commit"),
        "counts": (output or custom).get("counts"),
        "startedAt": (output or {}).get("startedAt"),
        "finishedAt": (output or {}).get("finishedAt"),
        "createdTime": _iso(status.created_time),
        "lastUpdatedTime": _iso(status.last_updated_time),
        "errors": errors,
        "notebooks": [
            _notebook(n, status.instance_id, outputs, query)
            for n in source.get("notebooks") or []
            if isinstance(n, Mapping)
        ],
    }
    # While it goes, a run of many notebooks lists only some (policy.custom_status's limit).
    if source is custom and isinstance(custom.get("unlisted"), int) and custom["unlisted"]:
        view["unlisted"] = custom["unlisted"]
    # Belt and braces: nothing in here should hold a secret, but scrub what we know.
    return redact.redact_mapping(view)


def list_query(params: Mapping[str, str]) -> tuple[set[str] | None, int, int]:
    """(states, page, page size) from `?state=running,failed&page=2&pageSize=50`."""
    states = None
    raw = (params.get("state") or "").strip()
    if raw:
        states = {s.strip() for s in raw.split(",") if s.strip()}
        unknown = sorted(states - set(RUN_STATES))
        if unknown:
            raise BadQuery(f"state: unknown value {unknown[0]!r}; expected one of {RUN_STATES}")
    page = _positive(params, "page", 1, None)
    size = _positive(params, "pageSize", PAGE_SIZE, PAGE_SIZE_MAX)
    return states, page, size


def _positive(params: Mapping[str, str], name: str, default: int, cap: int | None) -> int:
    raw = (params.get(name) or "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1 or (cap is not None and int(raw) > cap):
        limit = f"1 to {cap}" if cap else "a whole number from 1"
        raise BadQuery(f"{name}: invalid value {raw!r}; expected {limit}")
    return int(raw)


def list_view(
    statuses: Iterable[Any],
    states: set[str] | None,
    page: int,
    size: int,
    query: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Runs newest first, filtered by state, one page of them."""
    query = dict(query or {})
    rows = []
    for status in statuses:
        if getattr(status, "runtime_status", None) is None:
            continue
        output = status.output if isinstance(status.output, dict) else None
        custom = status.custom_status if isinstance(status.custom_status, dict) else {}
        state = run_state(status.runtime_status.name, output)
        if states and state not in states:
            continue
        counts = (output or custom).get("counts") or {}
        rows.append(
            {
                "instanceId": status.instance_id,
                "state": state,
                "runtimeStatus": status.runtime_status.name,
                "commit": (output or custom).get("commit"),
                "counts": {k: counts[k] for k in counts if isinstance(counts[k], int)},
                "createdTime": _iso(status.created_time),
                "lastUpdatedTime": _iso(status.last_updated_time),
                "url": f"/api/runs/{quote(status.instance_id, safe='')}"
                + (f"?{urlencode(query)}" if query else ""),
            }
        )
    rows.sort(key=lambda r: r["createdTime"] or "", reverse=True)
    start = (page - 1) * size
    view: dict[str, Any] = {
        "runs": rows[start : start + size],
        "page": page,
        "pageSize": size,
        "total": len(rows),
        "next": None,
        "previous": None,
    }
    base = {**query, **({"state": ",".join(sorted(states))} if states else {})}
    if start + size < len(rows):
        view["next"] = "/api/runs?" + urlencode({**base, "page": page + 1, "pageSize": size})
    if page > 1:
        view["previous"] = "/api/runs?" + urlencode({**base, "page": page - 1, "pageSize": size})
    return redact.redact_mapping(view)


def valid_instance_id(instance_id: str) -> bool:
    return bool(_INSTANCE_ID.match(instance_id)) and instance_id not in (".", "..")


def resolve_output(outputs: Path, relative: str) -> Path | None:
    """The file `relative` names inside `outputs/notebooks`, or None: no `..`, no absolute
    path, no backslash or NUL, only .html and .ipynb, and no symlink that leads outside."""
    if not relative or "\\" in relative or "\x00" in relative or relative.startswith("/"):
        return None
    parts = PurePosixPath(relative).parts
    if any(part in ("..", ".", "") for part in parts) or Path(relative).is_absolute():
        return None
    if PurePosixPath(relative).suffix not in SERVED_SUFFIXES:
        return None
    root = (outputs / "notebooks").resolve()
    try:
        candidate = (root / Path(*parts)).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not candidate.is_relative_to(root) or not candidate.is_file():
        return None
    return candidate
