"""devhost's eventGridTrigger: deliveries through the Event Grid webhook
(`/runtime/webhooks/eventgrid?functionName=...`, with the subscription validation handshake)
and through Core Tools' admin convention, with Azure ML run events shaped like the Event Grid
schema documentation. The function gets a real azure.functions.EventGridEvent from the
worker's converter and raises an external event through the unmodified durable client."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest

from devhost import Host, HostError
from tests.devhost_support import APPS, http

EVENTS = json.loads((APPS / "eventgrid" / "azureml_events.json").read_text())


def azureml_event(kind: str, instance_id: str | None = None, **tags) -> dict:
    event = copy.deepcopy(EVENTS[kind])
    event["data"]["runTags"] = {"instanceId": instance_id, **tags} if instance_id else tags
    return event


@pytest.fixture(scope="module")
def effects(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("effects") / "invocations.txt"


@pytest.fixture(scope="module")
def host(tmp_path_factory, effects):
    mp = pytest.MonkeyPatch()
    mp.setenv("EVENTGRID_EFFECTS", str(effects))
    with Host(APPS / "eventgrid", tmp_path_factory.mktemp("state")) as h:
        yield h
    mp.undo()


def webhook(host, body, *, event_type="Notification", function="run_events"):
    headers = {"aeg-event-type": event_type} if event_type else {}
    url = f"{host.base_url}/runtime/webhooks/eventgrid"
    if function is not None:
        url += f"?functionName={function}"
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http("POST", url, raw=raw, headers=headers)


def invocations(effects: Path) -> list[str]:
    return effects.read_text().split() if effects.exists() else []


def waiting(host, instance_id: str) -> str:
    host.start_new("await_run", instance_id=instance_id)
    deadline = time.monotonic() + 30
    while host.get_status(instance_id)["runtimeStatus"] != "Running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return instance_id


def test_subscription_validation_answers_the_code_and_invokes_nothing(host, effects):
    before = invocations(effects)
    code, body, _ = webhook(
        host, [EVENTS["SubscriptionValidationEvent"]], event_type="SubscriptionValidation"
    )
    assert code == 200
    assert body == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}
    assert invocations(effects) == before


def test_a_notification_of_azureml_events_reaches_each_waiting_instance(host, effects):
    completed, changed = waiting(host, "eg-completed"), waiting(host, "eg-changed")
    body = [azureml_event("RunCompleted", completed), azureml_event("RunStatusChanged", changed)]
    code, _, _ = webhook(host, body)
    assert code == 202
    done = host.wait_for(completed, 30)["output"]
    status = host.wait_for(changed, 30)["output"]
    assert done == {
        "kind": "EventGridEvent",
        "eventType": "Microsoft.MachineLearningServices.RunCompleted",
        "subject": "experiments/0fa9dfaa-cba3-4fa7-b590-23e48548f5c1/runs/nbops-1234-a_ipynb",
        "topic": EVENTS["RunCompleted"]["topic"],
        # The converter keeps six of .NET's seven fractional digits, in UTC.
        "eventTime": "2026-06-26T18:41:00.958410+00:00",
        "dataVersion": "2",
        "runId": "nbops-1234-a_ipynb",
        "runStatus": None,
        "id": EVENTS["RunCompleted"]["id"],
    }
    assert status["eventType"] == "Microsoft.MachineLearningServices.RunStatusChanged"
    assert status["runStatus"] == "Failed" and status["runId"] == "nbops-1234-b_ipynb"
    assert invocations(effects).count(EVENTS["RunCompleted"]["id"]) == 1


def test_the_admin_convention_delivers_one_event(host):
    instance = waiting(host, "eg-admin")
    event = azureml_event("RunStatusChanged", instance)
    code, _, _ = http(
        "POST", f"{host.base_url}/admin/functions/run_events", {"input": json.dumps(event)}
    )
    assert code == 202
    assert host.wait_for(instance, 30)["output"]["runStatus"] == "Failed"


def test_a_cloud_event_is_delivered_as_a_cloud_event(host):
    instance = waiting(host, "eg-cloud")
    event = {
        "specversion": "1.0",
        "id": "ce-1",
        "source": EVENTS["RunCompleted"]["topic"],
        "type": "Microsoft.MachineLearningServices.RunCompleted",
        "subject": "experiments/x/runs/r-ce",
        "time": "2026-06-26T18:41:00Z",
        "data": {"runId": "r-ce", "runTags": {"instanceId": instance}},
    }
    assert webhook(host, event)[0] == 202
    output = host.wait_for(instance, 30)["output"]
    assert output["kind"] == "CloudEvent" and output["runId"] == "r-ce"


def test_a_failing_function_answers_500_naming_the_event_and_the_others_still_run(host):
    instance = waiting(host, "eg-after-failure")
    boom = azureml_event("RunCompleted", None, explode="yes")
    boom["id"] = "event-that-fails"
    code, body, _ = webhook(host, [boom, azureml_event("RunStatusChanged", instance)])
    assert code == 500
    assert body["failures"][0]["id"] == "event-that-fails"
    assert "RuntimeError: cannot handle run nbops-1234-a_ipynb" in body["failures"][0]["error"]
    assert host.wait_for(instance, 30)["runtimeStatus"] == "Completed"


def test_bad_deliveries_get_clear_errors(host, effects):
    before = invocations(effects)
    code, body, _ = webhook(host, [EVENTS["RunCompleted"]], function=None)
    assert code == 404 and "cannot find function: ''" in body["Message"]
    code, body, _ = webhook(host, [EVENTS["RunCompleted"]], function="ping")
    assert code == 404 and "run_events" in body["Message"]
    code, body, _ = webhook(host, [EVENTS["RunCompleted"]], event_type=None)
    assert code == 400 and "aeg-event-type" in body["Message"]
    no_type = azureml_event("RunCompleted")
    del no_type["eventType"]
    code, body, _ = webhook(host, [EVENTS["RunStatusChanged"], no_type])
    assert code == 400 and body["Message"].startswith("events[1].eventType: required")
    assert webhook(host, b"{not json")[0] == 400
    code, body, _ = webhook(host, [EVENTS["RunCompleted"]], event_type="SubscriptionValidation")
    assert code == 400 and "SubscriptionValidationEvent" in body["Message"]
    assert invocations(effects) == before  # nothing was delivered by a refused request
    assert webhook(host, [], event_type="Unsubscribe")[0] == 202


def test_cloud_events_webhook_validation_allows_the_asking_origin(host):
    import urllib.request

    request = urllib.request.Request(  # noqa: S310 - loopback
        f"{host.base_url}/runtime/webhooks/eventgrid?functionName=run_events",
        method="OPTIONS",
        headers={"WebHook-Request-Origin": "eventgrid.azure.net"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
        assert response.status == 200
        assert response.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"


def test_python_api_delivers_and_refuses_an_event_without_its_fields(host):
    instance = waiting(host, "eg-api")
    host.deliver_event_grid("run_events", azureml_event("RunCompleted", instance))
    assert host.wait_for(instance, 30)["output"]["runId"] == "nbops-1234-a_ipynb"
    bad = azureml_event("RunCompleted")
    bad["eventTime"] = "yesterday"
    with pytest.raises(HostError, match="eventTime"):
        host.deliver_event_grid("run_events", bad)
