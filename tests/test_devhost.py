"""devhost driving the tests' own orchestrators through the real azure-functions-durable SDK."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from devhost import AppIndexError, Host, StateError
from devhost.events import EVENT_RAISED, TASK_COMPLETED, TASK_SCHEDULED, TIMER_CREATED
from tests.devhost_support import SAMPLE_APP


@pytest.fixture
def host(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMPLE_EFFECTS", str(tmp_path / "effects.txt"))
    with Host(SAMPLE_APP, tmp_path / "state", clock="virtual") as h:
        yield h


def test_chaining_returns_results_in_order(host):
    instance = host.start_new("Chain", ["Tokyo", "Seattle", "London"])
    status = host.wait_for(instance, 30)
    assert status["runtimeStatus"] == "Completed"
    assert status["output"] == ["Hello Tokyo!", "Hello Seattle!", "Hello London!"]
    # One TaskScheduled per call, numbered 0, 1, 2 like DTFx.
    scheduled = [e for e in host.history(instance) if e["EventType"] == TASK_SCHEDULED]
    assert [(e["EventId"], e["Name"]) for e in scheduled] == [
        (0, "Hello"),
        (1, "Hello"),
        (2, "Hello"),
    ]


def test_fan_out_fan_in_of_fifty(host, tmp_path):
    instance = host.start_new("FanOut", {"count": 50})
    status = host.wait_for(instance, 60)
    assert status["output"] == sum(i * i for i in range(50))
    effects = (tmp_path / "effects.txt").read_text().split("\n")
    assert sorted(line for line in effects if line) == sorted(f"work {i}" for i in range(50))


def test_timers_move_the_orchestrators_clock_without_waiting(host):
    instance = host.start_new("Timers", [5, 60])
    status = host.wait_for(instance, 30)
    # 5 minutes then 60 more, as seen by context.current_utc_datetime.
    assert status["output"] == [300.0, 3900.0]
    timers = [e for e in host.history(instance) if e["EventType"] == TIMER_CREATED]
    assert len(timers) == 2


def test_retry_succeeds_on_third_attempt_with_host_side_backoff(host, tmp_path):
    spec = {"interval_ms": 2000, "attempts": 5, "succeed_on": 3, "counter": str(tmp_path / "c")}
    instance = host.start_new("Retry", spec)
    status = host.wait_for(instance, 30)
    assert status["output"]["value"] == "ok after 3"
    history = host.history(instance)
    attempts = [e for e in history if e["EventType"] == TASK_SCHEDULED]
    retry_timers = [e for e in history if e["EventType"] == TIMER_CREATED]
    assert len(attempts) == 3 and len(retry_timers) == 2
    # Ids interleave as DTFx assigns them: attempt 0, timer 1, attempt 2, timer 3, attempt 4.
    assert [e["EventId"] for e in attempts] == [0, 2, 4]
    assert [e["EventId"] for e in retry_timers] == [1, 3]
    created = json.loads(json.dumps(status))["createdTime"]
    assert created  # the wait between attempts is the first retry interval on the durable clock
    assert status["output"]["at"].startswith("2024-01-01T00:00:04")


def test_retries_exhausted_raise_the_last_failure(host, tmp_path):
    spec = {"interval_ms": 1000, "attempts": 3, "succeed_on": 99, "counter": str(tmp_path / "c")}
    status = host.wait_for(host.start_new("Retry", spec), 30)
    assert status["runtimeStatus"] == "Completed"
    assert status["output"]["error"].startswith(
        "Activity function 'Flaky' failed: RuntimeError: attempt 3 failed"
    )
    assert (tmp_path / "c").read_text() == "3"


@pytest.fixture
def real_host(tmp_path):
    with Host(SAMPLE_APP, tmp_path / "state-real", clock="real") as h:
        yield h


def test_external_event_wins_the_race_against_a_timer(real_host):
    # A real clock: on the virtual one the hour-long timer would fire as soon as all is idle.
    host = real_host
    instance = host.start_new("Approval")
    # Wait until the orchestrator is listening, then raise the event (JSON text as the host stores it).
    _wait_status(host, instance, lambda s: s["runtimeStatus"] == "Running")
    host.raise_event(instance, "Approve", json.dumps({"by": "ada"}))
    status = host.wait_for(instance, 30)
    assert status["output"] == {"approved": {"by": "ada"}}


def test_an_event_raised_for_a_later_time_arrives_then_on_the_virtual_clock(host):
    # Status waits for "Go" with no timer: only the delayed event can move the clock.
    from datetime import timedelta

    instance = host.start_new("Status")
    start = host.clock.now()
    late = start + timedelta(hours=2)
    host.raise_event(instance, "Go", "null", at=late)
    status = host.wait_for(instance, 30)
    assert status["customStatus"] == {"stage": "done"}
    assert host.clock.now() == late  # the clock jumped to the delivery, not beyond
    raised = [e for e in host.history(instance) if e["EventType"] == EVENT_RAISED]
    assert [e["Timestamp"][:19] for e in raised] == [late.strftime("%Y-%m-%dT%H:%M:%S")]
    # A time already past is delivered now: the clock never runs backwards.
    again = host.start_new("Status")
    host.raise_event(again, "Go", "null", at=start)
    assert host.wait_for(again, 30)["customStatus"] == {"stage": "done"}
    assert host.clock.now() == late


def test_timer_wins_when_no_event_arrives(host):
    status = host.wait_for(host.start_new("Approval"), 30)
    assert status["output"] == {"approved": None}


def test_continue_as_new_keeps_history_to_one_generation(host):
    instance = host.start_new("Counter", {"n": 0, "limit": 4})
    status = host.wait_for(instance, 30)
    assert status["output"] == {"done": 4}
    assert status["customStatus"] == {"n": 3}
    assert json.loads(status["input"]) == {"n": 3, "limit": 4}
    history = host.history(instance)
    # Only the last generation is kept: one activity, not four.
    assert sum(e["EventType"] == TASK_SCHEDULED for e in history) == 1
    assert history[1]["Generation"] == 3


def test_custom_status_is_visible_while_running(real_host):
    host = real_host
    instance = host.start_new("Status")
    status = _wait_status(host, instance, lambda s: s["customStatus"] is not None)
    assert status["customStatus"] == {"stage": "waiting"}
    assert status["runtimeStatus"] == "Running"
    host.raise_event(instance, "Go", "null")
    assert host.wait_for(instance, 30)["customStatus"] == {"stage": "done"}


def test_orchestrator_exception_fails_the_instance_with_its_message(host):
    status = host.wait_for(host.start_new("Boom"), 30)
    assert status["runtimeStatus"] == "Failed"
    assert status["output"] == "Orchestrator function 'Boom' failed: the orchestrator gave up"


def test_unknown_activity_fails_like_the_real_host(host):
    status = host.wait_for(host.start_new("Missing"), 30)
    assert status["runtimeStatus"] == "Failed"
    assert "The function 'NoSuchActivity' doesn't exist" in status["output"]


def test_non_determinism_is_detected_and_names_both_activities(host, tmp_path):
    flag = tmp_path / "switch"
    instance = host.start_new("Shifty", str(flag))
    # Wait until Hello's completion was replayed (the instance now waits for the event):
    # changing the code any earlier would be caught by that replay instead.
    _wait_status(
        host,
        instance,
        lambda s: any(e["EventType"] == TASK_COMPLETED for e in host.history(instance)),
    )
    assert _scheduled(host, instance) == ["Hello"]
    flag.write_text("now call Work instead")
    host.raise_event(instance, "Continue", "null")
    status = host.wait_for(instance, 30)
    assert status["runtimeStatus"] == "Failed"
    assert "Non-Deterministic workflow detected" in status["output"]
    assert "'Hello'" in status["output"] and "'Work'" in status["output"]


def test_terminate_stops_the_instance_and_keeps_the_reason(real_host):
    host = real_host
    instance = host.start_new("Status")
    _wait_status(host, instance, lambda s: s["runtimeStatus"] == "Running")
    host.terminate(instance, "no longer needed")
    status = host.wait_for(instance, 10)
    assert status["runtimeStatus"] == "Terminated"
    assert status["output"] == "no longer needed"


def test_a_follower_is_woken_by_the_next_change_not_its_timeout(real_host):
    import threading
    import time

    host = real_host
    instance = host.start_new("Status")
    _wait_status(host, instance, lambda s: (s.get("customStatus") or {}).get("stage") == "waiting")
    woken = []

    def follow() -> None:
        started = time.monotonic()
        host.wait_changed(30)
        woken.append(time.monotonic() - started)

    follower = threading.Thread(target=follow)
    follower.start()
    time.sleep(0.2)  # the follower is waiting
    host.raise_event(instance, "Go", "null")
    follower.join(timeout=30)
    assert woken and woken[0] < 10, woken
    assert host.wait_for(instance, 10)["customStatus"] == {"stage": "done"}
    started = time.monotonic()
    host.wait_changed(0.2)  # nothing changes any more: the timeout ends the wait
    assert time.monotonic() - started >= 0.19


def test_instance_survives_a_host_restart(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMPLE_EFFECTS", str(tmp_path / "effects.txt"))
    with Host(SAMPLE_APP, tmp_path / "state", clock="virtual") as first:
        instance = first.start_new("Status")
        _wait_status(first, instance, lambda s: s["customStatus"] is not None)
    with Host(SAMPLE_APP, tmp_path / "state", clock="virtual") as second:
        second.raise_event(instance, "Go", "null")
        assert second.wait_for(instance, 30)["output"] == "finished"


def test_real_clock_timer_waits_for_real(tmp_path):
    import time

    with Host(SAMPLE_APP, tmp_path / "state", clock="real") as host:
        started = time.monotonic()
        status = host.wait_for(host.start_new("Timers", [0.02]), 30)  # 1.2 seconds
        assert status["runtimeStatus"] == "Completed"
        assert time.monotonic() - started >= 1.1


def test_app_with_a_binding_that_has_no_parameter_is_refused(tmp_path):
    with pytest.raises(AppIndexError, match="function 'Mismatch': binding 'payload'"):
        Host(SAMPLE_APP.parent / "bad_param", tmp_path).start()


def test_app_with_an_unsupported_trigger_is_refused(tmp_path):
    with pytest.raises(AppIndexError, match="function 'Tick': trigger type 'timerTrigger'"):
        Host(SAMPLE_APP.parent / "bad_trigger", tmp_path).start()


def test_corrupt_state_file_is_named_and_left_alone(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    path = state / "devhost.sqlite3"
    path.write_bytes(b"this is not a database at all" * 100)
    before = path.read_bytes()
    with pytest.raises(StateError, match=r"devhost\.sqlite3"):
        Host(SAMPLE_APP, state).start()
    assert path.read_bytes() == before


def test_state_file_of_a_newer_format_is_refused(tmp_path):
    state = tmp_path / "state"
    with Host(SAMPLE_APP, state, clock="virtual"):
        pass
    db = sqlite3.connect(state / "devhost.sqlite3")
    db.execute("UPDATE meta SET value='99' WHERE key='format'")
    db.commit()
    db.close()
    with pytest.raises(StateError, match="format 99 is newer"):
        Host(SAMPLE_APP, state).start()


def _scheduled(host, instance) -> list[str]:
    return [e["Name"] for e in host.history(instance) if e["EventType"] == TASK_SCHEDULED]


def _wait_status(host, instance, predicate, timeout: float = 20.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = host.get_status(instance)
        if status and predicate(status):
            return status
        time.sleep(0.02)
    raise AssertionError(f"condition not reached; last status {host.get_status(instance)}")


def test_sample_app_path_exists():
    assert Path(SAMPLE_APP / "function_app.py").is_file()
