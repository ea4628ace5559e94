"""Azure ML run events (through Event Grid) wake the waiting orchestration early.

Azure ML publishes `Microsoft.MachineLearningServices.RunCompleted` and `RunStatusChanged`
events (data: experimentId, experimentName, runId, runType, runTags, runProperties,
runStatus; subject `experiments/{id}/runs/{runId}`). Delivery is at least once and unordered,
and a failed or canceled run may produce no event at all, so an event is only a wake-up: the
orchestrator polls the run it names at once, and the poll decides the state. Without an Event
Grid subscription nothing arrives and polling alone carries the run, as before.

Every job is tagged with its instance id at submit (`notebookops.instance`), which is how an
event finds its orchestration; events for jobs we did not start carry no such tag.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any

from notebookops.compute.base import PollPolicy

log = logging.getLogger(__name__)

EVENT_NAME = "runStatusChanged"
INSTANCE_TAG = "notebookops.instance"
# `1` once an Event Grid subscription delivers the workspace's run events to AzureMLEvents.
EVENTS_SETTING = "NOTEBOOKOPS_RUN_EVENTS"
# With events, polling stays as a safety net at this interval (events can be lost).
SAFETY_POLL_SETTING = "NOTEBOOKOPS_RUN_EVENTS_POLL_SECONDS"
DEFAULT_SAFETY_POLL_SECONDS = 300.0

_EVENT_TYPES = frozenset(
    {
        "Microsoft.MachineLearningServices.RunCompleted",
        "Microsoft.MachineLearningServices.RunStatusChanged",
    }
)
# Only an end is worth a wake-up: a start is seen by the next poll, and fewer events keep the
# orchestration's history small.
_ENDS = frozenset({"completed", "failed", "canceled", "cancelled", "notresponding"})
# Instances that can still use an event; the host refuses events for finished ones anyway.
_WAITING = frozenset({"Running", "Pending", "ContinuedAsNew"})


@dataclass(frozen=True)
class RunEvent:
    instance_id: str
    run_id: str
    status: str

    def payload(self) -> dict[str, str]:
        """What the orchestrator receives: the run to poll now, and what the event said."""
        return {"runId": self.run_id, "status": self.status}


def parse_event(event_type: str, subject: str | None, data: Any) -> RunEvent | None:
    """The run end an event announces for one of our instances, or None (not ours, not an end,
    not an Azure ML run event, malformed)."""
    if event_type not in _EVENT_TYPES or not isinstance(data, dict):
        return None
    tags = data.get("runTags")
    instance_id = tags.get(INSTANCE_TAG) if isinstance(tags, dict) else None
    run_id = data.get("runId")
    if not run_id and subject and "/runs/" in subject:
        run_id = subject.rsplit("/runs/", 1)[1]
    status = data.get("runStatus")
    if event_type.endswith("RunCompleted") and not status:
        status = "Completed"
    if not (isinstance(instance_id, str) and instance_id and isinstance(run_id, str) and run_id):
        return None
    if not isinstance(status, str) or status.lower() not in _ENDS:
        return None
    return RunEvent(instance_id=instance_id, run_id=run_id, status=status)


def events_enabled() -> bool:
    return os.environ.get(EVENTS_SETTING, "").strip().lower() in ("1", "true", "yes")


def with_push(policy: PollPolicy) -> PollPolicy:
    """The backend's poll policy once run events are set up: wait for an event, or poll at the
    safety interval."""
    raw = os.environ.get(SAFETY_POLL_SETTING, "").strip()
    try:
        seconds = float(raw) if raw else DEFAULT_SAFETY_POLL_SECONDS
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 86_400:
        log.warning(
            "%s=%r is not a number of seconds in (0, 86400); using %s",
            SAFETY_POLL_SETTING,
            raw,
            DEFAULT_SAFETY_POLL_SECONDS,
        )
        seconds = DEFAULT_SAFETY_POLL_SECONDS
    return dataclasses.replace(policy, push_interval_seconds=seconds)


async def deliver(event_type: str, subject: str | None, data: Any, client: Any) -> bool:
    """Raise the event on the instance it names when that instance still waits. Unknown or
    finished instances, foreign jobs and duplicates are dropped quietly (debug log): True when
    an event was raised."""
    event = parse_event(event_type, subject, data)
    if event is None:
        log.debug("run event ignored: %s %s", event_type, subject)
        return False
    status = await client.get_status(event.instance_id)
    runtime = getattr(getattr(status, "runtime_status", None), "name", None)
    if runtime not in _WAITING:
        log.debug("run event for %s ignored: instance is %s", event.instance_id, runtime)
        return False
    try:
        await client.raise_event(event.instance_id, EVENT_NAME, event.payload())
    except Exception as exc:  # finished between the two calls: the poll has it anyway
        log.debug("run event for %s not raised: %s", event.instance_id, exc)
        return False
    log.info(
        "run %s of %s ended (%s): woke the monitor", event.run_id, event.instance_id, event.status
    )
    return True
