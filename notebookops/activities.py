"""What each activity does, as plain functions over the JSON the orchestrator sends.

Every activity is safe to run twice (the host runs activities at least once): clone
reuses the checkout cache, submit maps (instance, notebook) to one run key that a backend
never starts twice, monitor only reads and cancels, and report is idempotent per instance.
Permanent problems come back as values ({"ok": false, "error": ...}) so the orchestrator
does not retry them; transient ones raise and the host retries them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from notebookops import redact, sealing

log = logging.getLogger("notebookops")
OUTPUT_DIR_SETTING = "NOTEBOOKOPS_OUTPUT_DIR"


def _token(payload: dict[str, Any]) -> str | None:
    token = sealing.unseal(payload.get("auth"))
    if token:
        redact.register_secret(token)
    return token


def _git_auth(url: str, payload: dict[str, Any]) -> Any:
    from notebookops.gitauth import GitAuth

    plan_url = (payload.get("devops") or {}).get("planUrl")
    return GitAuth.for_request(url, plan_url, _token(payload))


def output_root(instance_id: str) -> Path:
    base = os.environ.get(OUTPUT_DIR_SETTING, "").strip() or (
        Path(tempfile.gettempdir()) / "notebookops-outputs"
    )
    return Path(base) / instance_id


DEVOPS_RETRY_SETTING = "NOTEBOOKOPS_DEVOPS_RETRY_SECONDS"
DEVOPS_TIMEOUT_SETTING = "NOTEBOOKOPS_DEVOPS_TIMEOUT_SECONDS"


def _float_setting(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        log.warning("%s=%r is not a number; using %s", name, raw, default)
        return default


def _devops(payload: dict[str, Any]) -> Any:
    """The pipeline's callback client, or None when the run has no callback values.

    ``payload["disabled"]`` carries the side-call kinds an earlier activity saw refused, so
    each rejection is logged once per run and never knocked on again."""
    devops = payload.get("devops")
    token = _token(payload)
    if not devops or not token:
        return None
    from notebookops.devops.client import DevOpsClient
    from notebookops.request import Callback

    callback = Callback.from_dict({**devops, "authToken": token})
    return DevOpsClient.from_callback(
        callback,
        log_id=payload.get("logId"),
        disabled=payload.get("disabled") or {},
        backoff_base=_float_setting(DEVOPS_RETRY_SETTING, 1.0),
        timeout=_float_setting(DEVOPS_TIMEOUT_SETTING, 30.0),
    )


def _tell(client: Any, lines: list[str]) -> None:
    """Live feed and job log; best effort: neither ever fails a run or decides its verdict."""
    if client is None or not lines:
        return
    client.feed(lines)
    if client.log_id is not None:
        client.append_log("\n".join(lines))


def _disabled(client: Any, answer: dict[str, Any]) -> dict[str, Any]:
    """Hand side-call kinds refused in this activity back to the orchestrator."""
    if client is not None and client.newly_disabled:
        answer["disabled"] = dict(client.newly_disabled)
    return answer


def clone(payload: dict[str, Any]) -> dict[str, Any]:
    from notebookops.repo import RepoError, resolve_and_checkout

    repository = payload["repository"]
    try:
        result = resolve_and_checkout(
            repository["url"],
            repository.get("ref") or "main",
            repository.get("commit"),
            list(payload["patterns"]),
            auth=_git_auth(repository["url"], payload),
        )
    except RepoError as exc:
        if exc.permanent:
            return {"ok": False, "error": redact.redact_known(str(exc))}
        raise
    log.info(
        "clone: %s at %s, %d notebook(s)",
        repository["url"],
        result.commit[:12],
        len(result.notebooks),
    )
    return {"ok": True, **result.to_dict()}


def submit(payload: dict[str, Any]) -> dict[str, Any]:
    from notebookops.compute.base import PermanentBackendError, RunSpec, run_key
    from notebookops.compute.registry import get_backend
    from notebookops.repo import RepoError, ensure_checkout

    compute = payload.get("compute") or {}
    try:
        backend = get_backend(compute.get("backend"))
        checkout = ensure_checkout(
            payload["repository"], payload["commit"], auth=_git_auth(payload["repository"], payload)
        )
        warnings = _parameter_warnings(payload, Path(checkout))
        if warnings and payload.get("strictParameters"):
            return {"ok": False, "error": warnings[0], "ename": "UnknownParameter"}
        spec = RunSpec(
            run_key=run_key(payload["instanceId"], payload["path"]),
            instance_id=payload["instanceId"],
            notebook=payload["path"],
            checkout=str(checkout),
            commit=payload["commit"],
            parameters=payload.get("parameters") or {},
            timeout_seconds=payload.get("timeoutSeconds"),
            compute=compute,
            tags=_tags(payload),
        )
        handle = backend.submit(spec)
    except PermanentBackendError as exc:
        return {"ok": False, "error": redact.redact_known(str(exc))}
    except RepoError as exc:
        if exc.permanent:
            return {"ok": False, "error": redact.redact_known(str(exc))}
        raise TransientError.of(exc) from None
    except Exception as exc:
        # Retried by the host; after the last attempt its text becomes that notebook's error
        # in the summary, so it is redacted here, where the secrets are known.
        raise TransientError.of(exc) from None
    log.info("submit: %s -> %s", payload["path"], handle.run_id)
    from notebookops.render import prewarm

    prewarm()  # the monitor renders finished notebooks; get nbconvert ready meanwhile
    for warning in warnings:
        log.warning("submit: %s: %s", payload["path"], warning)
    lines = [f"submitted {payload['path']}: {handle.portal_url or handle.run_id}"]
    client = _devops(payload)
    _tell(client, lines + [f"warning: {payload['path']}: {w}" for w in warnings])
    answer = {"ok": True, "handle": handle.to_dict(), "pollPolicy": _poll_policy(backend).to_dict()}
    return _disabled(client, answer | ({"warnings": warnings} if warnings else {}))


def _poll_policy(backend: Any) -> Any:
    """The backend's poll policy, with the event race once run events are set up for it."""
    from notebookops import run_events

    if getattr(backend, "pushes_events", False) and run_events.events_enabled():
        return run_events.with_push(backend.poll_policy)
    return backend.poll_policy


