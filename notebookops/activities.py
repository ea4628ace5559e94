"""What each activity does, as plain functions over the JSON the orchestrator sends.

Each reads its input with the declaration in notebookops.payloads (checked there: a bad
value names its field) and answers with one, as JSON; the orchestrator sees only dicts.

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
from typing import TYPE_CHECKING, Any

from notebookops import redact, sealing

if TYPE_CHECKING:
    from notebookops.payloads import (
        Observation,
        Orphan,
        OrphanOutcome,
        Reporting,
        ReportInput,
        StopRun,
        SubmitInput,
    )

log = logging.getLogger("notebookops")
OUTPUT_DIR_SETTING = "NOTEBOOKOPS_OUTPUT_DIR"


def _token(payload: Reporting) -> str | None:
    token = sealing.unseal(payload.auth)
    if token:
        redact.register_secret(token)
    return token


def _git_auth(url: str, payload: Reporting) -> Any:
    from notebookops.gitauth import GitAuth

    plan_url = (payload.devops or {}).get("planUrl")
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


def _devops(payload: Reporting) -> Any:
    """The pipeline's callback client, or None when the run has no callback values.

    ``payload.disabled`` carries the side-call kinds an earlier activity saw refused, so
    each rejection is logged once per run and never knocked on again."""
    devops = payload.devops
    token = _token(payload)
    if not devops or not token:
        return None
    from notebookops.devops.client import DevOpsClient
    from notebookops.request import Callback

    callback = Callback.from_dict({**devops, "authToken": token})
    return DevOpsClient.from_callback(
        callback,
        log_id=payload.log_id,
        disabled=payload.disabled,
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


def _newly_disabled(client: Any) -> dict[str, str] | None:
    """Side-call kinds refused in this activity, to hand back to the orchestrator."""
    return dict(client.newly_disabled) if client is not None and client.newly_disabled else None


def _refused(exc: BaseException) -> dict[str, Any]:
    from notebookops.payloads import Refusal

    return Refusal(error=redact.redact_known(str(exc))).to_dict()


def clone(payload: dict[str, Any]) -> dict[str, Any]:
    from notebookops.payloads import CloneInput, CloneOutput
    from notebookops.repo import RepoError, resolve_and_checkout

    job = CloneInput.from_dict(payload)
    repository = job.repository
    try:
        result = resolve_and_checkout(
            repository.url,
            repository.ref or "main",
            repository.commit,
            job.patterns,
            auth=_git_auth(repository.url, job),
        )
    except RepoError as exc:
        if exc.permanent:
            return _refused(exc)
        raise
    log.info(
        "clone: %s at %s, %d notebook(s)",
        repository.url,
        result.commit[:12],
        len(result.notebooks),
    )
    return CloneOutput(**vars(result)).to_dict()


def submit(payload: dict[str, Any], send_event_url: str | None = None) -> dict[str, Any]:
    """`send_event_url`: where this instance takes run events (from ActivitySubmit's durable
    client binding); a backend whose runner announces its own end uses it."""
    from notebookops.compute.base import PermanentBackendError, RunSpec, run_key
    from notebookops.compute.registry import get_backend
    from notebookops.payloads import Refusal, SubmitInput, SubmitOutput
    from notebookops.repo import RepoError, ensure_checkout

    job = SubmitInput.from_dict(payload)
    try:
        backend = get_backend(job.compute.get("backend"))
        checkout = ensure_checkout(job.repository, job.commit, auth=_git_auth(job.repository, job))
        warnings = _parameter_warnings(job, Path(checkout))
        if warnings and job.strict_parameters:
            return Refusal(error=warnings[0], ename="UnknownParameter").to_dict()
        spec = RunSpec(
            run_key=run_key(job.instance_id, job.path),
            instance_id=job.instance_id,
            notebook=job.path,
            checkout=str(checkout),
            commit=job.commit,
            parameters=job.parameters,
            timeout_seconds=job.timeout_seconds,
            compute=job.compute,
            tags=_tags(job),
        )
        if send_event_url and getattr(backend, "announces_own_ends", False):
            handle = backend.submit(spec, send_event_url=send_event_url)
        else:
            handle = backend.submit(spec)
    except PermanentBackendError as exc:
        return _refused(exc)
    except RepoError as exc:
        if exc.permanent:
            return _refused(exc)
        raise TransientError.of(exc) from None
    except Exception as exc:
        # Retried by the host; after the last attempt its text becomes that notebook's error
        # in the summary, so it is redacted here, where the secrets are known.
        raise TransientError.of(exc) from None
    log.info("submit: %s -> %s", job.path, handle.run_id)
    from notebookops.render import prewarm

    prewarm()  # the monitor renders finished notebooks; get nbconvert ready meanwhile
    for warning in warnings:
        log.warning("submit: %s: %s", job.path, warning)
    lines = [f"submitted {job.path}: {handle.portal_url or handle.run_id}"]
    client = _devops(job)
    _tell(client, lines + [f"warning: {job.path}: {w}" for w in warnings])
    return SubmitOutput(
        handle=handle,
        poll_policy=_poll_policy(backend, send_event_url),
        warnings=warnings or None,
        disabled=_newly_disabled(client),
    ).to_dict()


def _poll_policy(backend: Any, send_event_url: str | None) -> Any:
    """The backend's poll policy, with the event race once run events reach the instance."""
    from notebookops import run_events

    return run_events.policy_for(backend, send_event_url)


