"""A fake Azure DevOps server on 127.0.0.1 for tests: real HTTP, the documented REST protocol.

Azure DevOps cannot be reached from tests, so this server speaks what
/work/shared/reference/devops-protocol.md §2-§5 documents for the plan (events, feed, logs,
timeline records, record attachments) and the test runs, results and result attachments. It
checks what the real service checks (Basic auth with the job token, media types, exact event
names, the plan's ids) and what the published Swagger files declare (tests/specs/): a body
field a definition does not declare, or an api-version other than the declared one, is a 400.
Every request is recorded so tests can assert URLs, queries, headers and bodies.

Misbehaviour is programmable, the way the real service misbehaves:

- ``fail_next(path, statuses)``: the next matching requests answer these statuses (or
  ``"signin"``: 203 with an HTML sign-in page, ``"redirect"``: 302 to the sign-in host,
  ``"html"``: 200 with an HTML page, ``"drop"``: the connection closes without an answer);
- ``always(path, answer)``: every matching request answers that way (e.g. only the feed 400);
- ``outage(seconds, mode)``: every request answers 503 (``mode="503"``) or finds nobody
  (``"unreachable"``) for a window measured on ``clock`` (a test passes devhost's virtual
  clock, so an hour-long outage takes no real time);
- ``slow(path, seconds)``: hold answers (client timeouts); ``expire_token()``: the token is
  refused from now on (401 with ``X-TFS-FedAuthRedirect: Suppress``, else a 203 sign-in page);
- ``no_longer_waiting``/``set_task_record``: the task as the pipeline leaves it when it
  cancels or times out.

    with FakeDevOps(token="t0ken") as devops:
        client = DevOpsClient.from_callback(devops.callback(), sleep=lambda s: None)
        client.task_completed("succeeded")
        assert devops.task_completed_events()[0]["result"] == "succeeded"
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from notebookops.request import Callback

__all__ = ["FakeDevOps", "Recorded", "undeclared_fields"]

_PLAN = re.compile(
    r"^/(?P<project>[^/]+)/_apis/distributedtask/hubs/(?P<hub>[^/]+)/plans/(?P<plan>[^/]+)(?P<rest>/.*)$",
    re.IGNORECASE,
)
DEFAULT_TOKEN = "fake-devops-job-token"
_TEST = re.compile(r"^/(?P<project>[^/]+)/_apis/test(?P<rest>/.*)$", re.IGNORECASE)
SPECS = Path(__file__).resolve().parent / "specs"
SIGN_IN_PAGE = (
    "<!DOCTYPE html><html><head><title>Azure DevOps Services | Sign In</title></head>"
    "<body><form action='https://login.microsoftonline.com/'>Sign in</form></body></html>"
)
# Plan event subtypes: JobEvent declares jobId and name; the recorded PostEvent exchange
# (specs/azure-devops-distributedtask-7.1-PostEvent-example.json) adds taskId and result.
_EVENT_FIELDS = {
    "TaskStarted": {"name", "jobId", "taskId"},
    "TaskCompleted": {"name", "jobId", "taskId", "result"},
}


@cache
def _spec(name: str) -> dict[str, Any]:
    return json.loads((SPECS / name).read_text(encoding="utf-8-sig"))


def _definitions(area: str) -> dict[str, Any]:
    name = (
        "azure-devops-distributedtask-7.1.json" if area == "task" else "azure-devops-test-7.1.json"
    )
    return _spec(name)["definitions"]


def undeclared_fields(area: str, definition: str, value: Any, where: str = "") -> list[str]:
    """Field paths in ``value`` that the Swagger ``definition`` (and what it refers to) does
    not declare; [] when every field is declared."""
    defs = _definitions(area)
    schema = defs[definition]
    if not isinstance(value, dict):
        return []
    props: dict[str, Any] = dict(schema.get("properties") or {})
    for parent in schema.get("allOf") or []:
        ref = parent.get("$ref", "").rsplit("/", 1)[-1]
        props.update(defs.get(ref, {}).get("properties") or {})
    if not props:  # JObject and friends: free-form
        return []
    problems = []
    for key, item in value.items():
        if key not in props:
            problems.append(f"{where}{key}")
            continue
        prop = props[key]
        ref = (prop.get("$ref") or (prop.get("items") or {}).get("$ref") or "").rsplit("/", 1)[-1]
        if ref and ref in defs:
            items = item if isinstance(item, list) else [item]
            for entry in items:
                problems += undeclared_fields(area, ref, entry, f"{where}{key}.")
    return problems


@dataclass
class Recorded:
    """One request as the server received it, and what it answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int = 0
    at: datetime | None = None

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lowered), None)