def _parameter_warnings(payload: dict[str, Any], checkout: Path) -> list[str]:
    """A parameter the notebook's parameters cell does not assign: papermill would inject it
    and run on, so a misspelt name would pass silently."""
    from notebookops.parameters import unknown_parameters

    given = payload.get("parameters") or {}
    if not given:
        return []
    try:
        unknown = unknown_parameters(checkout / payload["path"], given)
    except (OSError, ValueError) as exc:  # unreadable here: the backend reports it properly
        log.info("submit: %s: parameters not checked: %s", payload["path"], exc)
        return []
    if not unknown:
        return []
    names = ", ".join(unknown)
    return [
        f"unknown parameter{'s' if len(unknown) > 1 else ''} {names}: not assigned in the "
        "notebook's parameters cell"
        + (
            ""
            if payload.get("strictParameters")
            else " (strictParameters: true makes this an error)"
        )
    ]


class TransientError(Exception):
    """A failure worth retrying, its text redacted: `Type: message` of the original error."""

    @classmethod
    def of(cls, exc: BaseException) -> TransientError:
        return cls(redact.redact_known(f"{type(exc).__name__}: {exc}"))


def _tags(payload: dict[str, Any]) -> dict[str, str]:
    devops = payload.get("devops") or {}
    tags = {
        "notebookops.instance": payload["instanceId"],
        "notebookops.notebook": payload["path"],
        "notebookops.commit": payload["commit"],
    }
    for key in ("planId", "jobId", "buildId"):
        if devops.get(key):
            tags[f"devops.{key}"] = str(devops[key])
    return tags


def monitor(payload: dict[str, Any]) -> dict[str, Any]:
    """One round over the runs still pending: cancel what must stop, read every status, and
    fetch the executed notebook of each run that finished."""
    from notebookops.compute.base import RunHandle

    _wait_for_change(payload)
    results = []
    checkout = payload.get("checkout")
    for stop in payload.get("cancel", []):
        results.append(_stop(payload["instanceId"], stop, checkout))
    orphans = [_cancel_orphan(payload["instanceId"], o) for o in payload.get("orphans") or []]
    for run in payload.get("runs", []):
        handle = RunHandle.from_dict(run["handle"])
        try:
            results.append(_observe(payload["instanceId"], run["path"], handle, checkout))
        except Exception as exc:  # one unreachable run must not hide the others' progress
            log.warning("monitor: %s: %s", run["path"], redact.redact_known(str(exc)))
            results.append(
                {
                    "path": run["path"],
                    "state": None,
                    "message": f"status unavailable: {redact.redact_known(str(exc))}",
                }
            )
    client = _devops(payload)
    _tell(client, [_end_line(r) for r in results if r.get("state") in _TERMINAL])
    answer: dict[str, Any] = {"runs": results}
    if orphans:
        answer["orphans"] = orphans
    if payload.get("checkPipeline") and client is not None:
        answer["pipeline"] = _pipeline_state(client)
    return _disabled(client, answer)


_TERMINAL = {"succeeded", "failed", "canceled", "timedOut"}


def _end_line(result: dict[str, Any]) -> str:
    from notebookops.report import error_line

    seconds = result.get("durationSeconds")
    took = f" in {seconds:.1f}s" if seconds is not None else ""
    detail = error_line(result)
    return f"finished {result['path']}: {result['state']}{took}" + (f": {detail}" if detail else "")


