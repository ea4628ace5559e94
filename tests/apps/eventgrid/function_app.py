"""An Event Grid triggered function written like the app's own blueprints will be: it maps an
Azure ML run event to the instance named in the run's tags and raises an external event on
it. Each invocation is appended to the file named by EVENTGRID_EFFECTS, so tests can count."""

import json
import logging
import os

import azure.durable_functions as df
import azure.functions as func

myApp = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


def _record(event_id: str) -> None:
    path = os.environ.get("EVENTGRID_EFFECTS")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(event_id + "\n")


@myApp.event_grid_trigger(arg_name="event")
@myApp.durable_client_input(client_name="client")
async def run_events(event: func.EventGridEvent, client: df.DurableOrchestrationClient) -> None:
    _record(event.id)
    data = event.get_json()
    tags = data.get("runTags") or {}
    if tags.get("explode"):
        raise RuntimeError(f"cannot handle run {data.get('runId')}")
    instance_id = tags.get("instanceId")
    if not instance_id:
        logging.debug("event %s names no instance", event.id)
        return
    if isinstance(event, func.EventGridEvent):
        seen = {
            "kind": "EventGridEvent",
            "eventType": event.event_type,
            "subject": event.subject,
            "topic": event.topic,
            "eventTime": event.event_time.isoformat(),
            "dataVersion": event.data_version,
        }
    else:  # a CloudEvents 1.0 delivery: the worker builds an azure.functions CloudEvent
        seen = {
            "kind": type(event).__name__,
            "eventType": event.type,
            "subject": event.subject,
            "topic": event.source,
            "eventTime": event.time.isoformat(),
        }
    seen.update(runId=data.get("runId"), runStatus=data.get("runStatus"), id=event.id)
    await client.raise_event(instance_id, "RunEvent", seen)


@myApp.orchestration_trigger(context_name="context")
def await_run(context: df.DurableOrchestrationContext):
    seen = yield context.wait_for_external_event("RunEvent")
    # The Python client double-encodes event data; the orchestrator gets the JSON text.
    return json.loads(seen) if isinstance(seen, str) else seen


@myApp.route(route="ping")
def ping(req: func.HttpRequest) -> str:
    return "pong"
