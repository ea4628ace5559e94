"""Azure ML run events wake the orchestration early; polling stays the truth.

The events are shaped like the Event Grid schema documentation's Azure ML examples
(tests/apps/eventgrid/azureml_events.json) and reach the real AzureMLEvents function through
devhost's Event Grid webhook, which raises them through the unmodified durable client.
The backend is the in-process fake standing in for Azure ML (its jobs never end by themselves
here; a test ends one, then announces it, as the service would)."""

from __future__ import annotations

import copy
import json
import time

import pytest

from devhost.events import EVENT_RAISED, TIMER_FIRED
from notebookops import run_events
from notebookops.compute.base import PollPolicy, run_key
from tests.devhost_support import APPS, http
from tests.flow_support import (
    FakeBackend,
    app_host,
    deliver,
    fake_notebook,
    flow_env,  # noqa: F401 - the fixture
    make_repo,
    message,
)

EVENTS = json.loads((APPS / "eventgrid" / "azureml_events.json").read_text())


def azureml_event(kind: str, run_id: str, instance_id: str | None, status: str | None = None):
    event = copy.deepcopy(EVENTS[kind])
    event["data"]["runId"] = run_id
    event["subject"] = f"experiments/{event['data']['experimentId']}/runs/{run_id}"
    event["data"]["runTags"] = {run_events.INSTANCE_TAG: instance_id} if instance_id else {}
    if status:
        event["data"]["runStatus"] = status
    return event


def test_an_event_names_the_run_end_of_one_of_our_instances():
    done = azureml_event("RunCompleted", "nb-a-1", "inst-1")
    assert run_events.parse_event(done["eventType"], done["subject"], done["data"]) == (
        run_events.RunEvent("inst-1", "nb-a-1", "Completed")
    )
    failed = azureml_event("RunStatusChanged", "nb-b-1", "inst-1", "Failed")
    assert run_events.parse_event(
        failed["eventType"], failed["subject"], failed["data"]
    ).status == ("Failed")


@pytest.mark.parametrize(
    "kind, instance, status, event_type",
    [
        ("RunStatusChanged", "inst-1", "Running", None),  # a start: the next poll sees it
        ("RunStatusChanged", "inst-1", "Queued", None),
        ("RunCompleted", None, None, None),  # a job somebody else started
        ("RunCompleted", "inst-1", None, "Microsoft.Storage.BlobCreated"),
    ],
)
def test_starts_foreign_jobs_and_other_event_types_are_ignored(kind, instance, status, event_type):
    event = azureml_event(kind, "nb-a-1", instance, status)
    assert (
        run_events.parse_event(event_type or event["eventType"], event["subject"], event["data"])
        is None
    )
    assert run_events.parse_event(event["eventType"], event["subject"], "not an object") is None


def test_the_poll_policy_gets_the_safety_interval_only_when_events_are_set_up(monkeypatch):
    base = PollPolicy(first_interval_seconds=15, factor=1.5, max_interval_seconds=120)
    monkeypatch.setenv(run_events.SAFETY_POLL_SETTING, "600")
    assert run_events.with_push(base).push_interval_seconds == 600
    monkeypatch.setenv(run_events.SAFETY_POLL_SETTING, "1e999")
    assert run_events.with_push(base).push_interval_seconds == 300
    assert PollPolicy.from_dict(run_events.with_push(base).to_dict()).push_interval_seconds == 300
    monkeypatch.delenv(run_events.EVENTS_SETTING, raising=False)
    assert not run_events.events_enabled()
    monkeypatch.setenv(run_events.EVENTS_SETTING, "1")
    assert run_events.events_enabled()


class PushingFake(FakeBackend):
    """The fake Azure ML backend, declaring that its run ends arrive as events."""

    pushes_events = True


def _end(run_key: str, outcome: str = "succeeded") -> None:
    """The job ends on the service: its next status read reports it."""
    with FakeBackend.lock:
        run = FakeBackend.runs[run_key]
        run["need"], run["outcome"] = run["polls"] + 1, outcome


def _status_polls(run_key: str) -> int:
    with FakeBackend.lock:
        return FakeBackend.runs[run_key]["polls"]


def _post(host, events) -> int:
    url = f"{host.base_url}/runtime/webhooks/eventgrid?functionName=AzureMLEvents"
    code, _, _ = http("POST", url, events, headers={"aeg-event-type": "Notification"})
    return code in (200, 202)  # what Event Grid counts as delivered


