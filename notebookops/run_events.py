"""Azure ML run events (through Event Grid) wake the waiting orchestration early.

Azure ML publishes `Microsoft.MachineLearningServices.RunCompleted` and `RunStatusChanged`
events (data: experimentId, experimentName, runId, runType, runTags, runProperties,
runStatus; subject `experiments/{id}/runs/{runId}`). Delivery is at least once and unordered,
and a failed or canceled run may produce no event at all, so an event is only a wake-up: the
orchestrator polls the run it names at once, and the poll decides the state. Without an Event
Grid subscription nothing arrives and polling alone carries the run, as before.

Every job is tagged with its instance id at submit (`notebookops.instance`), which is how an
event finds its orchestration; events for jobs we did not start carry no such tag.

The local backend raises the same event itself: ActivitySubmit learns the instance's
send-event URL from its durable client binding and hands it to the detached runner (on its
stdin or the fork server's private socket, never in a file, an environment variable or a message: the URL carries the host's
system key), which posts the run's start and end there (`post_run_status`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from notebookops.compute.base import PollPolicy

log = logging.getLogger(__name__)

EVENT_NAME = "runStatusChanged"
INSTANCE_TAG = "notebookops.instance"
# `1` once an Event Grid subscription delivers the workspace's run events to AzureMLEvents.
EVENTS_SETTING = "NOTEBOOKOPS_RUN_EVENTS"
# With events, polling stays as a safety net at this interval (events can be lost)...
SAFETY_POLL_SETTING = "NOTEBOOKOPS_RUN_EVENTS_POLL_SECONDS"
DEFAULT_SAFETY_POLL_SECONDS = 300.0
# ...doubling per run while events keep arriving, up to this: the longest a run whose end was
# never announced (a failed or canceled Azure ML job may produce no event) goes unseen.
SAFETY_POLL_MAX_SETTING = "NOTEBOOKOPS_RUN_EVENTS_MAX_POLL_SECONDS"
DEFAULT_SAFETY_POLL_MAX_SECONDS = 3600.0
# How long the local runner's announcement may take; past it the safety poll has the end.
POST_TIMEOUT_SECONDS = 5.0

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


def _seconds_setting(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        seconds = float(raw) if raw else default
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 86_400:
        log.warning("%s=%r is not a number of seconds in (0, 86400); using %s", name, raw, default)
        seconds = default
    return seconds


def with_push(policy: PollPolicy, safety: tuple[float, float] | None = None) -> PollPolicy:
    """The backend's poll policy once run events are set up: wait for an event, or poll at the
    safety interval (growing per run while events arrive, up to its cap). No long poll: the
    event is what wakes the orchestrator. `safety` (first, cap) is a backend's own choice;
    without it the settings decide."""
    if safety is None:
        first = _seconds_setting(SAFETY_POLL_SETTING, DEFAULT_SAFETY_POLL_SECONDS)
        cap = _seconds_setting(SAFETY_POLL_MAX_SETTING, DEFAULT_SAFETY_POLL_MAX_SECONDS)
    else:
        first, cap = safety
    return dataclasses.replace(
        policy,
        long_poll_seconds=0.0,
        push_interval_seconds=first,
        push_max_interval_seconds=max(first, cap),
    )


def policy_for(backend: Any, send_event_url: str | None) -> PollPolicy:
    """How the orchestrator waits for this backend's runs.

    - A backend whose runner announces its own end (`announces_own_ends`, local) pushes when
      the submit had somewhere to send the event to, at the backend's `safety_poll_seconds`.
    - A backend whose service announces ends (`pushes_events`, Azure ML through Event Grid)
      pushes once the Event Grid subscription is declared set up (NOTEBOOKOPS_RUN_EVENTS=1).
    - Anything else polls, as before."""
    policy = backend.poll_policy
    if not getattr(backend, "pushes_events", False):
        return policy
    if getattr(backend, "announces_own_ends", False):
        if not send_event_url:
            return policy
        seconds = float(getattr(backend, "safety_poll_seconds", DEFAULT_SAFETY_POLL_SECONDS))
        # Its status reads are file reads: each generation may start by reading them all.
        pushed = with_push(policy, (seconds, seconds))
        return dataclasses.replace(pushed, poll_all_each_generation=True)
    return with_push(policy) if events_enabled() else policy


def send_event_url(client_binding: Any, instance_id: Any) -> str | None:
    """Where this instance takes `runStatusChanged` events, from a durable client binding (the
    JSON text the host binds); None when it has no absolute http(s) URL (a host without an HTTP
    door). The URL carries the host's system key: hand it on privately, never log it."""
    if not isinstance(client_binding, str) or not isinstance(instance_id, str) or not instance_id:
        return None
    import azure.durable_functions as df

    try:
        links = df.DurableOrchestrationClient(client_binding).create_http_management_payload(
            instance_id
        )
    except Exception:  # a binding this SDK cannot read: no channel, polling as before
        log.debug("no send-event URL in the durable client binding")
        return None
    url = str(links.get("sendEventPostUri") or "").replace("{eventName}", EVENT_NAME)
    return url if url.startswith(("http://", "https://")) else None


def post_run_status(url: str, run_id: str, status: str) -> str | None:
    """Raise `runStatusChanged` for a run that started or ended, with the payload AzureMLEvents
    raises, through the host's send-event webhook. Best effort, bounded: returns None when the host
    took it, else why not, in words that never contain the URL (it holds the system key)."""
    if not url.startswith(("http://", "https://")):
        return "event not sent (not an http(s) URL)"
    body = json.dumps(RunEvent("", run_id, status).payload()).encode()
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=POST_TIMEOUT_SECONDS) as answer:  # noqa: S310
            code = answer.status
    except urllib.error.HTTPError as exc:
        code = exc.code
    except Exception as exc:  # refused, timed out, host gone: the safety poll sees the end
        return f"event not sent ({type(exc).__name__})"
    # 202 accepted; 410 the instance finished, 404 it is gone: nobody waits any more.
    return None if code in (200, 202) else f"event not taken (HTTP {code})"


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
