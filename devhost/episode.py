"""One orchestrator episode: replay the history through the SDK and turn its actions into work.

This follows the host algorithm in shared/reference/durable-protocol.md section 9:
the SDK gets the whole history of this execution plus the new events, returns the
cumulative action list, and the host schedules only the actions beyond those it already
handled, numbering them as DTFx does. Retry timers and re-attempts of
call_activity_with_retry are the host's own (DTFx's RetryInterceptor): they consume ids
but never appear in the action list, so they are allocated before the episode's new
actions, in the order their events are delivered.

After each episode the replayed actions are compared with what was scheduled before
(type and name, in id order), which is how the real host detects non-determinism.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from . import events as ev
from .app import AppIndex
from .store import InboxRow, Instance

OUT_OF_PROC_LABEL = "$OutOfProcData$:"

# actionType numbers (SDK models/actions/ActionType.py)
CALL_ACTIVITY, CALL_ACTIVITY_WITH_RETRY = 0, 1
CALL_SUB_ORCHESTRATOR, CALL_SUB_ORCHESTRATOR_WITH_RETRY = 2, 3
CONTINUE_AS_NEW, CREATE_TIMER, WAIT_FOR_EXTERNAL_EVENT = 4, 5, 6
CALL_ENTITY, CALL_HTTP, SIGNAL_ENTITY = 7, 8, 9
WHEN_ANY, WHEN_ALL = 11, 12

ID_CONSUMING = {0, 1, 2, 3, 4, 5, 7, 8, 9}
UNSUPPORTED = {
    CALL_ENTITY: "entities",
    SIGNAL_ENTITY: "entities",
    CALL_HTTP: "call_http",
}
# What a scheduled id is, for the non-determinism check: activity, timer, or other.
KIND_OF_ACTION = {
    0: "activity",
    1: "activity",
    2: "subOrchestration",
    3: "subOrchestration",
    5: "timer",
    4: "continueAsNew",
}
_BAD_ID = re.compile(r"[/\\#?\x00-\x1f\x7f]")


def instance_id_problem(instance_id: str) -> str | None:
    """Why an instance id is refused (as the durable extension refuses it), or None."""
    if not instance_id or instance_id.startswith("@") or _BAD_ID.search(instance_id):
        return (
            f"Instance ID '{instance_id!r}' is invalid: it must be non-empty, must not start "
            "with '@' and must not contain '/', '\\', '#', '?' or control characters."
        )
    if len(instance_id) > 256:
        return "Instance ID is longer than 256 characters."
    return None


@dataclass
class WorkItem:
    name: str
    input: str | None
    task_id: int
    attempt: int = 1
    retry: dict[str, Any] | None = None


@dataclass
class QueuedMessage:
    visible_at: datetime
    kind: str
    event: dict[str, Any]
    meta: dict[str, Any] | None = None


@dataclass
class ChildStart:
    """A sub-orchestration the episode started: the host creates the instance with the
    episode's commit, and reports its end to the parent's task."""

    name: str
    instance_id: str
    input: str | None
    version: str | None
    task_id: int
    retry: dict[str, Any] | None = None  # the retry state a failure goes back with


@dataclass
class EpisodeResult:
    history: list[tuple[dict[str, Any], bool]] = field(default_factory=list)  # (event, hidden)
    messages: list[QueuedMessage] = field(default_factory=list)
    work: list[WorkItem] = field(default_factory=list)
    children: list[ChildStart] = field(default_factory=list)
    canceled_timers: list[int] = field(default_factory=list)
    next_id: int = 0
    scheduled: list[list[Any]] = field(default_factory=list)
    custom_status: Any = None
    custom_status_set: bool = False
    status: str = "Running"
    output: Any = None
    failure: str | None = None
    continue_input: str | None = None
    continued: bool = False


def flatten(actions: list[Any]) -> list[dict[str, Any]]:
    flat: list[dict[str, Any]] = []
    for action in actions:
        if isinstance(action, list):
            flat.extend(flatten(action))
        elif action.get("actionType") in (WHEN_ANY, WHEN_ALL):
            flat.extend(flatten(action.get("compoundActions") or []))
        else:
            flat.append(action)
    return flat


def call_orchestrator(handle: Any, context: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Call the SDK handle; return its state and the error text if the orchestrator failed."""
    try:
        raw = handle(json.dumps(context))
    except Exception as exc:  # the SDK wraps user exceptions with the state after a label
        text = str(exc)
        if OUT_OF_PROC_LABEL in text:
            message, _, payload = text.partition(OUT_OF_PROC_LABEL)
            try:
                state = json.loads(payload)
            except json.JSONDecodeError:
                state = {"isDone": False, "actions": [[]]}
            error = state.get("error") or message.strip() or type(exc).__name__
            return state, str(error)
        return {"isDone": False, "actions": [[]]}, f"{type(exc).__name__}: {exc}"
    state = json.loads(raw) if isinstance(raw, str) else raw
    error = state.get("error")
    return state, (str(error) if error else None)