def _parameter_warnings(job: SubmitInput, checkout: Path) -> list[str]:
    """A parameter the notebook's parameters cell does not assign: papermill would inject it
    and run on, so a misspelt name would pass silently."""
    from notebookops.parameters import unknown_parameters

    given = job.parameters
    if not given:
        return []
    try:
        unknown = unknown_parameters(checkout / job.path, given)
    except (OSError, ValueError) as exc:  # unreadable here: the backend reports it properly
        log.info("submit: %s: parameters not checked: %s", job.path, exc)
        return []
    if not unknown:
        return []
    names = ", ".join(unknown)
    return [
        f"unknown parameter{'s' if len(unknown) > 1 else ''} {names}: not assigned in the "
        "notebook's parameters cell"
        + ("" if job.strict_parameters else " (strictParameters: true makes this an error)")
    ]


class TransientError(Exception):
    """A failure worth retrying, its text redacted: `Type: message` of the original error."""

    @classmethod
    def of(cls, exc: BaseException) -> TransientError:
        return cls(redact.redact_known(f"{type(exc).__name__}: {exc}"))


def _tags(job: SubmitInput) -> dict[str, str]:
    devops = job.devops or {}
    tags = {
        "notebookops.instance": job.instance_id,
        "notebookops.notebook": job.path,
        "notebookops.commit": job.commit,
    }
    for key in ("planId", "jobId", "buildId"):
        if devops.get(key):
            tags[f"devops.{key}"] = str(devops[key])
    return tags


def monitor(payload: dict[str, Any]) -> dict[str, Any]:
    """One round over the runs still pending: cancel what must stop, read every status, and
    fetch the executed notebook of each run that finished."""
    from notebookops.payloads import MonitorInput, MonitorOutput, Observation

    job = MonitorInput.from_dict(payload)
    _wait_for_change(job.runs, job.wait_seconds)
    results = [_stop(job.instance_id, stop, job.checkout) for stop in job.cancel]
    orphans = [_cancel_orphan(job.instance_id, orphan) for orphan in job.orphans]
    for run in job.runs:
        try:
            seen = _observe(job.instance_id, run.path, run.handle, job.checkout)
            if not _news(seen, run.seen):
                continue
            results.append(seen)
        except Exception as exc:  # one unreachable run must not hide the others' progress
            log.warning("monitor: %s: %s", run.path, redact.redact_known(str(exc)))
            results.append(
                Observation(
                    path=run.path,
                    state=None,
                    message=f"status unavailable: {redact.redact_known(str(exc))}",
                )
            )
    client = _devops(job)
    _tell(client, [_end_line(r.to_dict()) for r in results if r.state in _TERMINAL])
    pipeline = _pipeline_state(client) if job.check_pipeline and client is not None else None
    return MonitorOutput(
        runs=results,
        orphans=orphans or None,
        pipeline=pipeline,
        disabled=_newly_disabled(client),
    ).to_dict()


_TERMINAL = {"succeeded", "failed", "canceled", "timedOut"}


def _news(seen: Observation, known: str | None) -> bool:
    """Whether the orchestrator needs this observation: a run still in the state it last saw
    (`known`, WatchRun.seen), with nothing else to say, is left out of the answer. The answer
    lands in the orchestration's history, which every later episode of the generation parses
    again; most runs of a round are still running."""
    from notebookops.payloads import Observation

    if known is None or seen.state != known or seen.state in _TERMINAL:
        return True
    quiet = Observation(path=seen.path, state=seen.state, started_at=seen.started_at)
    return seen != quiet


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