def _pipeline_state(client: Any) -> str:
    """'waiting', 'gone' (the task record says it finished: cancelled or timed out) or
    'unknown'. Only the record read decides: a refused feed or log never means 'gone'."""
    return client.pipeline_state()


def _wait_for_change(payload: dict[str, Any]) -> None:
    """Long poll: a backend that can watch its runs waits for a change before the round reads
    them, instead of the orchestrator sleeping on a timer (see PollPolicy.long_poll_seconds)."""
    from notebookops.compute.base import RunHandle

    wait = float(payload.get("waitSeconds") or 0)
    runs = payload.get("runs") or []
    if wait <= 0 or not runs:
        return
    handles = [RunHandle.from_dict(r["handle"]) for r in runs]
    backend = _backend(handles[0])
    if hasattr(backend, "wait_for_change"):
        try:
            backend.wait_for_change(handles, min(wait, MAX_LONG_POLL_SECONDS))
        except Exception as exc:  # waiting is an optimisation; the round still reads statuses
            log.warning("monitor: waiting for a change failed: %s", redact.redact_known(str(exc)))


MAX_LONG_POLL_SECONDS = 30.0


def _backend(handle: Any) -> Any:
    from notebookops.compute.registry import get_backend

    return get_backend(handle.backend)


def _stop(instance_id: str, stop: dict[str, Any], checkout: str | None = None) -> dict[str, Any]:
    from notebookops.compute.base import RunHandle

    handle = RunHandle.from_dict(stop["handle"])
    backend = _backend(handle)
    status = backend.status(handle)
    if status.terminal:  # it ended on its own meanwhile: its own verdict stands
        return _describe(instance_id, stop["path"], handle, backend, status, checkout)
    backend.cancel(handle)
    status = backend.status(handle)
    # The orchestrator decided why it stopped (deadline or failFast): report that.
    return {
        **_describe(instance_id, stop["path"], handle, backend, status, checkout),
        "state": stop["state"],
        "message": stop["message"],
        "stopped": True,
    }


def _cancel_orphan(instance_id: str, orphan: dict[str, Any]) -> dict[str, Any]:
    """Cancel, by its run key, the run a submit may have created before its answer was lost
    (its retries then all failed, so there is no handle). Never raises: the orchestrator
    tries again when the run stops. `outcome`: canceled, absent (no such run: nothing was
    created, or it is gone), finished (it ended on its own), unsupported or error."""
    from notebookops.compute.base import run_key
    from notebookops.compute.registry import get_backend

    path = orphan["path"]
    key = run_key(instance_id, path)
    try:
        backend = get_backend((orphan.get("compute") or {}).get("backend"))
        if not hasattr(backend, "find_run"):
            return {"path": path, "outcome": "unsupported", "runId": key}
        handle = backend.find_run(orphan.get("compute") or {}, key, path)
        if handle is None:
            return {"path": path, "outcome": "absent", "runId": key}
        if backend.status(handle).terminal:
            return {"path": path, "outcome": "finished", "runId": key}
        backend.cancel(handle)
    except Exception as exc:
        error = redact.redact_known(f"{type(exc).__name__}: {exc}")
        log.warning("monitor: %s: run %s not canceled: %s", path, key, error)
        return {"path": path, "outcome": "error", "runId": key, "error": error}
    log.info("monitor: %s: canceled run %s, created by a submit whose answer was lost", path, key)
    return {"path": path, "outcome": "canceled", "runId": key}


def _running_cell(path: str | None, committed_path: Path | None = None) -> int | None:
    from notebookops.notebook_errors import load_notebook_json, running_cell_index

    nb = load_notebook_json(Path(path)) if path else None
    committed = load_notebook_json(committed_path) if committed_path else None
    return running_cell_index(nb, committed) if nb else None


def _observe(
    instance_id: str, path: str, handle: Any, checkout: str | None = None
) -> dict[str, Any]:
    backend = _backend(handle)
    return _describe(instance_id, path, handle, backend, backend.status(handle), checkout)