def run_episode(
    *,
    app: AppIndex,
    instance: Instance,
    history: list[dict[str, Any]],
    inbox: list[InboxRow],
    now: datetime,
) -> EpisodeResult:
    result = EpisodeResult(
        next_id=instance.next_id, scheduled=[list(s) for s in instance.scheduled]
    )
    func = app.get(instance.name)
    new: list[tuple[dict[str, Any], bool]] = [(ev.orchestrator_started(now), False)]

    # Retry-internal messages first: the SDK allocates their hidden ids while processing
    # them without resuming user code, so they must precede completions that do resume it.
    internal = [r for r in inbox if r.kind in ("retry_failed", "retry_timer")]
    ordinary = [r for r in inbox if r.kind not in ("retry_failed", "retry_timer")]
    for row in internal + ordinary:
        new.append((ev.restamp(row.event, now), False))
    hidden: list[tuple[dict[str, Any], bool]] = []
    for row in internal:
        meta = row.meta or {}
        hidden_id = result.next_id
        result.next_id += 1
        if row.kind == "retry_failed":
            attempts_left = meta["attempt"] < meta["maxAttempts"]
            delay = timedelta(milliseconds=meta["intervalMs"]) if attempts_left else timedelta(0)
            fire_at = now + delay
            hidden.append((ev.timer_created(now, hidden_id, fire_at), True))
            result.messages.append(
                QueuedMessage(
                    visible_at=fire_at,
                    kind="retry_timer" if attempts_left else "timer",
                    event=ev.timer_fired(fire_at, hidden_id, ev.iso(fire_at)),
                    meta={**meta, "attempt": meta["attempt"] + 1} if attempts_left else None,
                )
            )
        elif meta.get("kind") == "subOrchestration":  # the next attempt of a child
            child_id = meta["instanceId"] or f"{instance.execution_id}:{hidden_id}"
            hidden.append(
                (
                    ev.sub_orchestration_created(
                        now, hidden_id, meta["name"], child_id, meta["input"], meta["version"]
                    ),
                    True,
                )
            )
            result.children.append(
                ChildStart(
                    name=meta["name"],
                    instance_id=child_id,
                    input=meta["input"],
                    version=meta["version"],
                    task_id=hidden_id,
                    retry=meta,
                )
            )
        else:  # the retry timer fired: the host schedules the next attempt
            hidden.append((ev.task_scheduled(now, hidden_id, meta["name"], meta["input"]), True))
            result.work.append(
                WorkItem(
                    name=meta["name"],
                    input=meta["input"],
                    task_id=hidden_id,
                    attempt=meta["attempt"],
                    retry={
                        "intervalMs": meta["intervalMs"],
                        "maxAttempts": meta["maxAttempts"],
                    },
                )
            )
    new.extend(hidden)

    if func is None or func.trigger_type != "orchestrationTrigger":
        result.history = new
        result.status = "Failed"
        result.failure = (
            f"The function '{instance.name}' doesn't exist, is disabled, or is not an "
            "orchestrator function."
        )
        return result

    context = {
        "history": history + [e for e, _ in new],
        "input": instance.input,
        "instanceId": instance.instance_id,
        "isReplaying": False,
        "parentInstanceId": instance.parent_instance_id,
        "upperSchemaVersion": 1,
        "upperSchemaVersionNew": 2,
    }
    state, error = call_orchestrator(func.func, context)
    if "customStatus" in state:
        too_large = custom_status_problem(state["customStatus"])
        if too_large:
            error = error or too_large
        else:
            result.custom_status = state["customStatus"]
            result.custom_status_set = True

    actions = flatten(state.get("actions") or [])
    consuming = [a for a in actions if a.get("actionType") in ID_CONSUMING]

    if error is None:
        error = _check_determinism(consuming, result.scheduled)

    if error is None:
        for action in consuming[len(result.scheduled) :]:
            problem = _schedule(action, app, now, result, new, instance)
            if problem:
                error = problem
                break
        for index, action in enumerate(consuming[: len(instance.scheduled)]):
            if action.get("actionType") == CREATE_TIMER and action.get("isCanceled"):
                result.canceled_timers.append(instance.scheduled[index][0])

    new.append((ev.orchestrator_completed(now), False))
    result.history = new
    if error is not None:
        result.status = "Failed"
        result.failure = f"Orchestrator function '{instance.name}' failed: {error}"
        return result
    if result.continued:
        result.status = "ContinuedAsNew"
        return result
    if state.get("isDone"):
        result.status = "Completed"
        result.output = state.get("output")
    return result


