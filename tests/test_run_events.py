"""Azure ML run events wake the orchestration early; polling stays the truth.

The events are shaped like the Event Grid schema documentation's Azure ML examples
(tests/apps/eventgrid/azureml_events.json) and reach the real AzureMLEvents function through
devhost's Event Grid webhook, which raises them through the unmodified durable client.
The backend is the in-process fake standing in for Azure ML (its jobs never end by themselves
here; a test ends one, then announces it, as the service would)."""

from __future__ import annotations

import copy
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import ClassVar

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


def _push_state(now, first=300.0, cap=3600.0, paths=("a", "b")):
    from notebookops import policy

    return {
        "pollPolicy": {"pushIntervalSeconds": first, "pushMaxIntervalSeconds": cap},
        "round": 3,
        "deadline": policy.iso(now + timedelta(days=1)),
        "notebooks": [
            {"path": p, "state": "running", "submittedAt": policy.iso(now), "deadline": None}
            for p in paths
        ],
    }


def _end_of(state, path, now, seconds_ago=0.0, outcome="succeeded"):
    from notebookops import policy

    notebook = next(n for n in state["notebooks"] if n["path"] == path)
    notebook.update(
        state=outcome,
        startedAt=notebook["submittedAt"],
        durationSeconds=(now - policy.parse(notebook["submittedAt"])).total_seconds() - seconds_ago,
    )


def test_safety_polls_grow_while_events_are_trusted_and_fall_back_once_events_go_missing():
    """A run is polled one first interval after its submit; while the instance's run ends keep
    coming by event its interval grows x4 up to the cap (the longest a lost event leaves a run
    unseen); once too many ends come without their event, every run is back at the first."""
    from notebookops import policy

    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    state = _push_state(t0, paths=("a", "b", "c", "d"))
    assert policy.to_poll(state, set(), t0 + timedelta(seconds=269)) == set()
    assert policy.next_wake(state, t0) == t0 + timedelta(seconds=300)
    # An event names c: only c is polled, at once, and its end counts as announced.
    at = t0 + timedelta(seconds=120)
    assert policy.to_poll(state, {"c"}, at) == {"c"}
    _end_of(state, "c", at, seconds_ago=1)
    policy.after_polls(state, {"c"}, {"c"}, at)
    assert policy.events_trusted(state)
    # The safety poll at 5 min finds a, b, d still running: next one 20 min later.
    t = t0 + timedelta(seconds=300)
    assert policy.to_poll(state, set(), t) == {"a", "b", "d"}
    policy.after_polls(state, {"a", "b", "d"}, set(), t)
    assert policy.next_wake(state, t) == t + timedelta(seconds=1200)
    t += timedelta(seconds=1200)
    policy.after_polls(state, policy.to_poll(state, set(), t), set(), t)
    assert policy.next_wake(state, t) == t + timedelta(seconds=3600)  # capped
    # Four more ends come by event (5 announced), then a safety poll finds d succeeded 20 min
    # ago with no event: 5 of 6 ends announced is still trusted...
    for name in ("e", "f", "g", "h"):
        state["notebooks"].append({"path": name, "state": "running", "submittedAt": policy.iso(t0)})
        _end_of(state, name, t)
        policy.after_polls(state, {name}, {name}, t)
    t += timedelta(seconds=3600)
    polled = policy.to_poll(state, set(), t)
    _end_of(state, "d", t, seconds_ago=1200)  # what the poll finds
    policy.after_polls(state, polled, set(), t)
    assert state["missedEvents"] == 1 and policy.events_trusted(state)
    assert policy.next_wake(state, t) == t + timedelta(seconds=3600)
    # ...a second miss is not (5 of 7): a and b are polled every first interval again.
    state["notebooks"].append({"path": "i", "state": "running", "submittedAt": policy.iso(t0)})
    t += timedelta(seconds=3600)
    polled = policy.to_poll(state, set(), t)
    _end_of(state, "i", t, seconds_ago=900)
    policy.after_polls(state, polled, set(), t)
    assert not policy.events_trusted(state)
    assert policy.next_wake(state, t) == t + timedelta(seconds=300)


def test_a_late_or_failed_end_is_not_a_missed_event():
    """Azure ML announces every completed run; a failed or canceled one may have no event, and
    an end of a few minutes ago may have its event still on the way."""
    from notebookops import policy

    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    state = _push_state(t0, paths=("a", "b", "c"))
    t = t0 + timedelta(seconds=300)
    polled = policy.to_poll(state, set(), t)
    assert polled == {"a", "b", "c"}
    _end_of(state, "a", t, seconds_ago=120)  # late, maybe
    _end_of(state, "b", t, seconds_ago=280, outcome="failed")
    policy.after_polls(state, polled, set(), t)
    assert not state["missedEvents"]
    # Found 10 minutes after its end, with no event: missed.
    t += timedelta(seconds=600)
    polled = policy.to_poll(state, set(), t)
    _end_of(state, "c", t, seconds_ago=600)
    policy.after_polls(state, polled, set(), t)
    assert state["missedEvents"] == 1