def _wait(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_finished_job_is_seen_by_its_event_not_by_the_hour_long_safety_poll(
    flow_env,  # noqa: F811 - the fixture
    monkeypatch,
):
    from notebookops.compute import registry

    monkeypatch.setitem(registry._factories, "fake", PushingFake)
    monkeypatch.setenv(run_events.EVENTS_SETTING, "1")
    monkeypatch.setenv(run_events.SAFETY_POLL_SETTING, "3600")
    repo = make_repo(
        flow_env / "repo",
        {"a.ipynb": fake_notebook(polls=-1), "b.ipynb": fake_notebook(polls=-1)},
    )
    body = message(repo, ["a.ipynb", "b.ipynb"], compute={"backend": "fake"})
    with app_host(flow_env / "state", clock="real") as host:
        instance = deliver(host, body)

        a_key, b_key = run_key(instance, "a.ipynb"), run_key(instance, "b.ipynb")

        def both_submitted():
            custom = (host.get_status(instance) or {}).get("customStatus") or {}
            with FakeBackend.lock:
                known = {a_key, b_key} <= set(FakeBackend.runs)
            return custom.get("phase") == "running" and known

        _wait(both_submitted)
        # Let the orchestrator settle into its wait (submit round done, timer + event race).
        time.sleep(1.0)
        polls_before = _status_polls(b_key)

        # A foreign job's event, a start, and an event for a run we never had: no effect.
        assert _post(host, [azureml_event("RunCompleted", "someone-elses-job", None)])
        assert _post(host, [azureml_event("RunStatusChanged", a_key, instance, "Running")])
        assert _post(host, [azureml_event("RunCompleted", "nb-unknown", instance)])

        _end(a_key)
        started = time.monotonic()
        # Announced twice, as Event Grid's at-least-once delivery may.
        event = azureml_event("RunCompleted", a_key, instance)
        assert _post(host, [event, copy.deepcopy(event)])

        def a_done():
            custom = (host.get_status(instance) or {}).get("customStatus") or {}
            states = {n["path"]: n["state"] for n in custom.get("notebooks", [])}
            return states.get("a.ipynb") == "succeeded" and states

        states = _wait(a_done, timeout=30)
        seen_after = time.monotonic() - started
        assert states["b.ipynb"] in ("queued", "running")
        # The event's round polled only the run it named.
        assert _status_polls(b_key) == polls_before

        _end(b_key, "failed")
        assert _post(host, [azureml_event("RunStatusChanged", b_key, instance, "Failed")])
        result = host.wait_for(instance, timeout=60)
        # After the end: an event for a finished instance is dropped quietly.
        assert _post(host, [azureml_event("RunCompleted", b_key, instance)])
        kinds = [e.get("EventType") for e in host.history(instance)]

    output = result["output"]
    assert result["runtimeStatus"] == "Completed"
    assert {n["path"]: n["state"] for n in output["notebooks"]} == {
        "a.ipynb": "succeeded",
        "b.ipynb": "failed",
    }
    assert seen_after < 15, f"seen {seen_after:.1f} s after the event, not at once"
    # The last generation saw b's end by event; no timer that lost a race ever fired.
    assert kinds.count(EVENT_RAISED) >= 1
    assert kinds.count(TIMER_FIRED) == 0


def test_the_safety_poll_is_not_pushed_back_by_the_events_that_came_between():
    """A run whose event was lost is polled one safety interval after the last round that
    polled every run, however many event rounds for other runs came in between."""
    from datetime import UTC, datetime, timedelta

    from notebookops import policy

    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    state = {
        "pollPolicy": {"pushIntervalSeconds": 300.0},
        "round": 7,
        "deadline": policy.iso(now + timedelta(hours=1)),
        "notebooks": [],
    }
    assert policy.next_wake(state, now, now - timedelta(seconds=250)) == now + timedelta(seconds=50)
    assert policy.next_wake(state, now, now - timedelta(seconds=400)) == now
    assert policy.next_wake(state, now) == now + timedelta(seconds=300)
    # Never past the run's deadline.
    state["deadline"] = policy.iso(now + timedelta(seconds=20))
    assert policy.next_wake(state, now, now) == now + timedelta(seconds=20)