Answer = int | str  # a status code, or "signin", "redirect", "html", "drop"


@dataclass
class _Rule:
    path_substring: str
    method: str | None
    statuses: list[Answer] = field(default_factory=list)
    delay: float = 0.0
    times: int = 0
    forever: Answer | None = None

    def matches(self, method: str, path: str) -> bool:
        return self.path_substring.lower() in path.lower() and (
            self.method is None or self.method.upper() == method
        )


class FakeDevOps:
    """The fake server; start it with ``with``. ``url`` is the collection URI (trailing /)."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        project_id: str | None = None,
        hub_name: str = "build",
        plan_id: str | None = None,
        job_id: str | None = None,
        timeline_id: str | None = None,
        task_instance_id: str | None = None,
        organization: str = "fabrikam",
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.token = token
        self.organization = organization
        self.project_id = project_id or str(uuid.uuid4())
        self.hub_name = hub_name
        self.plan_id = plan_id or str(uuid.uuid4())
        self.job_id = job_id or str(uuid.uuid4())
        self.timeline_id = timeline_id or str(uuid.uuid4())
        self.task_instance_id = task_instance_id or str(uuid.uuid4())
        self.clock = clock or (lambda: datetime.now(UTC))
        self.requests: list[Recorded] = []
        self.events: list[dict[str, Any]] = []
        self.feed: list[dict[str, Any]] = []
        self.logs: dict[int, dict[str, Any]] = {}
        self.attachments: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.records: dict[str, dict[str, Any]] = {
            self.job_id: {"id": self.job_id, "type": "Job", "state": "inProgress", "result": None},
            self.task_instance_id: {
                "id": self.task_instance_id,
                "parentId": self.job_id,
                "type": "Task",
                "name": "Run notebooks",
                "state": "inProgress",
                "result": None,
                "log": None,
            },
        }
        self.runs: dict[int, dict[str, Any]] = {}
        self._rules: list[_Rule] = []
        self._not_waiting: int | None = None
        self._outage: tuple[datetime, datetime, str] | None = None
        self._armed: tuple[float, str, bytes] | None = None
        self._expired = False
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._next_log = 1
        self._next_run = 1000
        self._next_result = 100000
        self._next_attachment = 1
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> FakeDevOps:
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        assert self._server is not None, "start the fake with 'with FakeDevOps() as devops'"
        return f"http://127.0.0.1:{self._server.server_address[1]}/{self.organization}/"

    def callback(self, *, build_id: str | None = "4242", plan_url: str | None = None) -> Callback:
        """Callback values pointing at this server, as the starter would read them."""
        return Callback(
            plan_url=plan_url or self.url,
            project_id=self.project_id,
            hub_name=self.hub_name,
            plan_id=self.plan_id,
            job_id=self.job_id,
            timeline_id=self.timeline_id,
            task_instance_id=self.task_instance_id,
            auth_token=self.token,
            task_instance_name="Run notebooks",
            build_id=build_id,
        )

    def properties(self) -> dict[str, str]:
        """The Service Bus application properties a pipeline would send for this plan."""
        return {
            "PlanUrl": self.url,
            "ProjectId": self.project_id,
            "HubName": self.hub_name,
            "PlanId": self.plan_id,
            "JobId": self.job_id,
            "TimelineId": self.timeline_id,
            "TaskInstanceName": "Run notebooks",
            "TaskInstanceId": self.task_instance_id,
            "AuthToken": self.token,
        }

    # -- programmable behaviour ------------------------------------------------------------------

    def fail_next(
        self, path_substring: str, statuses: Iterable[Answer] = (500,), *, method: str | None = None
    ) -> None:
        """Answer the next matching requests with these answers, one per request, in order."""
        with self._lock:
            self._rules.append(_Rule(path_substring, method, statuses=list(statuses)))

    def always(self, path_substring: str, answer: Answer, *, method: str | None = None) -> None:
        """Answer every matching request this way from now on (e.g. only the feed: 400)."""
        with self._lock:
            self._rules.append(_Rule(path_substring, method, forever=answer))

    def slow(
        self, path_substring: str, seconds: float, *, times: int = 1, method: str | None = None
    ) -> None:
        """Hold the next ``times`` matching requests for ``seconds`` before handling them."""
        with self._lock:
            self._rules.append(_Rule(path_substring, method, delay=seconds, times=times))

    def outage(
        self, seconds: float, mode: str = "503", *, trigger: bytes | None = None
    ) -> datetime | None:
        """From now (on ``clock``) for ``seconds``: every request answers 503 with a
        Retry-After, or (``"unreachable"``) the connection closes unanswered. Returns its end.

        With ``trigger`` the window opens at the first request whose body contains it (e.g.
        b'"TaskCompleted"'), and None is returned."""
        if mode not in ("503", "unreachable"):
            raise ValueError(f"outage mode: expected '503' or 'unreachable', got {mode!r}")
        with self._lock:
            if trigger is not None:
                self._armed = (seconds, mode, trigger)
                return None
            start = self.clock()
            end = start + timedelta(seconds=seconds)
            self._outage = (start, end, mode)
        return end

    def expire_token(self) -> None:
        """The job token is refused from now on, as after it expired."""
        with self._lock:
            self._expired = True

    def no_longer_waiting(self, status: int = 404) -> None:
        """Every plan call answers ``status`` from now on, as for a task nobody waits for."""
        with self._lock:
            self._not_waiting = status

    def set_task_record(self, *, state: str, result: str | None = None) -> None:
        """Set the task's timeline record as the pipeline does when it cancels or times out."""
        with self._lock:
            self.records[self.task_instance_id].update(state=state, result=result)

    # -- what happened ---------------------------------------------------------------------------

    def requests_to(self, path_substring: str, method: str | None = None) -> list[Recorded]:
        with self._lock:
            return [
                r
                for r in self.requests
                if path_substring.lower() in r.path.lower()
                and (method is None or r.method == method.upper())
            ]

    def task_completed_attempts(self) -> list[Recorded]:
        """Every TaskCompleted request the server received, answered or not."""
        return [r for r in self.requests_to("/events", "POST") if b'"TaskCompleted"' in r.body]

    def task_completed_events(self) -> list[dict[str, Any]]:
        """TaskCompleted events the server accepted (failed attempts are not in here)."""
        with self._lock:
            return [e for e in self.events if e.get("name") == "TaskCompleted"]

    def task_started_events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("name") == "TaskStarted"]

    def feed_lines(self) -> list[str]:
        with self._lock:
            return [line for post in self.feed for line in post["value"]]

    def log_text(self, log_id: int | None = None) -> str:
        """The text of a log (the one attached to the task when no id is given)."""
        with self._lock:
            if log_id is None:
                attached = self.records[self.task_instance_id].get("log") or {}
                log_id = attached.get("id")
            if log_id is None:
                return ""
            return self.logs[log_id]["text"]

    def task_record(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.records[self.task_instance_id])

    def test_runs(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(json.dumps(run)) for run in self.runs.values()]

    def summary_attachments(self) -> list[dict[str, Any]]:
        """Attachments of type Distributedtask.Core.Summary on the task's record."""
        with self._lock:
            return [
                dict(a)
                for (record, kind, _), a in self.attachments.items()
                if kind == "Distributedtask.Core.Summary" and record == self.task_instance_id
            ]

    # -- request handling (server threads) -------------------------------------------------------

    def _take_rule(self, method: str, path: str) -> tuple[Answer | None, float]:
        with self._lock:
            for rule in self._rules:
                if not rule.matches(method, path):
                    continue
                if rule.forever is not None:
                    return rule.forever, 0.0
                if rule.statuses:
                    status = rule.statuses.pop(0)
                    if not rule.statuses:
                        self._rules.remove(rule)
                    return status, 0.0
                if rule.times > 0:
                    rule.times -= 1
                    if rule.times == 0:
                        self._rules.remove(rule)
                    return None, rule.delay
        return None, 0.0

    def _in_outage(self, record: Recorded) -> str | None:
        with self._lock:
            if self._armed is not None and self._armed[2] in record.body:
                seconds, mode, _ = self._armed
                self._armed = None
                self._outage = (
                    record.at or self.clock(),
                    self.clock() + timedelta(seconds=seconds),
                    mode,
                )
            if self._outage is None:
                return None
            start, end, mode = self._outage
        now = self.clock()
        return mode if start <= now < end else None

    def _handle(self, record: Recorded) -> tuple[Answer, Any, str]:
        outage = self._in_outage(record)
        if outage == "unreachable":
            return "drop", None, ""
        if outage:
            return 503, {"message": "TF400898: service unavailable (outage)"}, "application/json"
        answer, delay = self._take_rule(record.method, record.path)
        if delay:
            self._stopping.wait(delay)
        if isinstance(answer, str):
            return answer, None, ""
        if answer is not None:
            return answer, {"message": f"injected failure {answer}"}, "application/json"
        expected = "Basic " + base64.b64encode(b":" + self.token.encode()).decode()
        if self._expired or record.header("Authorization") != expected:
            # Without the header the service serves its sign-in page with a 203; never
            # echoes credentials either way.
            if (record.header("X-TFS-FedAuthRedirect") or "").lower() != "suppress":
                return "signin", None, ""
            return 401, {"message": "TF400813: The user is not authorized."}, "application/json"
        if not record.query.get("api-version"):
            return 400, {"message": "VSS0003: api-version is required."}, "application/json"
        prefix = f"/{self.organization}/".lower()
        if not record.path.lower().startswith(prefix):
            return 404, {"message": "organization not found"}, "application/json"
        path = record.path[len(prefix) - 1 :]
        if (match := _PLAN.match(path)) is not None:
            return self._plan(record, match)
        if (match := _TEST.match(path)) is not None:
            return self._test(record, match)
        return 404, {"message": f"no route {record.method} {record.path}"}, "application/json"

    @staticmethod
    def _version(record: Recorded, expected: str) -> tuple[int, Any, str] | None:
        got = record.query.get("api-version", [""])[0]
        if got != expected:
            message = f"api-version {got!r}: this route is declared with {expected!r}"
            return 400, {"message": message}, "application/json"
        return None

    @staticmethod
    def _undeclared(area: str, definition: str, body: Any) -> tuple[int, Any, str] | None:
        items = body if isinstance(body, list) else [body]
        problems = [p for item in items for p in undeclared_fields(area, definition, item)]
        if problems:
            message = f"{definition} declares no field {', '.join(sorted(set(problems)))}"
            return 400, {"message": message}, "application/json"
        return None

    def _plan(self, record: Recorded, match: re.Match[str]) -> tuple[Answer, Any, str]:
        if (
            match["project"].lower() != self.project_id.lower()
            or match["hub"] != self.hub_name
            or match["plan"].lower() != self.plan_id.lower()
        ):
            return 404, {"message": "TaskOrchestrationPlanNotFoundException"}, "application/json"
        with self._lock:
            if self._not_waiting is not None:
                return (
                    self._not_waiting,
                    {"message": "the task is no longer waiting"},
                    "application/json",
                )
        rest, method = match["rest"], record.method
        timeline = f"/timelines/{self.timeline_id}".lower()
        if method == "POST" and rest == "/events":
            return self._version(record, "7.1") or self._event(record)
        if method == "POST" and rest.lower() == f"{timeline}/records/{self.job_id}/feed".lower():
            # Not in the Swagger file's routes; its body type is declared there.
            body = self._json_body(record)
            if not isinstance(body, dict) or not isinstance(body.get("value"), list):
                return (
                    400,
                    {"message": "expected TimelineRecordFeedLinesWrapper"},
                    "application/json",
                )
            bad = self._version(record, "4.1") or self._undeclared(
                "task", "TimelineRecordFeedLinesWrapper", body
            )
            if bad:
                return bad
            if body.get("count") != len(body["value"]):
                return 400, {"message": "count does not match value"}, "application/json"
            with self._lock:
                self.feed.append(body)
            return 204, None, ""
        if method == "POST" and rest == "/logs":
            body = self._json_body(record)
            if not isinstance(body, dict) or not body.get("path"):
                return 400, {"message": "expected TaskLog with a path"}, "application/json"
            bad = self._version(record, "7.1") or self._undeclared("task", "TaskLog", body)
            if bad:
                return bad
            with self._lock:
                log_id = self._next_log
                self._next_log += 1
                self.logs[log_id] = {"id": log_id, "path": body["path"], "text": "", "lineCount": 0}
                return 200, self._task_log(log_id), "application/json"
        if method == "POST" and (log_match := re.fullmatch(r"/logs/(\d+)", rest)):
            if bad := self._version(record, "7.1"):
                return bad
            if not (record.header("Content-Type") or "").startswith("application/octet-stream"):
                return 415, {"message": "expected application/octet-stream"}, "application/json"
            with self._lock:
                entry = self.logs.get(int(log_match[1]))
                if entry is None:
                    return 404, {"message": "log not found"}, "application/json"
                entry["text"] += record.body.decode("utf-8")
                entry["lineCount"] = len(entry["text"].splitlines())
                return 200, self._task_log(entry["id"]), "application/json"
        if rest.lower() == f"{timeline}/records":
            if method == "GET":
                # TaskClient.get_records (not in the Swagger file's routes).
                if bad := self._version(record, "7.1-preview.1"):
                    return bad
                with self._lock:
                    value = [dict(r) for r in self.records.values()]
                return 200, {"count": len(value), "value": value}, "application/json"
            if method == "PATCH":
                return self._version(record, "7.1") or self._patch_records(record)
        attach = re.fullmatch(
            rf"{re.escape(timeline)}/records/([^/]+)/attachments/([^/]+)/([^/]+)", rest, re.I
        )
        if attach and method == "PUT":
            return self._version(record, "7.1-preview.1") or self._attachment(record, attach)
        return 404, {"message": f"no route {method} {record.path}"}, "application/json"

    def _attachment(self, record: Recorded, match: re.Match[str]) -> tuple[Answer, Any, str]:
        # TaskClient.create_attachment: PUT the raw content as application/octet-stream.
        if not (record.header("Content-Type") or "").startswith("application/octet-stream"):
            return 415, {"message": "expected application/octet-stream"}, "application/json"
        record_id, kind, name = match[1], match[2], match[3]
        with self._lock:
            if record_id.lower() not in {k.lower() for k in self.records}:
                return 404, {"message": "TimelineRecordNotFoundException"}, "application/json"
            self.attachments[(record_id, kind, name)] = {
                "recordId": record_id,
                "type": kind,
                "name": name,
                "content": record.body.decode("utf-8"),
            }
        answer = {
            "recordId": record_id,
            "timelineId": self.timeline_id,
            "type": kind,
            "name": name,
            "createdOn": datetime.now(UTC).isoformat(),
        }
        return 200, answer, "application/json"

    def _event(self, record: Recorded) -> tuple[Answer, Any, str]:
        body = self._json_body(record)
        # Names are matched ordinally (case-sensitive) by the server's event converter (§2.1).
        if not isinstance(body, dict) or body.get("name") not in _EVENT_FIELDS:
            return 400, {"message": "unknown event"}, "application/json"
        extra = set(body) - _EVENT_FIELDS[body["name"]]
        if extra:
            message = f"{body['name']} declares no field {', '.join(sorted(extra))}"
            return 400, {"message": message}, "application/json"
        if str(body.get("taskId", "")).lower() != self.task_instance_id.lower():
            return 404, {"message": "TaskOrchestrationJobNotFoundException"}, "application/json"
        if str(body.get("jobId", "")).lower() != self.job_id.lower():
            return 404, {"message": "TaskOrchestrationJobNotFoundException"}, "application/json"
        if body["name"] == "TaskCompleted" and body.get("result") not in (
            "succeeded",
            "succeededWithIssues",
            "failed",
            "canceled",
            "skipped",
            "abandoned",
        ):
            return 400, {"message": "invalid result"}, "application/json"
        with self._lock:
            # A task that already completed is no longer waiting: the expected answer is a
            # 4xx (reference §5, UNCONFIRMED), so a late duplicate never counts twice here.
            if self.records[self.task_instance_id].get("state") == "completed":
                return 409, {"message": "TaskOrchestrationJobAlreadyCompleted"}, "application/json"
            self.events.append(body)
            if body["name"] == "TaskCompleted":
                self.records[self.task_instance_id].update(state="completed", result=body["result"])
        return 204, None, ""

    def _patch_records(self, record: Recorded) -> tuple[Answer, Any, str]:
        body = self._json_body(record)
        if not isinstance(body, dict) or not isinstance(body.get("value"), list):
            return 400, {"message": "expected a wrapped TimelineRecord list"}, "application/json"
        bad = self._undeclared("task", "VssJsonCollectionWrapperBase", {"count": body.get("count")})
        bad = bad or self._undeclared("task", "TimelineRecord", body["value"])
        if bad:
            return bad
        updated = []
        with self._lock:
            for item in body["value"]:
                if not isinstance(item, dict) or not item.get("id"):
                    return 400, {"message": "record without id"}, "application/json"
                # §4: update if it exists, else create; null fields mean "leave unchanged".
                target = self.records.setdefault(str(item["id"]), {"id": str(item["id"])})
                target.update({k: v for k, v in item.items() if v is not None})
                updated.append(dict(target))
        return 200, {"count": len(updated), "value": updated}, "application/json"

    def _test(self, record: Recorded, match: re.Match[str]) -> tuple[Answer, Any, str]:
        if match["project"].lower() != self.project_id.lower():
            return 404, {"message": "project not found"}, "application/json"
        if bad := self._version(record, "7.1"):
            return bad
        rest, method = match["rest"], record.method
        body = self._json_body(record) if method in ("POST", "PATCH") else None
        with self._lock:
            if method == "GET" and rest.lower() == "/runs":
                build = record.query.get("buildUri", [None])[0]
                value = [
                    self._run_view(run_id)
                    for run_id, run in self.runs.items()
                    if build is None or f"vstfs:///Build/Build/{run['build']['id']}" == build
                ]
                return 200, {"count": len(value), "value": value}, "application/json"
            if method == "POST" and rest.lower() == "/runs":
                if not isinstance(body, dict) or not body.get("name"):
                    return 400, {"message": "a test run needs a name"}, "application/json"
                if bad := self._undeclared("test", "RunCreateModel", body):
                    return bad
                run_id = self._next_run
                self._next_run += 1
                self.runs[run_id] = {**body, "id": run_id, "results": []}
                return 200, self._run_view(run_id), "application/json"
            if (m := re.fullmatch(r"/runs/(\d+)", rest, re.IGNORECASE)) and method == "PATCH":
                run = self.runs.get(int(m[1]))
                if run is None:
                    return 404, {"message": "test run not found"}, "application/json"
                if not isinstance(body, dict):
                    return 400, {"message": "expected a RunUpdateModel"}, "application/json"
                if bad := self._undeclared("test", "RunUpdateModel", body):
                    return bad
                run.update(body)
                return 200, self._run_view(run["id"]), "application/json"
            results = re.fullmatch(r"/runs/(\d+)/results", rest, re.IGNORECASE)
            if results and method == "GET":
                run = self.runs.get(int(results[1]))
                if run is None:
                    return 404, {"message": "test run not found"}, "application/json"
                value = [{k: v for k, v in r.items() if k != "attachments"} for r in run["results"]]
                return 200, {"count": len(value), "value": value}, "application/json"
            if results and method == "POST":
                run = self.runs.get(int(results[1]))
                if run is None:
                    return 404, {"message": "test run not found"}, "application/json"
                if not isinstance(body, list):
                    return 400, {"message": "expected a TestCaseResult list"}, "application/json"
                if bad := self._undeclared("test", "TestCaseResult", body):
                    return bad
                added = []
                for item in body:
                    result_id = self._next_result
                    self._next_result += 1
                    run["results"].append({**item, "id": result_id, "attachments": []})
                    added.append({"id": result_id, "testCaseTitle": item.get("testCaseTitle")})
                return 200, {"count": len(added), "value": added}, "application/json"
            if (
                m := re.fullmatch(r"/runs/(\d+)/results/(\d+)/attachments", rest, re.IGNORECASE)
            ) and method == "POST":
                run = self.runs.get(int(m[1]))
                result = next(
                    (r for r in (run or {}).get("results", []) if r["id"] == int(m[2])), None
                )
                if result is None:
                    return 404, {"message": "test result not found"}, "application/json"
                if not isinstance(body, dict) or not body.get("stream") or not body.get("fileName"):
                    return (
                        400,
                        {"message": "an attachment needs stream and fileName"},
                        "application/json",
                    )
                if bad := self._undeclared("test", "TestAttachmentRequestModel", body):
                    return bad
                attachment_id = self._next_attachment
                self._next_attachment += 1
                result["attachments"].append(
                    {
                        "id": attachment_id,
                        "fileName": body["fileName"],
                        "attachmentType": body.get("attachmentType"),
                        "comment": body.get("comment"),
                        "content": base64.b64decode(body["stream"]).decode("utf-8", "replace"),
                    }
                )
                return (
                    200,
                    {"id": attachment_id, "url": f"{self.url}attachments/{attachment_id}"},
                    "application/json",
                )
        return 404, {"message": f"no route {method} {record.path}"}, "application/json"

    def _run_view(self, run_id: int) -> dict[str, Any]:
        run = self.runs[run_id]
        return {k: v for k, v in run.items() if k != "results"} | {
            "url": f"{self.url}runs/{run_id}"
        }

    def _task_log(self, log_id: int) -> dict[str, Any]:
        entry = self.logs[log_id]
        now = datetime.now(UTC).isoformat()
        return {
            "path": entry["path"],
            "lineCount": entry["lineCount"],
            "createdOn": now,
            "lastChangedOn": now,
            "id": log_id,
            "location": None,
        }

    @staticmethod
    def _json_body(record: Recorded) -> Any:
        if not (record.header("Content-Type") or "").startswith("application/json"):
            return None
        try:
            return record.json()
        except ValueError:
            return None


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeDevOps

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urlsplit(self.path)
        fake = self.server_fake
        record = Recorded(
            method=self.command,
            path=unquote(parts.path),
            query=parse_qs(parts.query),
            headers=dict(self.headers.items()),
            body=body,
            at=fake.clock(),
        )
        with fake._lock:
            fake.requests.append(record)
        answer, payload, content_type = fake._handle(record)
        headers: dict[str, str] = {}
        if answer == "drop":
            record.status = 0
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if answer == "signin":
            status, data, content_type = 203, SIGN_IN_PAGE.encode(), "text/html"
        elif answer == "html":
            status, data, content_type = 200, SIGN_IN_PAGE.encode(), "text/html"
        elif answer == "redirect":
            status, data, content_type = 302, b"", ""
            headers["Location"] = "https://login.microsoftonline.com/common/oauth2/authorize"
        else:
            status = int(answer)
            data = b"" if payload is None else json.dumps(payload).encode("utf-8")
            if status == 503:
                headers["Retry-After"] = "30"
        record.status = status
        try:
            self.send_response(status)
            if data:
                self.send_header("Content-Type", content_type + "; charset=utf-8")
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if data:
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up waiting (a timeout test); nothing to answer

    do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output quiet; every request is in FakeDevOps.requests
