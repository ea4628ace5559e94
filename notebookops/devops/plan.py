"""Plan events, live feed, job log and the task's timeline record: what the waiting
pipeline task sees of a run.

Protocol: /work/shared/reference/devops-protocol.md §2-§5 (URLs, bodies, casing); routes, bodies
and api-versions as the services' published Swagger files declare them
(/work/shared/reference/specs/), or, for the routes those files leave out (feed, record read),
as the official azure-devops Python SDK's TaskClient calls them.

**TaskCompleted decides delivery.** ``try_task_completed`` makes one bounded attempt and says
what happened (accepted, retry later, or stopped); the orchestrator waits on durable timers
between attempts (``notebookops.devops.delivery``). Only its own answers, and the task's
timeline record, decide the outcome; everything else here is a side call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import UTC
from typing import Any

from notebookops.devops.delivery import WAITING_STATES
from notebookops.devops.transport import (
    TRUNCATED,
    CallbackAuthFailed,
    CallbackRejected,
    DevOpsError,
    DevOpsTransport,
    one_line,
    response_json,
    segment,
)

__all__ = ["REPORTED_MARK", "TASK_RESULTS", "PlanCalls"]

log = logging.getLogger(__name__)

# Swagger (specs/azure-devops-distributedtask-7.1.json): Events_Post, Logs_Create, Logs_Append
# and Records_Update are declared with api-version 7.1.
EVENTS_API_VERSION = "7.1"
LOGS_API_VERSION = "7.1"
RECORDS_API_VERSION = "7.1"
# Not in the Swagger file: TaskClient.get_records (v7_1 SDK) uses 7.1-preview.1; the feed keeps
# ServerTaskHelper's 4.1 (the v7_1 SDK has no feed call).
RECORDS_READ_API_VERSION = "7.1-preview.1"
FEED_API_VERSION = "4.1"
# The task record's currentOperation once the final table is out (TimelineRecord declares it).
REPORTED_MARK = "notebookops: results reported, completing the task"
TASK_RESULTS = ("succeeded", "succeededWithIssues", "failed", "canceled")
FEED_LINE_MAX = 1024  # §3.1: longer lines are cut by the server-side helper anyway
FEED_BATCH = 100


class PlanCalls(DevOpsTransport):
    """The calls on the task's plan: events, feed, log and timeline record."""

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
        url = f"{self.timeline_base}/records/{segment(self.job_id)}/feed"
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
                    text = text[: limit - len(TRUNCATED)] + TRUNCATED
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
        new_id = response_json(created).get("id") if created is not None else None
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
        records = response_json(response).get("value")
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


def _outcome(outcome: str, exc: DevOpsError) -> dict[str, Any]:
    return {
        "outcome": outcome,
        "status": exc.status,
        "error": one_line(str(exc)),
        "retryAfter": exc.retry_after,
    }
