"""The Azure DevOps client and its retries: one authenticated REST call, and the rule for
best-effort ("side") calls.

Protocol: /work/shared/reference/devops-protocol.md §2.1 (authentication, URLs); routes, bodies
and api-versions of the calls built on this live in plan.py, test_results.py and summary.py.

Two kinds of calls, with different rules:

- **Calls that decide** (TaskCompleted, reading the task's record) go through ``call``: retried
  on 5xx/408/429/network errors, raising a DevOpsError subclass that says what happened.
- **Side calls never decide anything** (TaskStarted, feed, log, record attach, test results,
  summary): ``side_call`` never raises for what the service answers; a rejection (4xx, or an
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
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self
from urllib.parse import quote

import requests

from notebookops.redact import MASK, redact, register_secret

if TYPE_CHECKING:
    from notebookops.request import Callback

__all__ = [
    "SIDE_CALLS",
    "CallbackAuthFailed",
    "CallbackRejected",
    "CallbackUnavailable",
    "DevOpsError",
    "DevOpsTransport",
    "one_line",
    "response_json",
    "segment",
]

log = logging.getLogger(__name__)

# The kinds of best-effort calls; each is disabled on its own after a rejection.
SIDE_CALLS = ("started", "feed", "log", "attach", "tests", "summary", "record")
TRUNCATED = "…"
_RETRYABLE_4XX = (408, 429)
_AUTH_STATUSES = (401, 403)
_SHOWN_BODY_CHARS = 300


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


class DevOpsTransport:
    """One pipeline task's connection: its URLs, its token and the retry rules.

    Build a ``notebookops.devops.client.DevOpsClient`` (this plus the calls) rather than this.

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
                segment(project_id),
                "_apis/distributedtask/hubs",
                segment(hub_name),
                "plans",
                segment(plan_id),
            )
        )
        self.project_base = f"{self.collection_url}/{segment(project_id)}"
        self.timeline_base = f"{self.plan_base}/timelines/{segment(timeline_id)}"

    @classmethod
    def from_callback(cls, callback: Callback, **options: Any) -> Self:
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
            f"{type(self).__name__}(plan_url={self.plan_url!r}, project_id={self.project_id!r}, "
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
        line = one_line(reason)
        self.disabled[kind] = line
        self.newly_disabled[kind] = line
        log.warning("%s; no more %s calls for this run (they never decide the verdict)", line, kind)

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
                problem = one_line(f"{type(exc).__name__}: {self.scrub(str(exc))}")
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
                shown = one_line(self.scrub(response.text[:_SHOWN_BODY_CHARS]))
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


def one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + TRUNCATED


def segment(value: str) -> str:
    return quote(str(value), safe="")


def _dumps(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def response_json(response: requests.Response) -> dict[str, Any]:
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
