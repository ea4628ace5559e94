"""Orchestration versioning the way the samples' versioning app uses it: the HTTP starter
passes ?version= on, and the orchestrator branches on context.version. It also continues as
new once, so a test can see the version carried into the next generation."""

import azure.durable_functions as df
import azure.functions as func

myApp = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@myApp.route(route="orchestrators/{functionName}")
@myApp.durable_client_input(client_name="client")
async def http_start(req: func.HttpRequest, client):
    function_name = req.route_params.get("functionName")
    version = req.params.get("version")
    if version:
        instance_id = await client.start_new(function_name, version=version)
    else:
        instance_id = await client.start_new(function_name)
    return client.create_check_status_response(req, instance_id)


@myApp.orchestration_trigger(context_name="context")
def versioned(context: df.DurableOrchestrationContext):
    state = context.get_input() or {"generation": 0}
    if context.version == "1.0":
        greeting = yield context.call_activity("activity_a")
    else:
        greeting = yield context.call_activity("activity_b")
    if state["generation"] == 0:
        context.set_custom_status("Waiting for Continue event...")
        yield context.wait_for_external_event("Continue")
        context.continue_as_new({"generation": 1, "first": greeting})
        return None
    return {"version": context.version, "first": state["first"], "second": greeting}


@myApp.activity_trigger(input_name="input")
def activity_a(input: str) -> str:
    return "Hello from A!"


@myApp.activity_trigger(input_name="input")
def activity_b(input: str) -> str:
    return "Hello from B!"