def _wait_for_change(runs: list[Any], wait: float) -> None:
    """Long poll: a backend that can watch its runs waits for a change before the round reads
    them, instead of the orchestrator sleeping on a timer (see PollPolicy.long_poll_seconds)."""
    if wait <= 0 or not runs:
        return
    handles = [run.handle for run in runs]
    backend = _backend(handles[0])
    if hasattr(backend, "wait_for_change"):
        try:
            known = [r.seen for r in runs]
            backend.wait_for_change(handles, min(wait, MAX_LONG_POLL_SECONDS), known)
        except Exception as exc:  # waiting is an optimisation; the round still reads statuses
            log.warning("monitor: waiting for a change failed: %s", redact.redact_known(str(exc)))


MAX_LONG_POLL_SECONDS = 30.0


def _backend(handle: Any) -> Any:
    from notebookops.compute.registry import get_backend

    return get_backend(handle.backend)


def _stop(instance_id: str, stop: StopRun, checkout: str | None = None) -> Observation:
    handle = stop.handle
    backend = _backend(handle)
    status = backend.status(handle)
    if status.terminal:  # it ended on its own meanwhile: its own verdict stands
        return _describe(instance_id, stop.path, handle, backend, status, checkout)
    backend.cancel(handle)
    status = backend.status(handle)
    # The orchestrator decided why it stopped (deadline or failFast): report that.
    seen = _describe(instance_id, stop.path, handle, backend, status, checkout)
    seen.state, seen.message, seen.stopped = stop.state, stop.message, True
    return seen


def _cancel_orphan(instance_id: str, orphan: Orphan) -> OrphanOutcome:
    """Cancel, by its run key, the run a submit may have created before its answer was lost
    (its retries then all failed, so there is no handle). Never raises: the orchestrator
    tries again when the run stops. `outcome`: canceled, absent (no such run: nothing was
    created, or it is gone), finished (it ended on its own), unsupported or error."""
    from notebookops.compute.base import run_key
    from notebookops.compute.registry import get_backend
    from notebookops.payloads import OrphanOutcome

    path = orphan.path
    key = run_key(instance_id, path)
    try:
        backend = get_backend(orphan.compute.get("backend"))
        if not hasattr(backend, "find_run"):
            return OrphanOutcome(path=path, outcome="unsupported", run_id=key)
        handle = backend.find_run(orphan.compute, key, path)
        if handle is None:
            return OrphanOutcome(path=path, outcome="absent", run_id=key)
        if backend.status(handle).terminal:
            return OrphanOutcome(path=path, outcome="finished", run_id=key)
        backend.cancel(handle)
    except Exception as exc:
        error = redact.redact_known(f"{type(exc).__name__}: {exc}")
        log.warning("monitor: %s: run %s not canceled: %s", path, key, error)
        return OrphanOutcome(path=path, outcome="error", run_id=key, error=error)
    log.info("monitor: %s: canceled run %s, created by a submit whose answer was lost", path, key)
    return OrphanOutcome(path=path, outcome="canceled", run_id=key)


def _running_cell(path: str | None, committed_path: Path | None = None) -> int | None:
    from notebookops.notebook_errors import load_notebook_json, running_cell_index

    nb = load_notebook_json(Path(path)) if path else None
    committed = load_notebook_json(committed_path) if committed_path else None
    return running_cell_index(nb, committed) if nb else None


def _observe(instance_id: str, path: str, handle: Any, checkout: str | None = None) -> Observation:
    backend = _backend(handle)
    return _describe(instance_id, path, handle, backend, backend.status(handle), checkout)


def _describe(
    instance_id: str,
    path: str,
    handle: Any,
    backend: Any,
    status: Any,
    checkout: str | None = None,
) -> Observation:
    from notebookops.payloads import Observation, SlowCell

    seen = Observation(
        path=path,
        state=status.state,
        message=status.message,
        error=status.error,
        started_at=status.started_at,
    )
    if status.started_at and status.ended_at:
        seen.duration_seconds = round(
            (_parse(status.ended_at) - _parse(status.started_at)).total_seconds(), 3
        )
    if not status.terminal:
        return seen
    dest = output_root(instance_id) / "notebooks" / PurePosixPath(path)
    fetched = backend.fetch_output(handle, dest)
    seen.output_notebook = str(fetched) if fetched else None
    if status.state == "canceled":
        # Stopped from outside (a deadline, the service's own timeout): where it was.
        committed = Path(checkout) / path if checkout else None
        seen.running_cell = _running_cell(seen.output_notebook, committed)
    if fetched and seen.error and checkout:
        seen.error = _numbered_against_commit(
            seen.error, Path(fetched), Path(checkout) / path, backend
        )
    if fetched:
        # Every backend's notebook lands here: render it and read its cell times once.
        from notebookops.render import describe_output

        described = describe_output(Path(fetched), path, status.state)
        seen.output_html = described.get("outputHtml")
        seen.execution_seconds = described.get("executionSeconds")
        if described.get("slowestCells") is not None:
            seen.slowest_cells = [
                SlowCell(cell_index=c["cellIndex"], seconds=c["seconds"])
                for c in described["slowestCells"]
            ]
    return seen


