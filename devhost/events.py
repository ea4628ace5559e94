"""History events in the shape the Durable extension sends to out-of-process SDKs.

Field names, EventType numbers and timestamp format follow
shared/reference/durable-protocol.md sections 1.3, 1.4 and 2.3 (DTFx DataMember names).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

EXECUTION_STARTED = 0
EXECUTION_COMPLETED = 1
EXECUTION_FAILED = 2
EXECUTION_TERMINATED = 3
TASK_SCHEDULED = 4
TASK_COMPLETED = 5
TASK_FAILED = 6
SUB_ORCHESTRATION_CREATED = 7
SUB_ORCHESTRATION_COMPLETED = 8
SUB_ORCHESTRATION_FAILED = 9
TIMER_CREATED = 10
TIMER_FIRED = 11
ORCHESTRATOR_STARTED = 12
ORCHESTRATOR_COMPLETED = 13
EVENT_RAISED = 15
CONTINUE_AS_NEW = 16

EVENT_NAMES = {
    0: "ExecutionStarted",
    1: "ExecutionCompleted",
    2: "ExecutionFailed",
    3: "ExecutionTerminated",
    4: "TaskScheduled",
    5: "TaskCompleted",
    6: "TaskFailed",
    7: "SubOrchestrationInstanceCreated",
    8: "SubOrchestrationInstanceCompleted",
    9: "SubOrchestrationInstanceFailed",
    10: "TimerCreated",
    11: "TimerFired",
    12: "OrchestratorStarted",
    13: "OrchestratorCompleted",
    14: "EventSent",
    15: "EventRaised",
    16: "ContinueAsNew",
}

# DTFx OrchestrationStatus numbers, used in ExecutionCompleted.OrchestrationStatus.
STATUS_CODES = {
    "Running": 0,
    "Completed": 1,
    "ContinuedAsNew": 2,
    "Failed": 3,
    "Canceled": 4,
    "Terminated": 5,
    "Pending": 6,
}


def iso(ts: datetime) -> str:
    """The SDK's own format: always UTC with a Z, never naive (mixing breaks its comparisons)."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    text = text.strip()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    # .NET writes seven fractional digits; Python's parser takes at most six.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest}"
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _event(event_type: int, ts: datetime, event_id: int = -1, **fields: Any) -> dict[str, Any]:
    return {
        "EventType": event_type,
        "EventId": event_id,
        "IsPlayed": False,
        "Timestamp": iso(ts),
        **fields,
    }


def orchestrator_started(ts: datetime) -> dict[str, Any]:
    return _event(ORCHESTRATOR_STARTED, ts)


def orchestrator_completed(ts: datetime) -> dict[str, Any]:
    return _event(ORCHESTRATOR_COMPLETED, ts)


def execution_started(
    ts: datetime,
    *,
    name: str,
    instance_id: str,
    execution_id: str,
    input_text: str | None,
    parent_instance_id: str | None,
    generation: int,
    version: str | None = None,
) -> dict[str, Any]:
    # Version must be present: SDK 1.7.0 reads event.Version before replaying anything, and
    # context.version is this value ("" when the instance was started without one).
    return _event(
        EXECUTION_STARTED,
        ts,
        OrchestrationInstance={"InstanceId": instance_id, "ExecutionId": execution_id},
        ParentInstance=(
            {"OrchestrationInstance": {"InstanceId": parent_instance_id}}
            if parent_instance_id
            else None
        ),
        Name=name,
        Version=version or "",
        Input=input_text,
        Tags=None,
        Correlation=None,
        ParentTraceContext=None,
        ScheduledStartTime=None,
        Generation=generation,
    )


def execution_completed(ts: datetime, status: str, result: str | None) -> dict[str, Any]:
    return _event(
        EXECUTION_COMPLETED,
        ts,
        OrchestrationStatus=STATUS_CODES[status],
        Result=result,
        FailureDetails=None,
    )


def execution_terminated(ts: datetime, reason: str | None) -> dict[str, Any]:
    return _event(EXECUTION_TERMINATED, ts, Input=reason)


def task_scheduled(ts: datetime, task_id: int, name: str, input_text: str | None) -> dict[str, Any]:
    return _event(TASK_SCHEDULED, ts, task_id, Name=name, Version="", Input=input_text, Tags=None)


def task_completed(ts: datetime, task_id: int, result: str | None) -> dict[str, Any]:
    return _event(TASK_COMPLETED, ts, TaskScheduledId=task_id, Result=result)


def task_failed(ts: datetime, task_id: int, reason: str, details: str | None) -> dict[str, Any]:
    return _event(
        TASK_FAILED,
        ts,
        TaskScheduledId=task_id,
        Reason=reason,
        Details=details,
        FailureDetails=None,
    )


def sub_orchestration_created(
    ts: datetime,
    task_id: int,
    name: str,
    instance_id: str,
    input_text: str | None,
    version: str | None,
) -> dict[str, Any]:
    return _event(
        SUB_ORCHESTRATION_CREATED,
        ts,
        task_id,
        Name=name,
        Version=version or "",
        InstanceId=instance_id,
        Input=input_text,
    )


def sub_orchestration_completed(ts: datetime, task_id: int, result: str | None) -> dict[str, Any]:
    return _event(SUB_ORCHESTRATION_COMPLETED, ts, TaskScheduledId=task_id, Result=result)


def sub_orchestration_failed(
    ts: datetime, task_id: int, reason: str | None, details: str | None
) -> dict[str, Any]:
    return _event(
        SUB_ORCHESTRATION_FAILED,
        ts,
        TaskScheduledId=task_id,
        Reason=reason,
        Details=details,
        FailureDetails=None,
    )


def timer_created(ts: datetime, task_id: int, fire_at: datetime) -> dict[str, Any]:
    return _event(TIMER_CREATED, ts, task_id, FireAt=iso(fire_at))


def timer_fired(ts: datetime, timer_id: int, fire_at: str) -> dict[str, Any]:
    return _event(TIMER_FIRED, ts, TimerId=timer_id, FireAt=fire_at)


def event_raised(ts: datetime, name: str, input_text: str | None) -> dict[str, Any]:
    return _event(EVENT_RAISED, ts, Name=name, Input=input_text)


def continue_as_new(ts: datetime, input_text: str | None) -> dict[str, Any]:
    return _event(CONTINUE_AS_NEW, ts, Result=input_text)


def restamp(event: dict[str, Any], ts: datetime) -> dict[str, Any]:
    """A queued message gets the time of the episode that delivers it, as DTFx records it."""
    return {**event, "Timestamp": iso(ts)}