def _describe(
    instance_id: str,
    path: str,
    handle: Any,
    backend: Any,
    status: Any,
    checkout: str | None = None,
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "path": path,
        "state": status.state,
        "message": status.message,
        "error": status.error.to_dict() if status.error else None,
        "startedAt": status.started_at,  # execution start: the notebook's deadline counts from it
    }
    if status.started_at and status.ended_at:
        result["durationSeconds"] = round(
            (_parse(status.ended_at) - _parse(status.started_at)).total_seconds(), 3
        )
    if status.terminal:
        dest = output_root(instance_id) / "notebooks" / PurePosixPath(path)
        fetched = backend.fetch_output(handle, dest)
        result["outputNotebook"] = str(fetched) if fetched else None
        if status.state == "canceled":
            # Stopped from outside (a deadline, the service's own timeout): where it was.
            committed = Path(checkout) / path if checkout else None
            result["runningCell"] = _running_cell(result["outputNotebook"], committed)
        if fetched and result["error"] and checkout:
            result["error"] = _numbered_against_commit(
                result["error"], Path(fetched), Path(checkout) / path, backend
            )
        if fetched:
            # Every backend's notebook lands here: render it and read its cell times once.
            from notebookops.render import describe_output

            result.update(describe_output(Path(fetched), path, status.state))
    return result


def _numbered_against_commit(
    error: dict[str, Any], executed: Path, committed_path: Path, backend: Any
) -> dict[str, Any]:
    """A backend that sees only the executed notebook (Azure ML) counts its cells, in which
    papermill may have added or stripped some; count the failing cell against the notebook as
    committed instead, as the local backend does itself."""
    if getattr(backend, "numbers_cells_against_commit", False):
        return error
    from notebookops.notebook_errors import error_from_file, load_notebook_json

    committed = load_notebook_json(committed_path)
    renumbered = error_from_file(executed, committed) if committed else None
    if renumbered is None or renumbered.ename != error.get("ename"):
        return error  # not the failure the backend saw: keep the backend's own account
    return {**error, "cellIndex": renumbered.cell_index}


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def report(payload: dict[str, Any]) -> dict[str, Any]:
    """Talk to the waiting pipeline, one phase per call (each safe to run twice):

    - ``started``: TaskStarted, the job log, the first lines (all best effort);
    - ``publish``: the final table, test results and the summary tab (best effort, once);
    - ``deliver``: one bounded TaskCompleted attempt; the orchestrator retries on timers.

    Without callback values it only logs.
    """
    client = _devops(payload)
    phase = payload.get("phase", "completed")
    if phase == "started":
        return _report_started(client, payload)
    if phase == "deliver":
        return _deliver(client, payload)
    summary = payload["summary"]
    table = summary_lines(summary)
    log.info("run %s finished: %s\n%s", summary["instanceId"], summary["result"], "\n".join(table))
    if client is None:
        return {"published": False}
    if client.results_reported():
        log.info("run %s: the final table was already posted", summary["instanceId"])
    else:
        _tell(client, table)
        client.mark_results_reported()
    # Nothing below may raise: a retried activity would post the final table a second time.
    try:
        client.publish_test_results(summary, _output_resolver(summary))
    except Exception as exc:
        log.warning("test results not published: %s", redact.redact_known(str(exc)))
    _attach_summary(client, summary, payload.get("statusUrl"))
    return _disabled(client, {"published": True})


def _attach_summary(client: Any, summary: dict[str, Any], status_url: str | None) -> None:
    from notebookops.devops.summary import summary_markdown

    try:
        markdown = summary_markdown(summary, status_url)
    except Exception as exc:  # the summary tab is decoration; a bug here must not cost the run
        log.warning("summary tab not written: %s", redact.redact_known(str(exc)))
        return
    client.attach_summary(markdown)


def _deliver(client: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """One TaskCompleted attempt, plus a look at the task record when it did not land: the
    record is what says the task stopped waiting (or that an earlier attempt whose answer
    was lost got through)."""
    if client is None:
        return {"outcome": "rejected", "error": "no callback values", "status": None}
    result = payload["result"]
    answer = client.try_task_completed(result)
    if answer["outcome"] in ("rejected", "unavailable"):
        answer["record"] = _record(client)
    attempt = payload.get("attempt")
    log.info(
        "%s",
        redact.redact_known(
            f"TaskCompleted({result}) attempt {attempt}: {answer['outcome']}"
            + (f" ({answer['error']})" if answer.get("error") else "")
        ),
    )
    return answer


def _record(client: Any) -> dict[str, Any] | None:
    from notebookops.devops.transport import DevOpsError

    try:
        return client.task_record()
    except DevOpsError:
        return None


def _report_started(client: Any, payload: dict[str, Any]) -> dict[str, Any]:
    if client is None:
        return {"logId": None}
    lines = list(payload.get("lines") or [])
    client.task_started()
    log_id = client.ensure_log(payload.get("logId"))
    _tell(client, lines)
    return _disabled(client, {"logId": log_id})


def summary_lines(summary: dict[str, Any]) -> list[str]:
    from notebookops.report import summary_table

    return summary_table(summary).splitlines()


def _output_resolver(summary: dict[str, Any]) -> Any:
    def resolve(notebook: dict[str, Any]) -> Path | None:
        path = notebook.get("outputNotebook")
        return Path(path) if path and Path(path).is_file() else None

    return resolve