def _numbered_against_commit(error: Any, executed: Path, committed_path: Path, backend: Any) -> Any:
    """A backend that sees only the executed notebook (Azure ML) counts its cells, in which
    papermill may have added or stripped some; count the failing cell against the notebook as
    committed instead, as the local backend does itself."""
    if getattr(backend, "numbers_cells_against_commit", False):
        return error
    from dataclasses import replace

    from notebookops.notebook_errors import error_from_file, load_notebook_json

    committed = load_notebook_json(committed_path)
    renumbered = error_from_file(executed, committed) if committed else None
    if renumbered is None or renumbered.ename != error.ename:
        return error  # not the failure the backend saw: keep the backend's own account
    return replace(error, cell_index=renumbered.cell_index)


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def report(payload: dict[str, Any]) -> dict[str, Any]:
    """Talk to the waiting pipeline, one phase per call (each safe to run twice):

    - ``started``: TaskStarted, the job log, the first lines (all best effort);
    - ``publish``: the final table, test results and the summary tab (best effort, once);
    - ``deliver``: one bounded TaskCompleted attempt; the orchestrator retries on timers.

    Without callback values it only logs.
    """
    from notebookops.payloads import Published, ReportInput

    job = ReportInput.from_dict(payload)
    client = _devops(job)
    if job.phase == "started":
        return _report_started(client, job)
    if job.phase == "deliver":
        return _deliver(client, job)
    summary = job.summary or {}
    table = summary_lines(summary)
    log.info("run %s finished: %s\n%s", summary["instanceId"], summary["result"], "\n".join(table))
    if client is None:
        return Published(published=False).to_dict()
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
    _attach_summary(client, summary, job.status_url)
    return Published(published=True, disabled=_newly_disabled(client)).to_dict()


def _attach_summary(client: Any, summary: dict[str, Any], status_url: str | None) -> None:
    from notebookops.devops.summary import summary_markdown

    try:
        markdown = summary_markdown(summary, status_url)
    except Exception as exc:  # the summary tab is decoration; a bug here must not cost the run
        log.warning("summary tab not written: %s", redact.redact_known(str(exc)))
        return
    client.attach_summary(markdown)


def _deliver(client: Any, job: ReportInput) -> dict[str, Any]:
    """One TaskCompleted attempt, plus a look at the task record when it did not land: the
    record is what says the task stopped waiting (or that an earlier attempt whose answer
    was lost got through)."""
    from notebookops.payloads import Delivery

    if client is None:
        return Delivery(outcome="rejected", error="no callback values").to_dict()
    answer = Delivery(**_snake(client.try_task_completed(job.result)))
    if answer.outcome in ("rejected", "unavailable"):
        answer.record = _record(client)
    log.info(
        "%s",
        redact.redact_known(
            f"TaskCompleted({job.result}) attempt {job.attempt}: {answer.outcome}"
            + (f" ({answer.error})" if answer.error else "")
        ),
    )
    return answer.to_dict()


def _snake(answer: dict[str, Any]) -> dict[str, Any]:
    return {"retry_after" if key == "retryAfter" else key: value for key, value in answer.items()}


def _record(client: Any) -> dict[str, Any] | None:
    from notebookops.devops.transport import DevOpsError

    try:
        return client.task_record()
    except DevOpsError:
        return None


def _report_started(client: Any, job: ReportInput) -> dict[str, Any]:
    from notebookops.payloads import Started

    if client is None:
        return Started(log_id=None).to_dict()
    client.task_started()
    log_id = client.ensure_log(job.log_id)
    _tell(client, job.lines)
    return Started(log_id=log_id, disabled=_newly_disabled(client)).to_dict()


def summary_lines(summary: dict[str, Any]) -> list[str]:
    from notebookops.report import summary_table

    return summary_table(summary).splitlines()


def _output_resolver(summary: dict[str, Any]) -> Any:
    def resolve(notebook: dict[str, Any]) -> Path | None:
        path = notebook.get("outputNotebook")
        return Path(path) if path and Path(path).is_file() else None

    return resolve
