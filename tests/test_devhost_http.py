"""devhost over real HTTP on loopback: the unmodified DurableOrchestrationClient talks to the
durable API devhost serves, HTTP functions answer under /api/, and Core Tools' admin endpoint
fires the Service Bus trigger with a real azure.functions.ServiceBusMessage."""

from __future__ import annotations

import base64
import json
import time

import pytest

from devhost import Host
from tests.devhost_support import SAMPLE_APP, http


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with Host(SAMPLE_APP, tmp_path_factory.mktemp("state"), clock="real") as h:
        yield h


def client(host, op, **args):
    status, body, _ = http("POST", f"{host.base_url}/api/client/{op}", args)
    assert status == 200, body
    return body


def wait_done(host, instance, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client(host, "status", id=instance)
        if status and status["runtimeStatus"] in ("Completed", "Failed", "Terminated"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"{instance} did not finish")


def test_http_starter_answers_202_with_management_links(host):
    status, body, headers = http("POST", f"{host.base_url}/api/start/Chain", ["Oslo"])
    assert status == 202
    assert headers["Location"] == body["statusQueryGetUri"]
    assert body["statusQueryGetUri"].startswith(
        f"{host.base_url}/runtime/webhooks/durabletask/instances/"
    )
    # Following the link works like on Azure: 202 while running, 200 with the output at the end.
    deadline = time.monotonic() + 30
    while True:
        code, payload, _ = http("GET", body["statusQueryGetUri"])
        if code == 200:
            break
        assert code == 202 and time.monotonic() < deadline
        time.sleep(0.05)
    assert payload["runtimeStatus"] == "Completed"
    assert payload["output"] == ["Hello Oslo!"]


def test_client_status_with_history_and_status_by(host):
    _, started, _ = http("POST", f"{host.base_url}/api/start/Chain", ["A", "B"])
    done = wait_done(host, started["id"])
    assert done["output"] == ["Hello A!", "Hello B!"]
    with_history = client(host, "status", id=started["id"], history=True)
    names = [e["EventType"] for e in with_history["historyEvents"]]
    assert names[0] == "ExecutionStarted" and names[-1] == "ExecutionCompleted"
    assert started["id"] in client(host, "status_by", statuses=["Completed"])


def test_client_raise_event_terminate_and_purge(host):
    _, first, _ = http("POST", f"{host.base_url}/api/start/Approval")
    time.sleep(0.3)
    assert client(host, "raise", id=first["id"], event="Approve", data={"ok": True}) == "raised"
    done = wait_done(host, first["id"])
    # The Python client double-encodes event data (azure-functions-durable-python #295), and
    # devhost keeps that: the orchestrator receives the JSON text.
    assert json.loads(done["output"]["approved"]) == {"ok": True}

    _, second, _ = http("POST", f"{host.base_url}/api/start/Status")
    time.sleep(0.3)
    assert client(host, "terminate", id=second["id"], reason="stop") == "terminated"
    assert wait_done(host, second["id"])["runtimeStatus"] == "Terminated"
    assert client(host, "purge", id=second["id"]) == 1
    code, _, _ = http(
        "GET", f"{host.base_url}/runtime/webhooks/durabletask/instances/{second['id']}"
    )
    assert code == 404


def test_raise_event_on_finished_instance_is_410_and_unknown_is_404(host):
    instance = host.start_new("Chain", ["x"])
    host.wait_for(instance, 30)
    base = f"{host.base_url}/runtime/webhooks/durabletask/instances"
    assert http("POST", f"{base}/{instance}/raiseEvent/Go", {"a": 1})[0] == 410
    assert http("POST", f"{base}/nope/raiseEvent/Go", {"a": 1})[0] == 404
    assert http("POST", f"{base}/nope/terminate?reason=x")[0] == 404


def test_bad_requests_get_clear_errors(host):
    durable = f"{host.base_url}/runtime/webhooks/durabletask"
    code, body, _ = http("POST", f"{durable}/orchestrators/NotAnOrchestrator")
    assert code == 400 and "NotAnOrchestrator" in body["ExceptionMessage"]
    code, body, _ = http("POST", f"{durable}/orchestrators/Chain/@bad")
    assert code == 400 and "Instance ID" in body["ExceptionMessage"]
    code, body, _ = http("POST", f"{durable}/orchestrators/Chain", raw=b"{not json")
    assert code == 400
    code, body, _ = http("POST", f"{host.base_url}/admin/functions/NoSuchFunction", {"input": "x"})
    assert code == 404 and "NoSuchFunction" in body["error"]
    code, body, _ = http("POST", f"{host.base_url}/admin/functions/QueueStart", raw=b"{oops")
    assert code == 400


def test_running_instance_id_is_not_overwritten(host):
    durable = f"{host.base_url}/runtime/webhooks/durabletask"
    assert http("POST", f"{durable}/orchestrators/Status/keep-me")[0] == 202
    code, body, _ = http("POST", f"{durable}/orchestrators/Status/keep-me")
    assert code == 409 and "already exists" in body["ExceptionMessage"]
    host.terminate("keep-me", "cleanup")


def test_admin_endpoint_delivers_a_service_bus_message_with_properties(host):
    body = {"orchestrator": "Chain", "input": ["Queue"]}
    code, _, _ = http(
        "POST",
        f"{host.base_url}/admin/functions/QueueStart",
        {
            "input": json.dumps(body),
            "applicationProperties": {"InstanceId": "from-queue-1"},
            "messageId": "m-1",
            "deliveryCount": 1,
        },
    )
    assert code == 202
    assert host.wait_for("from-queue-1", 30)["output"] == ["Hello Queue!"]
    # A duplicate delivery starts nothing new: the function sees the instance exists.
    code, _, _ = http(
        "POST",
        f"{host.base_url}/admin/functions/QueueStart",
        {
            "inputBase64": base64.b64encode(json.dumps(body).encode()).decode(),
            "applicationProperties": {"InstanceId": "from-queue-1"},
        },
    )
    assert code == 202
    assert len(host.query(None, None, None, "from-queue-1")) == 1


def test_admin_error_from_the_function_is_500_with_the_reason(host):
    code, body, _ = http(
        "POST", f"{host.base_url}/admin/functions/QueueStart", {"input": "not json"}
    )
    assert code == 500
    assert "JSONDecodeError" in body["error"]
