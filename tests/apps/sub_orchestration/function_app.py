"""Sub-orchestrations the way the samples use them: an HTTP starter, a parent calling a child
that calls an activity, fan-out over children, an explicit child id and version, a child
that fails and one that waits (so a test can terminate it)."""

import os

import azure.durable_functions as df
import azure.functions as func

myApp = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@myApp.route(route="orchestrators/{functionName}")
@myApp.durable_client_input(client_name="client")
async def durable_trigger(req: func.HttpRequest, client):
    instance_id = await client.start_new(req.route_params.get("functionName"))
    return client.create_check_status_response(req, instance_id)


@myApp.orchestration_trigger(context_name="context")
def orchestrator(context: df.DurableOrchestrationContext):
    result = yield context.call_sub_orchestrator("sub_orchestrator", "Seattle")
    return result


@myApp.orchestration_trigger(context_name="context")
def sub_orchestrator(context: df.DurableOrchestrationContext):
    greeting = yield context.call_activity("hello", context.get_input())
    return {"greeting": greeting, "version": context.version, "parent": context.parent_instance_id}


@myApp.orchestration_trigger(context_name="context")
def fan_out(context: df.DurableOrchestrationContext):
    cities = ["Tokyo", "Lima", "Oslo"]
    children = [context.call_sub_orchestrator("sub_orchestrator", c) for c in cities]
    explicit = context.call_sub_orchestrator(
        "sub_orchestrator", "Rome", instance_id=f"{context.instance_id}-rome", version="0.9"
    )
    results = yield context.task_all([*children, explicit])
    return results


@myApp.orchestration_trigger(context_name="context")
def catches_failure(context: df.DurableOrchestrationContext):
    try:
        yield context.call_sub_orchestrator("failing_child", None)
    except Exception as exc:
        return {"caught": str(exc).split("\n")[0]}
    return {"caught": None}


@myApp.orchestration_trigger(context_name="context")
def failing_child(context: df.DurableOrchestrationContext):
    yield context.call_activity("hello", "doomed")
    raise ValueError("the child gave up")


@myApp.orchestration_trigger(context_name="context")
def waits_on_child(context: df.DurableOrchestrationContext):
    try:
        value = yield context.call_sub_orchestrator(
            "waiting_child", None, instance_id=f"{context.instance_id}-child"
        )
    except Exception as exc:
        return {"caught": str(exc).split("\n")[0]}
    return {"value": value}


@myApp.orchestration_trigger(context_name="context")
def waiting_child(context: df.DurableOrchestrationContext):
    value = yield context.wait_for_external_event("Go")
    return value


@myApp.activity_trigger(input_name="name")
def hello(name: str):
    return "Hello " + name


@myApp.orchestration_trigger(context_name="context")
def retries_child(context: df.DurableOrchestrationContext):
    spec = context.get_input()
    options = df.RetryOptions(
        first_retry_interval_in_milliseconds=200, max_number_of_attempts=spec["attempts"]
    )
    try:
        value = yield context.call_sub_orchestrator_with_retry(
            "flaky_child", options, spec, instance_id=spec.get("child_id")
        )
    except Exception as exc:
        return {"caught": str(exc).split("\n")[0].strip()}
    return {"value": value}


@myApp.orchestration_trigger(context_name="context")
def flaky_child(context: df.DurableOrchestrationContext):
    value = yield context.call_activity("flaky", context.get_input())
    return value


@myApp.activity_trigger(input_name="spec")
def flaky(spec: dict) -> str:
    """Fails until it has run `succeed_on` times (counted in a file), so its child fails."""
    counter = spec["counter"]
    count = int(open(counter).read()) + 1 if os.path.exists(counter) else 1  # noqa: SIM115
    with open(counter, "w") as fh:
        fh.write(str(count))
    if count < spec["succeed_on"]:
        raise RuntimeError(f"attempt {count} failed")
    return f"ok after {count}"
