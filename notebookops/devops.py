"""Report to the waiting Azure DevOps pipeline task: plan events, live feed, job log, task state.

Protocol: /work/shared/reference/devops-protocol.md §2-§5 (URLs, bodies, casing, api-versions).
Every call is synchronous and explicit so an activity can make exactly the calls it means to.

Failure policy (§5): 5xx, 408, 429 and network errors are retried with bounded exponential
back-off; any other 4xx means nobody is waiting for us any more (run cancelled, timed out, token
expired): it is logged once and raised as CallbackRejected, never retried. The pipeline token is
registered for redaction and appears in no log line, exception text or repr.
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
    "TASK_RESULTS",
    "CallbackRejected",
    "CallbackUnavailable",
    "DevOpsClient",
    "DevOpsError",
]

log = logging.getLogger(__name__)

# §2.1: the samples' version is the most battle-tested one for plan events.
EVENTS_API_VERSION = "2.0-preview.1"
# §3.1, §3.2, §4: feed, logs and timeline records as the ServerTaskHelper sample calls them.
TIMELINE_API_VERSION = "4.1"

TASK_RESULTS = ("succeeded", "succeededWithIssues", "failed", "canceled")
FEED_LINE_MAX = 1024  # §3.1: longer lines are cut by the server-side helper anyway
FEED_BATCH = 100
_TRUNCATED = "…"
_RETRYABLE_4XX = (408, 429)
_SHOWN_BODY_CHARS = 300


class DevOpsError(Exception):
    """A call to Azure DevOps that did not succeed; the message never contains the token."""

    def __init__(self, message: str, *, operation: str, status: int | None = None) -> None:
        super().__init__(message)
        self.operation = operation
        self.status = status

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), str(self), self.operation, self.status))


def _rebuild(cls: type[DevOpsError], message: str, operation: str, status: int | None) -> Any:
    return cls(message, operation=operation, status=status)


class CallbackRejected(DevOpsError):
    """Azure DevOps answered a 4xx other than 408/429: the task is no longer waiting."""


class CallbackUnavailable(DevOpsError):
    """5xx/408/429/network errors persisted through every retry."""


class DevOpsClient:
    """One pipeline task's callback: build it from the callback values and call it directly."""

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
        self._token = auth_token
        self._sleep = sleep
        self._now = now
        self._session = session or requests.Session()
        self._completed = False
        self._rejected: CallbackRejected | None = None
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

    # -- plan events (§2) ---------------------------------------------------------------------

    def task_started(self) -> None:
        """Tell the pipeline the task has started (cosmetic: no timeout is armed on it)."""
        self._post_event(
            {"name": "TaskStarted", "taskId": self.task_instance_id, "jobId": self.job_id}
        )

    def task_completed(self, result: str) -> None:
        """Complete the waiting task; the caller sends this exactly once per run.

        A second call on the same client sends nothing: a duplicate TaskCompleted has unknown
        effects on the server (§5).
        """
        if result not in TASK_RESULTS:
            raise ValueError(f"result must be one of {', '.join(TASK_RESULTS)}, got {result!r}")
        if self._completed:
            log.warning(
                "TaskCompleted was already sent for task %s; not sending it again",
                self.task_instance_id,
            )
            return
        self._post_event(
            {
                "name": "TaskCompleted",
                "taskId": self.task_instance_id,
                "jobId": self.job_id,
                "result": result,
            }
        )
        self._completed = True

    def _post_event(self, event: dict[str, str]) -> None:
        self._plan_call(
            event["name"],
            "POST",
            f"{self.plan_base}/events",
            EVENTS_API_VERSION,
            json_body=event,
        )

    # -- live feed (§3.1) ---------------------------------------------------------------------

    def feed(self, lines: Iterable[str]) -> bool:
        """Show lines in the task's live console; best effort: False instead of raising.

        Each line gets a UTC timestamp like the agent's, line breaks become separate lines,
        and anything past 1024 characters is cut (the persistent log keeps the full text).
        """
        prepared = self._feed_lines(lines)
        if not prepared:
            return True
        url = (
            f"{self.plan_base}/timelines/{_segment(self.timeline_id)}"
            f"/records/{_segment(self.job_id)}/feed"
        )
        try:
            for start in range(0, len(prepared), FEED_BATCH):
                batch = prepared[start : start + FEED_BATCH]
                self._plan_call(
                    "feed",
                    "POST",
                    url,
                    TIMELINE_API_VERSION,
                    json_body={
                        "value": batch,
                        "count": len(batch),
                        "stepId": self.task_instance_id,
                    },
                    # Live lines are worth one quick retry, not a long wait.
                    attempts=min(2, self.max_attempts),
                )
        except DevOpsError:
            return False
        return True

    def _feed_lines(self, lines: Iterable[str]) -> list[str]:
        stamp = self._now().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"
        out: list[str] = []
        for line in lines:
            for part in self.scrub(str(line)).splitlines() or [""]:
                text = f"{stamp} {part.rstrip()}"
                if len(text) > FEED_LINE_MAX:
                    text = text[: FEED_LINE_MAX - len(_TRUNCATED)] + _TRUNCATED
                out.append(text)
        return out

    # -- persistent log (§3.2) ----------------------------------------------------------------

    def ensure_log(self, log_id: int | None = None) -> int:
        """The task's log id: the given or stored one, else a new log attached to the task.

        Store the returned id with the run and pass it back on a retried activity, so a second
        log is never created for the same task.
        """
        if log_id is not None:
            self.log_id = log_id
        if self.log_id is not None:
            return self.log_id
        created = self._plan_call(
            "create log",
            "POST",
            f"{self.plan_base}/logs",
            TIMELINE_API_VERSION,
            json_body={"path": f"logs\\{self.task_instance_id}"},
        )
        new_id = _json(created).get("id") if created is not None else None
        if not isinstance(new_id, int):
            raise CallbackUnavailable(
                "create log: Azure DevOps answered without a log id", operation="create log"
            )
        self.log_id = new_id
        self.attach_log(new_id)
        return new_id

    def attach_log(self, log_id: int) -> None:
        """Point the task's timeline record at the log so it stays on the task after the run."""
        self._patch_record({"log": {"id": log_id}}, operation="attach log")

    def append_log(self, text: str, log_id: int | None = None) -> None:
        """Append text (lines separated by newlines) to the task's persistent log."""
        target = self.ensure_log(log_id)
        body = self.scrub(text)
        if body and not body.endswith("\n"):
            body += "\n"
        self._plan_call(
            "append log",
            "POST",
            f"{self.plan_base}/logs/{target}",
            TIMELINE_API_VERSION,
            data=body.encode("utf-8"),
            content_type="application/octet-stream",
        )

    # -- timeline records (§4) ----------------------------------------------------------------

    def _patch_record(self, fields: Mapping[str, Any], *, operation: str) -> None:
        record = {"id": self.task_instance_id, **fields}
        self._plan_call(
            operation,
            "PATCH",
            f"{self.plan_base}/timelines/{_segment(self.timeline_id)}/records",
            TIMELINE_API_VERSION,
            json_body={"value": [record], "count": 1},
        )

    def task_state(self) -> str | None:
        """The task's timeline record: its result once it has one, else its state.

        ``canceled``/``failed``/... mean the pipeline has finished the task without us (a
        cancelled or timed-out run: no cancel message is ever sent, §5); ``pending`` or
        ``inProgress`` mean it is still waiting. None when the record is not in the timeline.
        """
        response = self._plan_call(
            "read task record",
            "GET",
            f"{self.plan_base}/timelines/{_segment(self.timeline_id)}/records",
            TIMELINE_API_VERSION,
        )
        records = _json(response).get("value") if response is not None else None
        for record in records or []:
            if (
                isinstance(record, Mapping)
                and str(record.get("id", "")).lower() == self.task_instance_id.lower()
            ):
                result = record.get("result")
                return (
                    str(result)
                    if result
                    else (str(record["state"]) if record.get("state") else None)
                )
        return None

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

    def _plan_call(
        self,
        operation: str,
        method: str,
        url: str,
        api_version: str,
        **kwargs: Any,
    ) -> requests.Response | None:
        # Once the plan has said nobody waits, later calls would only repeat the same 4xx.
        if self._rejected is not None:
            raise CallbackRejected(
                f"{operation}: not sent, Azure DevOps already said the task is no longer waiting "
                f"(HTTP {self._rejected.status})",
                operation=operation,
                status=self._rejected.status,
            )
        try:
            return self.call(operation, method, url, api_version, **kwargs)
        except CallbackRejected as exc:
            self._rejected = exc
            raise

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
    ) -> requests.Response:
        """One REST call with the auth header, retried on 5xx/408/429/network errors."""
        headers = {"Authorization": self._auth_header(), "Accept": "application/json"}
        if json_body is not None:
            data = _dumps(json_body)
            content_type = "application/json; charset=utf-8"
        if content_type:
            headers["Content-Type"] = content_type
        limit = attempts or self.max_attempts
        problem = ""
        for attempt in range(1, limit + 1):
            retry_after: float | None = None
            try:
                response = self._session.request(
                    method,
                    url,
                    params={"api-version": api_version},
                    data=data,
                    headers=headers,
                    timeout=self.timeout,
                )
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return response
                shown = self.scrub(response.text[:_SHOWN_BODY_CHARS]).strip()
                if status < 500 and status not in _RETRYABLE_4XX:
                    message = self.scrub(
                        f"{operation}: Azure DevOps answered HTTP {status} for {method} {url}; "
                        f"the task is no longer waiting (cancelled, timed out, already completed "
                        f"or the token expired), so it is not retried"
                        + (f": {shown}" if shown else "")
                    )
                    log.warning("%s", message)
                    raise CallbackRejected(message, operation=operation, status=status)
                problem = f"HTTP {status}" + (f": {shown}" if shown else "")
                retry_after = _retry_after(response)
            if attempt < limit:
                delay = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
                if retry_after is not None:
                    delay = min(self.backoff_max, max(delay, retry_after))
                log.info(
                    "%s",
                    self.scrub(
                        f"{operation}: attempt {attempt} of {limit} failed ({problem}); "
                        f"retrying in {delay:.1f}s"
                    ),
                )
                self._sleep(delay)
        message = self.scrub(
            f"{operation}: Azure DevOps did not accept {method} {url} after {limit} attempts "
            f"(last: {problem})"
        )
        log.warning("%s", message)
        raise CallbackUnavailable(message, operation=operation)

    def _auth_header(self) -> str:
        # §2.1: ServerTaskHelper's form, empty user name and the token as password.
        return "Basic " + base64.b64encode(b":" + self._token.encode("utf-8")).decode("ascii")

    def scrub(self, text: str) -> str:
        return redact(text, [self._token])


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