# The durable extension fails an out-of-process orchestration whose custom status is larger
# than this in UTF-16 JSON text, as the in-process model always has (Azure Storage keeps it in
# one table column): Azure/azure-functions-durable-extension#3113.
CUSTOM_STATUS_MAX_BYTES = 16 * 1024


def custom_status_size(value: Any) -> int:
    """Bytes of the host's JSON text of a custom status in UTF-16, as the limit counts them."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-16-le"))


def custom_status_problem(value: Any) -> str | None:
    size = custom_status_size(value)
    if size <= CUSTOM_STATUS_MAX_BYTES:
        return None
    return (
        "The UTF-16 size of the JSON-serialized payload must not exceed 16 KB. "
        f"The current payload size is {-(-size // 1024)} KB."
    )


def _check_determinism(consuming: list[dict[str, Any]], scheduled: list[list[Any]]) -> str | None:
    for index, (task_id, kind, name) in enumerate(scheduled):
        if index >= len(consuming):
            return (
                f"Non-Deterministic workflow detected: a previous execution scheduled {kind} "
                f"'{name}' with sequence ID {task_id}, but the current replay scheduled nothing "
                "there. Was a change made to the orchestrator code after this instance had "
                "already started running?"
            )
        action = consuming[index]
        now_kind = KIND_OF_ACTION.get(
            action.get("actionType"), f"action {action.get('actionType')}"
        )
        now_name = action.get("functionName") or ("" if now_kind == "timer" else "?")
        if now_kind != kind or str(now_name).lower() != str(name).lower():
            return (
                f"Non-Deterministic workflow detected: a previous execution scheduled {kind} "
                f"'{name}' with sequence ID {task_id}, but the current replay scheduled "
                f"{now_kind} '{now_name}' there. Was a change made to the orchestrator code "
                "after this instance had already started running?"
            )
    return None


def _schedule(
    action: dict[str, Any],
    app: AppIndex,
    now: datetime,
    result: EpisodeResult,
    new: list[tuple[dict[str, Any], bool]],
    instance: Instance,
) -> str | None:
    kind = action.get("actionType")
    if kind in UNSUPPORTED:
        return f"devhost does not support {UNSUPPORTED[kind]} (actionType {kind})"
    task_id = result.next_id
    result.next_id += 1
    if kind in (CALL_ACTIVITY, CALL_ACTIVITY_WITH_RETRY):
        name = action.get("functionName", "")
        target = app.get(name)
        if target is None or target.trigger_type != "activityTrigger":
            return (
                f"The function '{name}' doesn't exist, is disabled, or is not an activity function."
            )
        retry = None
        if kind == CALL_ACTIVITY_WITH_RETRY:
            retry, problem = _retry_policy(action)
            if problem:
                return problem
        input_text = action.get("input")
        new.append((ev.task_scheduled(now, task_id, target.name, input_text), False))
        result.work.append(
            WorkItem(name=target.name, input=input_text, task_id=task_id, retry=retry)
        )
        result.scheduled.append([task_id, "activity", target.name])
    elif kind in (CALL_SUB_ORCHESTRATOR, CALL_SUB_ORCHESTRATOR_WITH_RETRY):
        name = action.get("functionName", "")
        target = app.get(name)
        if target is None or target.trigger_type != "orchestrationTrigger":
            return (
                f"The function '{name}' doesn't exist, is disabled, or is not an orchestrator "
                "function."
            )
        # DTFx names a child without an id after the parent's execution and the task id.
        child_id = action.get("instanceId") or f"{instance.execution_id}:{task_id}"
        problem = instance_id_problem(child_id)
        if problem:
            return f"sub-orchestration '{target.name}': {problem}"
        if child_id == instance.instance_id:
            return f"sub-orchestration '{target.name}': its instance ID is the parent's own"
        # An explicit version wins; else the child gets defaultVersion, as a new instance does.
        version = action.get("version") or app.default_version
        input_text = action.get("input")
        new.append(
            (
                ev.sub_orchestration_created(
                    now, task_id, target.name, child_id, input_text, version
                ),
                False,
            )
        )
        retry = None
        if kind == CALL_SUB_ORCHESTRATOR_WITH_RETRY:
            policy, problem = _retry_policy(action)
            if problem:
                return problem
            # Each attempt is a new child; an explicit id is reused (the failed one is replaced).
            retry = {
                "kind": "subOrchestration",
                "name": target.name,
                "input": input_text,
                "instanceId": action.get("instanceId"),
                "version": version,
                "attempt": 1,
                **policy,
            }
        result.children.append(
            ChildStart(
                name=target.name,
                instance_id=child_id,
                input=input_text,
                version=version,
                task_id=task_id,
                retry=retry,
            )
        )
        result.scheduled.append([task_id, "subOrchestration", target.name])
    elif kind == CREATE_TIMER:
        fire_at = ev.parse_iso(action["fireAt"])
        new.append((ev.timer_created(now, task_id, fire_at), False))
        result.messages.append(
            QueuedMessage(
                visible_at=fire_at,
                kind="timer",
                event=ev.timer_fired(fire_at, task_id, action["fireAt"]),
            )
        )
        result.scheduled.append([task_id, "timer", ""])
    elif kind == CONTINUE_AS_NEW:
        result.continued = True
        result.continue_input = action.get("input")
        result.scheduled.append([task_id, "continueAsNew", ""])
    return None


def _retry_policy(action: dict[str, Any]) -> tuple[dict[str, int], str | None]:
    """The Python SDK's RetryOptions: the first interval (DTFx's back-off coefficient is 1) and
    the number of attempts."""
    options = action.get("retryOptions") or {}
    interval = options.get("firstRetryIntervalInMilliseconds")
    attempts = options.get("maxNumberOfAttempts")
    if not isinstance(interval, int) or interval <= 0:
        return {}, f"retryOptions.firstRetryIntervalInMilliseconds must be > 0, got {interval!r}"
    if not isinstance(attempts, int) or attempts < 1:
        return {}, f"retryOptions.maxNumberOfAttempts must be >= 1, got {attempts!r}"
    return {"intervalMs": interval, "maxAttempts": attempts}, None
