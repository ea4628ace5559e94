"""Report to the waiting Azure DevOps pipeline task: plan events, live feed, job log, task state.

Protocol: /work/shared/reference/devops-protocol.md §2-§5 (URLs, bodies, casing); routes, bodies
and api-versions as the services' published Swagger files declare them
(/work/shared/reference/specs/), or, for the routes those files leave out (feed, record read,
record attachments), as the official azure-devops Python SDK's TaskClient calls them.

Two kinds of calls, with different rules:

- **TaskCompleted decides delivery.** ``try_task_completed`` makes one bounded attempt and says
  what happened (accepted, retry later, or stopped); the orchestrator waits on durable timers
  between attempts. Only its own answers, and the task's timeline record, decide the outcome.
- **Side calls never decide anything** (TaskStarted, feed, log, record attach, test results,
  summary): they never raise for what the service answers; a rejection (4xx, or an
  authentication failure) is logged once and disables only that kind of call.

Every call sends ``X-TFS-FedAuthRedirect: Suppress`` (as the official SDK does), so an expired
token gets 401 instead of a sign-in page; a 203, a 3xx or an HTML page where JSON was expected
is an authentication failure all the same, never success. The pipeline token is registered for
redaction and appears in no log line, exception text or repr.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import requests

from notebookops.redact import MASK, redact, register_secret

if TYPE_CHECKING:
    from notebookops.request import Callback

__all__ = [
    "SIDE_CALLS",
    "TASK_RESULTS",
    "CallbackAuthFailed",
    "CallbackRejected",
    "CallbackUnavailable",
    "DevOpsClient",
    "DevOpsError",
]

log = logging.getLogger(__name__)

# Swagger (specs/azure-devops-distributedtask-7.1.json): Events_Post, Logs_Create, Logs_Append
# and Records_Update are declared with api-version 7.1.
EVENTS_API_VERSION = "7.1"
LOGS_API_VERSION = "7.1"
RECORDS_API_VERSION = "7.1"
# Not in the Swagger file: TaskClient.get_records and create_attachment (v7_1 SDK) use
# 7.1-preview.1; the feed keeps ServerTaskHelper's 4.1 (the v7_1 SDK has no feed call).
RECORDS_READ_API_VERSION = "7.1-preview.1"
ATTACHMENTS_API_VERSION = "7.1-preview.1"
FEED_API_VERSION = "4.1"
SUMMARY_ATTACHMENT_TYPE = "Distributedtask.Core.Summary"
# The task record's currentOperation once the final table is out (TimelineRecord declares it).
REPORTED_MARK = "notebookops: results reported, completing the task"

TASK_RESULTS = ("succeeded", "succeededWithIssues", "failed", "canceled")
# The kinds of best-effort calls; each is disabled on its own after a rejection.
SIDE_CALLS = ("started", "feed", "log", "attach", "tests", "summary", "record")
FEED_LINE_MAX = 1024  # §3.1: longer lines are cut by the server-side helper anyway
FEED_BATCH = 100
_TRUNCATED = "…"
_RETRYABLE_4XX = (408, 429)
_AUTH_STATUSES = (401, 403)
_SHOWN_BODY_CHARS = 300
WAITING_STATES = ("pending", "inprogress")


class DevOpsError(Exception):
    """A call to Azure DevOps that did not succeed; the message never contains the token."""

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.operation = operation
        self.status = status
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self), self.operation, self.status))


def _rebuild(cls: type[DevOpsError], message: str, operation: str, status: int | None) -> Any:
    return cls(message, operation=operation, status=status)


class CallbackRejected(DevOpsError):
    """A 4xx other than 408/429: this call will not succeed by trying again."""


class CallbackAuthFailed(CallbackRejected):
    """401/403, a 203 sign-in page, a redirect or HTML instead of JSON: the token was refused."""


class CallbackUnavailable(DevOpsError):
    """5xx/408/429/network errors persisted through every retry of one call."""


class DevOpsClient:
    """One pipeline task's callback: build it from the callback values and call it directly.

    ``disabled`` maps side-call kinds (SIDE_CALLS) to the reason they were turned off; pass the
    mapping an earlier activity returned so a rejected kind stays off for the whole run, and
    read ``newly_disabled`` after the calls to hand it on.
    """

    def __init__(
        self,
        plan_url: str,
        project_id: str,
        hub_name: str,
        plan_id: str,
        job_id: str,
        timeline_id: str,
        task_instance_id: str,
        auth_token: str,
        *,
        build_id: str | None = None,
        timeout: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = 5,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        log_id: int | None = None,
        disabled: Mapping[str, str] | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        session: requests.Session | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.plan_url = plan_url
        self.project_id = project_id
        self.hub_name = hub_name
        self.plan_id = plan_id
        self.job_id = job_id
        self.timeline_id = timeline_id
        self.task_instance_id = task_instance_id
        self.build_id = build_id
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.log_id = log_id
        self.disabled: dict[str, str] = dict(disabled or {})
        self.newly_disabled: dict[str, str] = {}
        self._token = auth_token
        self._sleep = sleep
        self._now = now
        self._session = session or requests.Session()
        self._completed = False
        # Masks the token in every log record of the process, whoever logs it.
        register_secret(auth_token)
        # §2.1: PlanUrl (System.CollectionUri) normally ends with "/"; never produce "//".
        self.collection_url = plan_url.rstrip("/")
        self.plan_base = "/".join(
            (
                self.collection_url,
                _segment(project_id),
                "_apis/distributedtask/hubs",
                _segment(hub_name),
                "plans",
                _segment(plan_id),
            )
        )
        self.project_base = f"{self.collection_url}/{_segment(project_id)}"
        self.timeline_base = f"{self.plan_base}/timelines/{_segment(timeline_id)}"

    @classmethod
    def from_callback(cls, callback: Callback, **options: Any) -> DevOpsClient:
        options.setdefault("build_id", callback.build_id)
        return cls(
            callback.plan_url,
            callback.project_id,
            callback.hub_name,
            callback.plan_id,
            callback.job_id,
            callback.timeline_id,
            callback.task_instance_id,
            callback.auth_token,
            **options,
        )

    def __repr__(self) -> str:
        return (
            f"DevOpsClient(plan_url={self.plan_url!r}, project_id={self.project_id!r}, "
            f"hub_name={self.hub_name!r}, plan_id={self.plan_id!r}, job_id={self.job_id!r}, "
            f"timeline_id={self.timeline_id!r}, task_instance_id={self.task_instance_id!r}, "
            f"build_id={self.build_id!r}, auth_token={MASK!r})"
        )

    # -- side calls: best effort, one rejection turns off one kind ----------------------------

    def side_call(self, kind: str, operation: str, *args: Any, **kwargs: Any) -> Any:
        """``call`` for a best-effort kind: None instead of raising, whatever the answer.

        A rejection (4xx, authentication failure) disables ``kind`` for the rest of the run and
        is logged once; an outage is logged and the next call of the kind tries again.
        """
        if kind in self.disabled:
            return None
        # Best effort never waits long: one quick retry, no long Retry-After sleeps.
        kwargs.setdefault("attempts", min(2, self.max_attempts))
        kwargs.setdefault("max_delay", self.backoff_base * 2)
        try:
            return self.call(operation, *args, **kwargs)
        except CallbackRejected as exc:
            self.disable(kind, str(exc))
        except DevOpsError as exc:
            log.warning("%s (best effort, the run goes on)", exc)
        return None

    def disable(self, kind: str, reason: str) -> None:
        if kind in self.disabled:
            return
        line = _one_line(reason)
        self.disabled[kind] = line
        self.newly_disabled[kind] = line
        log.warning("%s; no more %s calls for this run (they never decide the verdict)", line, kind)

    # -- plan events (§2) ---------------------------------------------------------------------

    def task_started(self) -> bool:
        """Tell the pipeline the task has started (cosmetic: no timeout is armed on it)."""
        event = {"name": "TaskStarted", "taskId": self.task_instance_id, "jobId": self.job_id}
        return self._event_call(event, kind="started") is not None

    def task_completed(self, result: str) -> None:
        """Complete the waiting task with in-call retries; raises DevOpsError when it did not land.

        A second call on the same client sends nothing: a duplicate TaskCompleted has unknown
        effects on the server (§5). The app itself uses ``try_task_completed`` on durable timers.
        """
        event = self._completed_event(result)
        if self._completed:
            log.warning(
                "TaskCompleted was already sent for task %s; not sending it again",
                self.task_instance_id,
            )
            return
        self._event_call(event)
        self._completed = True

    def try_task_completed(self, result: str) -> dict[str, Any]:
        """One bounded TaskCompleted attempt (no retry inside); what happened, as JSON.

        ``outcome``: ``accepted`` (2xx), ``unavailable`` (5xx/408/429/network/timeout: try
        again later, ``retryAfter`` when the server said so), ``auth`` (the token was refused:
        401/403/203/3xx/HTML) or ``rejected`` (another 4xx: the task no longer waits). ``error``
        is one readable line without the token, ``status`` the HTTP status if any.
        """
        event = self._completed_event(result)
        try:
            self._event_call(event, attempts=1)
        except CallbackAuthFailed as exc:
            return _outcome("auth", exc)
        except CallbackRejected as exc:
            return _outcome("rejected", exc)
        except DevOpsError as exc:
            return _outcome("unavailable", exc)
        self._completed = True
        return {"outcome": "accepted", "status": None, "error": None, "retryAfter": None}

    def _completed_event(self, result: str) -> dict[str, str]:
        if result not in TASK_RESULTS:
            raise ValueError(f"result must be one of {', '.join(TASK_RESULTS)}, got {result!r}")
        return {
            "name": "TaskCompleted",
            "taskId": self.task_instance_id,
            "jobId": self.job_id,
            "result": result,
        }

    def _event_call(self, event: dict[str, str], *, kind: str | None = None, **kw: Any) -> Any:
        args = ("POST", f"{self.plan_base}/events", EVENTS_API_VERSION)
        if kind is not None:
            return self.side_call(kind, event["name"], *args, json_body=event, **kw)
        return self.call(event["name"], *args, json_body=event, **kw)

    # -- live feed (§3.1) ---------------------------------------------------------------------

    def feed(self, lines: Iterable[str]) -> bool:
        """Show lines in the task's live console; best effort: False instead of raising.

        Each line gets a UTC timestamp like the agent's, line breaks become separate lines,
        and anything past 1024 characters is cut (the persistent log keeps the full text).
        """
        prepared = self._stamped(lines, FEED_LINE_MAX)
        if not prepared:
            return True
        url = f"{self.timeline_base}/records/{_segment(self.job_id)}/feed"
        for start in range(0, len(prepared), FEED_BATCH):
            batch = prepared[start : start + FEED_BATCH]
            answer = self.side_call(
                "feed",
                "feed",
                "POST",
                url,
                FEED_API_VERSION,
                json_body={"value": batch, "count": len(batch), "stepId": self.task_instance_id},
                expect_json=False,
            )
            if answer is None:
                return False
        return True

    def _stamped(self, lines: Iterable[str], limit: int | None = None) -> list[str]:
        stamp = self._now().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"
        out: list[str] = []
        for line in lines:
            for part in self.scrub(str(line)).splitlines() or [""]:
                text = f"{stamp} {part.rstrip()}"
                if limit is not None and len(text) > limit:
                    text = text[: limit - len(_TRUNCATED)] + _TRUNCATED
                out.append(text)
        return out

    # -- persistent log (§3.2) ----------------------------------------------------------------

    def ensure_log(self, log_id: int | None = None) -> int | None:
        """The task's log id: the given or stored one, else a new log attached to the task.

        Store the returned id with the run and pass it back on a retried activity, so a second
        log is never created for the same task. None when the log could not be created.
        """
        if log_id is not None:
            self.log_id = log_id
        if self.log_id is not None:
            return self.log_id
        created = self.side_call(
            "log",
            "create log",
            "POST",
            f"{self.plan_base}/logs",
            LOGS_API_VERSION,
            json_body={"path": f"logs\\{self.task_instance_id}"},
        )
        new_id = _json(created).get("id") if created is not None else None
        if created is not None and not isinstance(new_id, int):
            self.disable("log", "create log: Azure DevOps answered without a log id")
        if not isinstance(new_id, int):
            return None
        self.log_id = new_id
        self.attach_log(new_id)
        return new_id

    def attach_log(self, log_id: int) -> bool:
        """Point the task's timeline record at the log so it stays on the task after the run."""
        return self._patch_record({"log": {"id": log_id}}, kind="attach", operation="attach log")

    def append_log(self, text: str, log_id: int | None = None) -> bool:
        """Append lines to the task's persistent log, each stamped like the server's helper."""
        target = self.ensure_log(log_id)
        if target is None:
            return False
        lines = self._stamped(text.splitlines())
        if not lines:
            return True
        body = "\n".join(lines) + "\n"
        return (
            self.side_call(
                "log",
                "append log",
                "POST",
                f"{self.plan_base}/logs/{target}",
                LOGS_API_VERSION,
                data=body.encode("utf-8"),
                content_type="application/octet-stream",
            )
            is not None
        )

    # -- timeline records (§4) ----------------------------------------------------------------

    def _patch_record(self, fields: Mapping[str, Any], *, kind: str, operation: str) -> bool:
        record = {"id": self.task_instance_id, **fields}
        answer = self.side_call(
            kind,
            operation,
            "PATCH",
            f"{self.timeline_base}/records",
            RECORDS_API_VERSION,
            json_body={"value": [record], "count": 1},
        )
        return answer is not None

    def task_record(self) -> dict[str, Any] | None:
        """The task's timeline record (``state``, ``result``), or None when the timeline does
        not hold it. Raises DevOpsError when it cannot be read."""
        response = self.call(
            "read task record",
            "GET",
            f"{self.timeline_base}/records",
            RECORDS_READ_API_VERSION,
            attempts=min(2, self.max_attempts),
            max_delay=self.backoff_base * 2,
        )
        records = _json(response).get("value")
        for record in records if isinstance(records, list) else []:
            if (
                isinstance(record, Mapping)
                and str(record.get("id", "")).lower() == self.task_instance_id.lower()
            ):
                return {
                    "state": record.get("state"),
                    "result": record.get("result"),
                    "currentOperation": record.get("currentOperation"),
                }
        return None

    def results_reported(self) -> bool:
        """Whether an earlier run of the report already posted the final table: it leaves
        REPORTED_MARK as the task record's currentOperation. False when it cannot tell."""
        if "record" in self.disabled:
            return False
        try:
            record = self.task_record()
        except DevOpsError:
            return False
        return bool(record) and record.get("currentOperation") == REPORTED_MARK

    def mark_results_reported(self) -> bool:
        return self._patch_record(
            {"currentOperation": REPORTED_MARK}, kind="attach", operation="mark reported"
        )

    def task_state(self) -> str | None:
        """The task record's result once it has one, else its state (None: not in the timeline).

        ``canceled``/``failed``/... mean the pipeline finished the task without us (a cancelled
        or timed-out run: no cancel message is ever sent, §5); ``pending`` or ``inProgress``
        mean it still waits.
        """
        record = self.task_record()
        if record is None:
            return None
        value = record.get("result") or record.get("state")
        return str(value) if value else None

    def pipeline_state(self) -> str:
        """'waiting', 'gone' (the record says the task finished) or 'unknown' (not readable).

        Only this read decides that nobody waits any more; a refused read (token refused,
        plan not found) turns the check off for the run and stays 'unknown'.
        """
        if "record" in self.disabled:
            return "unknown"
        try:
            record = self.task_record()
        except CallbackRejected as exc:
            self.disable("record", str(exc))
            return "unknown"
        except DevOpsError as exc:
            log.warning("pipeline check: %s", exc)
            return "unknown"
        if record is None or not record.get("state"):
            return "unknown"
        return "waiting" if str(record["state"]).lower() in WAITING_STATES else "gone"

    # -- summary tab (record attachment) ------------------------------------------------------

    def attach_summary(self, markdown: str, name: str = "notebookops.md") -> bool:
        """The task's summary tab: a Markdown record attachment of type
        Distributedtask.Core.Summary (what ##vso[task.uploadsummary] makes); best effort.

        Route and api-version of TaskClient.create_attachment (azure-devops SDK, v7_1).
        """
        url = (
            f"{self.timeline_base}/records/{_segment(self.task_instance_id)}"
            f"/attachments/{_segment(SUMMARY_ATTACHMENT_TYPE)}/{_segment(name)}"
        )
        answer = self.side_call(
            "summary",
            "attach summary",
            "PUT",
            url,
            ATTACHMENTS_API_VERSION,
            data=self.scrub(markdown).encode("utf-8"),
            content_type="application/octet-stream",
        )
        return answer is not None

    # -- test results (devops_tests.py) -------------------------------------------------------

    def publish_test_results(
        self,
        summary: Mapping[str, Any],
        resolve_output: Callable[[Mapping[str, Any]], str | Path | None] | None = None,
    ) -> int | None:
        """One Azure DevOps test run for the build, one result per notebook; best effort.

        Returns the test run id, or None without a build id or when publishing failed (logged).
        """
        from notebookops.devops_tests import publish_test_results

        return publish_test_results(self, summary, resolve_output)

    # -- transport ----------------------------------------------------------------------------

    def call(
        self,
        operation: str,
        method: str,
        url: str,
        api_version: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
        attempts: int | None = None,
        params: Mapping[str, str] | None = None,
        expect_json: bool = True,
        max_delay: float | None = None,
    ) -> requests.Response:
        """One REST call with the auth header, retried on 5xx/408/429/network errors.

        Raises CallbackAuthFailed (token refused in any of its forms), CallbackRejected (other
        4xx) or CallbackUnavailable (still failing after ``attempts``); never follows redirects.
        """
        headers = {
            "Authorization": self._auth_header(),
            "Accept": "application/json",
            # Without it an unauthenticated call gets a 203 sign-in page instead of a 401.
            "X-TFS-FedAuthRedirect": "Suppress",
        }
        if json_body is not None:
            data = _dumps(json_body)
            content_type = "application/json; charset=utf-8"
        if content_type:
            headers["Content-Type"] = content_type
        query = {"api-version": api_version, **(params or {})}
        limit = attempts or self.max_attempts
        problem = ""
        retry_after: float | None = None
        for attempt in range(1, limit + 1):
            retry_after = None
            try:
                response = self._session.request(
                    method,
                    url,
                    params=query,
                    data=data,
                    headers=headers,
                    timeout=self.timeout,
                    allow_redirects=False,
                )
            except requests.RequestException as exc:
                problem = _one_line(f"{type(exc).__name__}: {self.scrub(str(exc))}")
            else:
                status = response.status_code
                refused = _auth_problem(response, expect_json)
                if refused:
                    message = self.scrub(
                        f"{operation}: authentication failed: {refused}; the pipeline token "
                        f"was not accepted (expired or without rights), so it is not retried"
                    )
                    raise CallbackAuthFailed(message, operation=operation, status=status)
                if 200 <= status < 300:
                    return response
                shown = _one_line(self.scrub(response.text[:_SHOWN_BODY_CHARS]))
                if status < 500 and status not in _RETRYABLE_4XX:
                    message = self.scrub(
                        f"{operation}: Azure DevOps answered HTTP {status}"
                        + (f": {shown}" if shown else "")
                    )
                    raise CallbackRejected(message, operation=operation, status=status)
                problem = f"HTTP {status}" + (f": {shown}" if shown else "")
                retry_after = _retry_after(response)
            if attempt < limit:
                cap = self.backoff_max if max_delay is None else min(max_delay, self.backoff_max)
                delay = min(cap, self.backoff_base * 2 ** (attempt - 1))
                if retry_after is not None:
                    delay = min(cap, max(delay, retry_after))
                log.info(
                    "%s",
                    self.scrub(
                        f"{operation}: attempt {attempt} of {limit} failed ({problem}); "
                        f"retrying in {delay:.1f}s"
                    ),
                )
                self._sleep(delay)
        tries = f"after {limit} attempts" if limit > 1 else "in one attempt"
        message = self.scrub(f"{operation}: Azure DevOps did not answer {tries} ({problem})")
        log.info("%s", message)
        raise CallbackUnavailable(message, operation=operation, retry_after=retry_after)

    def _auth_header(self) -> str:
        # §2.1: ServerTaskHelper's form, empty user name and the token as password.
        return "Basic " + base64.b64encode(b":" + self._token.encode("utf-8")).decode("ascii")

    def scrub(self, text: str) -> str:
        return redact(text, [self._token])


def _auth_problem(response: requests.Response, expect_json: bool) -> str | None:
    """Why an answer means 'not signed in', or None: 401/403, 203 (the sign-in page the
    service serves with a 2xx), any redirect, or an HTML page where JSON was expected."""
    status = response.status_code
    if status in _AUTH_STATUSES:
        return f"HTTP {status}"
    if status == 203:
        return "HTTP 203 (a sign-in page instead of an answer)"
    if 300 <= status < 400:
        return f"HTTP {status} (a redirect, normally to the sign-in page)"
    if 200 <= status < 300 and (expect_json or response.content):
        kind = response.headers.get("Content-Type", "").lower()
        head = response.content[:200].lstrip().lower()
        if "html" in kind or head.startswith((b"<!doctype html", b"<html")):
            return f"HTTP {status} with an HTML page where JSON was expected"
    return None


def _outcome(outcome: str, exc: DevOpsError) -> dict[str, Any]:
    return {
        "outcome": outcome,
        "status": exc.status,
        "error": _one_line(str(exc)),
        "retryAfter": exc.retry_after,
    }


def _one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + _TRUNCATED


def _segment(value: str) -> str:
    return quote(str(value), safe="")


def _dumps(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _json(response: requests.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {"value": body}


def _retry_after(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
