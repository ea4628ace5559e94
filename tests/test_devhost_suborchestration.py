"""Sub-orchestrations on devhost: the child is a real instance started in the parent's commit,
with the parent's id, its own version and the documented history, and its end (completed,
failed or terminated) completes the parent's task. Driven over HTTP and the Python API."""

from __future__ import annotations

import time

import pytest

from devhost import Host
from devhost.events import SUB_ORCHESTRATION_CREATED
from tests.devhost_support import APPS, follow_status, http


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with Host(APPS / "sub_orchestration", tmp_path_factory.mktemp("state")) as h:
        yield h


def test_the_samples_parent_and_child_over_http(host):
    code, body, _ = http("POST", f"{host.base_url}/api/orchestrators/orchestrator")
    assert code == 202
    status = follow_status(body["statusQueryGetUri"])
    assert status["runtimeStatus"] == "Completed"
    assert status["output"] == {"greeting": "Hello Seattle", "version": "1.0", "parent": body["id"]}
    created = [e for e in host.history(body["id"]) if e["EventType"] == SUB_ORCHESTRATION_CREATED]
    child = created[0]["InstanceId"]
    # DTFx's name for a child without an id: the parent's execution id and the task id.
    assert child.endswith(":0") and host.get_status(child)["runtimeStatus"] == "Completed"
    url = f"{body['statusQueryGetUri']}&showHistory=true&showHistoryOutput=true"
    events = http("GET", url)[1]["historyEvents"]
    done = next(e for e in events if e["EventType"] == "SubOrchestrationInstanceCompleted")
    assert done["FunctionName"] == "sub_orchestrator" and done["InstanceId"] == child
    assert done["Result"]["greeting"] == "Hello Seattle" and done["ScheduledTime"]


def test_fan_out_over_children_with_an_explicit_id_and_version(host):
    instance = host.start_new("fan_out")
    status = host.wait_for(instance, 60)
    assert status["runtimeStatus"] == "Completed", status
    assert [r["greeting"] for r in status["output"]] == [
        "Hello Tokyo",
        "Hello Lima",
        "Hello Oslo",
        "Hello Rome",
    ]
    assert [r["version"] for r in status["output"]] == ["1.0", "1.0", "1.0", "0.9"]
    assert host.get_status(f"{instance}-rome")["runtimeStatus"] == "Completed"


def test_a_failing_child_raises_in_the_parent_with_its_reason(host):
    status = host.wait_for(host.start_new("catches_failure"), 30)
    # The SDK raises "<Reason> \n <Details>"; the reason is the child's failure, as DTFx gives it.
    assert status["output"]["caught"].strip() == (
        "Orchestrator function 'failing_child' failed: the child gave up"
    )


def test_a_terminated_child_fails_the_parents_task(host):
    parent = host.start_new("waits_on_child")
    child = f"{parent}-child"
    deadline = time.monotonic() + 30
    while (host.get_status(child) or {}).get("runtimeStatus") != "Running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    host.terminate(child, "operator stopped it")
    status = host.wait_for(parent, 30)
    assert "was terminated: operator stopped it" in status["output"]["caught"]


def test_a_child_id_that_is_running_fails_the_task_and_leaves_that_instance_alone(host):
    busy = host.start_new("waiting_child", instance_id="taken-child")
    first = host.start_new("waits_on_child", instance_id="taken")
    # "taken" asks for child "taken-child", which is running already.
    status = host.wait_for(first, 30)
    assert "already exists" in status["output"]["caught"]
    assert host.get_status(busy)["runtimeStatus"] == "Running"
    host.raise_event(busy, "Go", '"ok"')
    assert host.wait_for(busy, 30)["output"] == "ok"


def test_a_child_called_with_retry_is_started_again_until_it_succeeds(host, tmp_path):
    spec = {"attempts": 4, "succeed_on": 3, "counter": str(tmp_path / "n"), "child_id": "kid"}
    parent = host.start_new("retries_child", spec)
    status = host.wait_for(parent, 60)
    assert status["output"] == {"value": "ok after 3"}
    history = host.history(parent)
    created = [e for e in history if e["EventType"] == SUB_ORCHESTRATION_CREATED]
    # Three attempts of the same explicit child id, ids interleaved with the retry timers.
    assert [e["InstanceId"] for e in created] == ["kid"] * 3
    assert [e["EventId"] for e in created] == [0, 2, 4]
    assert host.get_status("kid")["runtimeStatus"] == "Completed"


def test_a_child_out_of_retries_raises_its_last_failure(host, tmp_path):
    spec = {"attempts": 2, "succeed_on": 99, "counter": str(tmp_path / "n")}
    status = host.wait_for(host.start_new("retries_child", spec), 60)
    assert status["output"]["caught"].startswith(
        "Orchestrator function 'flaky_child' failed: Activity function 'flaky' failed: "
        "RuntimeError: attempt 2 failed"
    )
    assert (tmp_path / "n").read_text() == "2"
