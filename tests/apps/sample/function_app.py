"""Orchestrators and activities of devhost's own tests (no notebooks here).

Activities that have side effects append a line to the file named by SAMPLE_EFFECTS, so
tests can count how often each ran.
"""

import json
import os
import time
from datetime import timedelta

import azure.durable_functions as df
import azure.functions as func

app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


def _effect(tag: str) -> None:
    path = os.environ.get("SAMPLE_EFFECTS")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(tag + "\n")


@app.activity_trigger(input_name="name")
def Hello(name: str) -> str:
    return f"Hello {name}!"


@app.activity_trigger(input_name="item")
def Work(item: dict) -> dict:
    time.sleep(float(item.get("sleep", 0)))
    _effect(f"work {item['n']}")
    return {"n": item["n"], "square": item["n"] * item["n"]}


@app.activity_trigger(input_name="payload")
def Flaky(payload: dict) -> str:
    """Fails until it has been called `succeed_on` times for this key (counted in a file)."""
    counter = payload["counter"]
    count = int(open(counter).read()) + 1 if os.path.exists(counter) else 1  # noqa: SIM115
    with open(counter, "w") as fh:
        fh.write(str(count))
    if count < payload["succeed_on"]:
        raise RuntimeError(f"attempt {count} failed")
    return f"ok after {count}"


@app.orchestration_trigger(context_name="context")
def Chain(context: df.DurableOrchestrationContext):
    names = context.get_input() or ["Tokyo", "Seattle", "London"]
    results = []
    for n in names:
        results.append((yield context.call_activity("Hello", n)))
    return results


@app.orchestration_trigger(context_name="context")
def FanOut(context: df.DurableOrchestrationContext):
    spec = context.get_input()
    tasks = [
        context.call_activity("Work", {"n": i, "sleep": spec.get("sleep", 0)})
        for i in range(spec["count"])
    ]
    results = yield context.task_all(tasks)
    return sum(r["square"] for r in results)


@app.orchestration_trigger(context_name="context")
def Timers(context: df.DurableOrchestrationContext):
    start = context.current_utc_datetime
    seen = []
    for minutes in context.get_input():
        yield context.create_timer(context.current_utc_datetime + timedelta(minutes=minutes))
        seen.append((context.current_utc_datetime - start).total_seconds())
    return seen


@app.orchestration_trigger(context_name="context")
def Retry(context: df.DurableOrchestrationContext):
    spec = context.get_input()
    options = df.RetryOptions(
        first_retry_interval_in_milliseconds=spec["interval_ms"],
        max_number_of_attempts=spec["attempts"],
    )
    try:
        value = yield context.call_activity_with_retry("Flaky", options, spec)
    except Exception as exc:
        return {"error": str(exc).split("\n")[0]}
    return {"value": value, "at": context.current_utc_datetime.isoformat()}


@app.orchestration_trigger(context_name="context")
def Approval(context: df.DurableOrchestrationContext):
    timeout = context.create_timer(context.current_utc_datetime + timedelta(hours=1))
    approval = context.wait_for_external_event("Approve")
    winner = yield context.task_any([approval, timeout])
    if winner == approval:
        timeout.cancel()
        return {"approved": approval.result}
    return {"approved": None}


@app.orchestration_trigger(context_name="context")
def Counter(context: df.DurableOrchestrationContext):
    state = context.get_input() or {"n": 0, "limit": 3}
    yield context.call_activity("Hello", str(state["n"]))
    context.set_custom_status({"n": state["n"]})
    if state["n"] + 1 < state["limit"]:
        context.continue_as_new({"n": state["n"] + 1, "limit": state["limit"]})
        return None
    return {"done": state["n"] + 1}


@app.orchestration_trigger(context_name="context")
def Status(context: df.DurableOrchestrationContext):
    context.set_custom_status({"stage": "waiting"})
    yield context.wait_for_external_event("Go")
    context.set_custom_status({"stage": "done"})
    return "finished"


@app.orchestration_trigger(context_name="context")
def Boom(context: df.DurableOrchestrationContext):
    yield context.call_activity("Hello", "x")
    raise ValueError("the orchestrator gave up")


@app.orchestration_trigger(context_name="context")
def Shifty(context: df.DurableOrchestrationContext):
    """Non-deterministic on purpose: which activity it calls depends on a file."""
    first = "Hello" if not os.path.exists(context.get_input()) else "Work"
    yield context.call_activity(first, "a" if first == "Hello" else {"n": 1})
    yield context.wait_for_external_event("Continue")
    return "done"


@app.orchestration_trigger(context_name="context")
def Missing(context: df.DurableOrchestrationContext):
    yield context.call_activity("NoSuchActivity", 1)


@app.service_bus_queue_trigger(arg_name="msg", queue_name="jobs", connection="ServiceBusConnection")
@app.durable_client_input(client_name="client")
async def QueueStart(msg: func.ServiceBusMessage, client: df.DurableOrchestrationClient) -> None:
    body = json.loads(msg.get_body())
    props = msg.application_properties or msg.user_properties
    instance_id = props.get("InstanceId") or msg.message_id
    existing = await client.get_status(instance_id)
    if existing and existing.runtime_status is not None:
        return
    await client.start_new(body["orchestrator"], instance_id, body.get("input"))


@app.route(route="start/{name}", methods=["POST"])
@app.durable_client_input(client_name="client")
async def HttpStart(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    payload = req.get_json() if req.get_body() else None
    instance_id = await client.start_new(req.route_params["name"], None, payload)
    return client.create_check_status_response(req, instance_id)


@app.route(route="client/{op}", methods=["POST"])
@app.durable_client_input(client_name="client")
async def ClientOps(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    """Drives every client call the tests need, over the SDK's own HTTP client."""
    args = req.get_json()
    op = req.route_params["op"]
    if op == "status":
        status = await client.get_status(args["id"], show_history=args.get("history", False))
        result = status.to_json() if status and status.runtime_status else None
        if result is not None and args.get("history"):
            # The SDK keeps the API's historyEvents under that name; .history stays None.
            result["historyEvents"] = getattr(status, "historyEvents", None)
    elif op == "status_by":
        found = await client.get_status_by(
            runtime_status=[df.OrchestrationRuntimeStatus(s) for s in args["statuses"]]
        )
        result = sorted(s.instance_id for s in found)
    elif op == "raise":
        await client.raise_event(args["id"], args["event"], args["data"])
        result = "raised"
    elif op == "terminate":
        await client.terminate(args["id"], args["reason"])
        result = "terminated"
    elif op == "purge":
        purged = await client.purge_instance_history(args["id"])
        result = purged.instances_deleted
    else:
        return func.HttpResponse(f"unknown op {op}", status_code=400)
    return func.HttpResponse(json.dumps(result, default=str), mimetype="application/json")