def test_the_wait_never_passes_a_deadline():
    from notebookops import policy

    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    state = _push_state(now)
    state["deadline"] = policy.iso(now + timedelta(seconds=20))
    assert policy.next_wake(state, now) == now + timedelta(seconds=20)
    state["notebooks"] = []
    state["deadline"] = policy.iso(now + timedelta(days=1))
    assert policy.next_wake(state, now) == now + timedelta(seconds=300)


def test_the_local_backend_pushes_only_with_somewhere_to_send_its_events(monkeypatch):
    from notebookops.compute.local import LocalBackend

    backend = LocalBackend(allowed=True)
    url = "http://127.0.0.1:7071/runtime/webhooks/durabletask/instances/i/raiseEvent/x?code=k"
    pushed = run_events.policy_for(backend, url)
    assert pushed.push_interval_seconds == LocalBackend.safety_poll_seconds
    assert pushed.long_poll_seconds == 0  # the events replace the long poll
    assert run_events.policy_for(backend, None) == LocalBackend.poll_policy
    # Azure ML's backends need the Event Grid subscription declared, not a URL.
    monkeypatch.delenv(run_events.EVENTS_SETTING, raising=False)
    assert run_events.policy_for(PushingFake(), url) == PushingFake.poll_policy


def test_the_send_event_url_comes_from_the_durable_client_binding():
    from devhost.engine import Engine

    engine = Engine.__new__(Engine)
    engine.base_url = "http://127.0.0.1:7071"
    engine.app = type("App", (), {"hub_name": "hub"})()
    url = run_events.send_event_url(engine.client_binding(), "inst-1")
    assert url == (
        "http://127.0.0.1:7071/runtime/webhooks/durabletask/instances/inst-1/raiseEvent/"
        f"{run_events.EVENT_NAME}?taskHub=hub&connection=Storage"
    )
    engine.base_url = ""  # devhost without its HTTP door: nowhere to post to
    assert run_events.send_event_url(engine.client_binding(), "inst-1") is None
    assert run_events.send_event_url("not json", "inst-1") is None


SYSTEM_KEY = "sYsTeMkEy-0123456789abcdef-must-never-leak"


@pytest.mark.slow
def test_a_local_run_is_picked_up_by_its_runners_events_not_by_a_poll(
    flow_env,  # noqa: F811 - the fixture
    monkeypatch,
    caplog,
):
    """Real kernels on the local backend, devhost on the real clock, a safety poll of an hour:
    every notebook's start and end reach the orchestration as `runStatusChanged` events raised
    by its runner through the instance's send-event URL, each round after an event polls only
    the runs events named, and no timer ever fires. The URL carries a system key here, as on
    Azure (devhost's has none): it is in no file, log, status, output or notebook."""
    import logging

    from devhost.events import TASK_SCHEDULED
    from notebookops.compute.local import LocalBackend
    from tests.gitrepos import notebook

    caplog.set_level(logging.DEBUG)
    monkeypatch.setattr(LocalBackend, "safety_poll_seconds", 3600.0)
    repo = make_repo(
        flow_env / "repo",
        {
            # The notebook looks for the key where a careless design would leave it.
            "env.ipynb": notebook(
                "import os, sys\nprint(dict(os.environ))\nprint(sys.stdin)",
                "import time\ntime.sleep(1)",
            ),
            "fail.ipynb": notebook("raise ValueError('on purpose')"),
        },
    )
    body = message(repo, ["env.ipynb", "fail.ipynb"], compute={"backend": "local"})
    started = time.monotonic()
    with app_host(flow_env / "state", clock="real") as host:
        plain = host.client_binding

        def with_key() -> str:  # what the Functions host binds: the URLs carry its key
            binding = json.loads(plain())
            urls = binding["managementUrls"]
            urls["sendEventPostUri"] += f"&code={SYSTEM_KEY}"
            return json.dumps(binding)

        host.client_binding = with_key
        instance = deliver(host, body)
        result = host.wait_for(instance, timeout=240)
        wall = time.monotonic() - started
        history = host.history(instance)
        status = host.get_status(instance, show_history=True, show_history_output=True)

    assert result["runtimeStatus"] == "Completed", result
    states = {n["path"]: n["state"] for n in result["output"]["notebooks"]}
    assert states == {"env.ipynb": "succeeded", "fail.ipynb": "failed"}
    assert wall < 240 < 3600  # bounded by the notebooks, not by the safety poll
    kinds = [e.get("EventType") for e in history]
    assert kinds.count(TIMER_FIRED) == 0, "a poll timer fired"
    keys = {run_key(instance, p): p for p in states}
    raised = [json.loads(e["Input"]) for e in history if e.get("EventType") == EVENT_RAISED]
    raised = [json.loads(r) if isinstance(r, str) else r for r in raised]
    ends = {r["runId"]: r["status"] for r in raised if r["status"] != "running"}
    assert ends == {
        run_key(instance, "env.ipynb"): "succeeded",
        run_key(instance, "fail.ipynb"): "failed",
    }
    # Every monitor round after the submits was woken by an event, none by a timer, and read
    # only our runs: those events named, and (status reads are free here) the runs last seen
    # running or, after the first race, every run (policy.to_poll, orchestration._run_rounds).
    events_since = 0
    monitors = 0
    for event in history:
        if event.get("EventType") == EVENT_RAISED:
            payload = json.loads(event["Input"])
            payload = json.loads(payload) if isinstance(payload, str) else payload
            assert payload["runId"] in keys
            events_since += 1
        elif event.get("EventType") == TASK_SCHEDULED and event.get("Name") == "ActivityMonitor":
            polled = {r["path"] for r in json.loads(event["Input"])["runs"]}
            assert polled and polled <= set(states), polled
            assert events_since, "a monitor round that no event woke"
            events_since = 0
            monitors += 1
    assert monitors >= 2
    # The key: nowhere on disk under the test's folders, in no log record, status or output.
    for path in flow_env.rglob("*"):
        if path.is_file():
            assert SYSTEM_KEY.encode() not in path.read_bytes(), path
    assert SYSTEM_KEY not in caplog.text
    assert SYSTEM_KEY not in json.dumps(status)


@pytest.mark.slow
def test_runners_started_both_ways_announce_their_start_and_end(tmp_path, monkeypatch):
    """The first runner is a fresh interpreter (the URL on its stdin), the next ones are forked
    by the fork server (the URL over its socket): each posts `running` and its end to the
    send-event URL, JSON as the durable webhook takes it. A loopback server stands in for the
    host's webhook; the key in the URL is in none of the run's files."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from pathlib import Path

    from notebookops.compute import get_backend, local_forkserver
    from tests.test_compute_local import finish, make_spec, wait_for, write_notebook

    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    runs = tmp_path / "runs"
    monkeypatch.setenv("NOTEBOOKOPS_ALLOW_LOCAL_BACKEND", "1")
    monkeypatch.setenv("NOTEBOOKOPS_LOCAL_RUNS_DIR", str(runs))
    monkeypatch.setenv("NOTEBOOKOPS_LOCAL_WORKERS", "2")
    received: list[tuple[str, str, dict]] = []

    class Webhook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, self.headers["Content-Type"], json.loads(body)))
            self.send_response(202)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = (
        f"http://127.0.0.1:{server.server_address[1]}/runtime/webhooks/durabletask/instances/"
        f"i/raiseEvent/{run_events.EVENT_NAME}?taskHub=h&connection=Storage&code={SYSTEM_KEY}"
    )
    try:
        for name in ("a", "b"):
            write_notebook(checkout / f"{name}.ipynb", f"print('{name}')")
        backend = get_backend("local")
        first = backend.submit(make_spec(checkout, "a.ipynb"), send_event_url=url)
        socket = local_forkserver.socket_path(runs, local_forkserver.key(backend._runner_env()))
        wait_for(socket.exists, 60, "the fork server to listen")
        later = backend.submit(make_spec(checkout, "b.ipynb"), send_event_url=url)
        for handle in (first, later):
            assert finish(backend, handle).state == "succeeded"
        wait_for(lambda: len(received) >= 4, 30, "both runs' announcements")
    finally:
        server.shutdown()
        server.server_close()
    by_run: dict[str, list[str]] = {}
    for path, content_type, payload in received:
        assert path == url.split(f":{server.server_address[1]}", 1)[1]
        assert content_type == "application/json"
        by_run.setdefault(payload["runId"], []).append(payload["status"])
    assert {k: sorted(v) for k, v in by_run.items()} == {
        first.run_id: ["running", "succeeded"],
        later.run_id: ["running", "succeeded"],
    }
    for path in Path(runs).rglob("*"):
        if path.is_file() and not path.is_socket():
            assert SYSTEM_KEY.encode() not in path.read_bytes(), path


def test_the_sdks_warning_for_an_event_kept_for_the_next_wait_is_not_shown_to_users():
    """`notebookops run` printed azure-functions-durable's "Potential duplicate Task completion"
    for every run event that arrived between two waits (kept and delivered, not a duplicate);
    the filter is narrow: the same warning for any other task still shows."""
    import subprocess
    import sys

    code = (
        "import warnings, notebookops.orchestration\n"
        "warnings.warn('Potential duplicate Task completion for TaskId: runStatusChanged')\n"
        "warnings.warn('Potential duplicate Task completion for TaskId: 7')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "TaskId: runStatusChanged" not in proc.stderr
    assert "TaskId: 7" in proc.stderr


def _send_event_url(host, instance: str) -> str:
    """Where a runner posts its run's start and end (the instance's sendEventPostUri)."""
    return (
        f"{host.base_url}/runtime/webhooks/durabletask/instances/{instance}/raiseEvent/"
        f"{run_events.EVENT_NAME}"
    )


class GatedOwnEnds(PushingFake):
    """The fake announcing its own ends, as the local backend does (every generation's first
    round polls every run); it counts status reads per run, and its read of `gate_run`
    blocks once, on its `gate_at`-th read, until the test has raised its events."""

    announces_own_ends = True
    safety_poll_seconds = 3600.0
    gate_run: str | None = None
    gate_at = 2
    reads: ClassVar[dict[str, int]] = {}
    entered = threading.Event()
    release = threading.Event()

    def submit(self, spec, send_event_url=None):
        return super().submit(spec)

    def status(self, handle):
        cls = type(self)
        cls.reads[handle.run_id] = cls.reads.get(handle.run_id, 0) + 1
        if handle.run_id == cls.gate_run and cls.reads[handle.run_id] == cls.gate_at:
            cls.entered.set()
            cls.release.wait(30)
        return super().status(handle)


def _start_and_end(run_key: str) -> None:
    """A run still queued at its last read starts and ends on the service."""
    with FakeBackend.lock:
        run = FakeBackend.runs[run_key]
        run["queued"], run["need"], run["outcome"] = 0, run["polls"] + 1, "succeeded"


@pytest.mark.slow
def test_runs_that_start_and_end_during_a_generations_first_round_are_all_seen(
    flow_env,  # noqa: F811 - the fixture
    monkeypatch,
):
    """Two queued runs start and end while the first round of a new generation is still
    reading statuses, and announce both (as runners do, through the send-event URL, the
    start and end of a short notebook within milliseconds): both are seen at once, not at the
    hour-long safety poll. The SDK registers a wait only once it is yielded and keeps only
    the last event that finds none; before each generation opened its waits first, all but
    one of these runs waited for their safety poll."""
    from notebookops import policy
    from notebookops.compute import registry

    monkeypatch.setitem(registry._factories, "fake", GatedOwnEnds)
    monkeypatch.setenv(run_events.EVENTS_SETTING, "1")
    GatedOwnEnds.reads = {}
    GatedOwnEnds.entered.clear()
    GatedOwnEnds.release.clear()
    paths = ["a.ipynb", "b.ipynb", "c.ipynb"]
    # Queued until the test says otherwise.
    notebooks = {p: fake_notebook(polls=-1, queuedPolls=-1) for p in paths}
    repo = make_repo(flow_env / "repo", notebooks)
    body = message(repo, paths, compute={"backend": "fake"})
    with app_host(flow_env / "state", clock="real") as host:
        instance = deliver(host, body)
        a_key, b_key, c_key = (run_key(instance, p) for p in paths)
        GatedOwnEnds.gate_run = c_key  # read last in a round that polls all three
        url = _send_event_url(host, instance)

        def states():
            custom = (host.get_status(instance) or {}).get("customStatus") or {}
            return {n["path"]: n["state"] for n in custom.get("notebooks", [])}

        _wait(lambda: set(states().values()) == {"queued"})
        # Events naming `b` (still queued) drive one round each until the generation ends;
        # the next generation's first round polls all three and blocks on `c`.
        for _ in range(4 * policy.EVENT_ROUNDS_PER_GENERATION):
            if GatedOwnEnds.entered.is_set():
                break
            reads = GatedOwnEnds.reads.get(b_key, 0)
            assert run_events.post_run_status(url, b_key, "running") is None
            _wait(
                lambda r=reads: (
                    GatedOwnEnds.reads.get(b_key, 0) > r or GatedOwnEnds.entered.is_set()
                )
            )
        assert GatedOwnEnds.entered.is_set(), "no new generation polled every run"
        # a and b were read as queued in this round; they start, end and say so now.
        started = time.monotonic()
        for key in (a_key, b_key):
            _start_and_end(key)
            assert run_events.post_run_status(url, key, "running") is None
            assert run_events.post_run_status(url, key, "succeeded") is None
        time.sleep(0.5)  # the events are in before the round ends
        GatedOwnEnds.release.set()
        _wait(lambda: states().get("a.ipynb") == states().get("b.ipynb") == "succeeded", 20)
        seen_after = time.monotonic() - started
        _start_and_end(c_key)
        assert run_events.post_run_status(url, c_key, "succeeded") is None
        result = host.wait_for(instance, timeout=60)
    assert seen_after < 15
    assert result["output"]["result"] == "succeeded"
