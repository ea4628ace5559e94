"""Durable features devhost does not host (call_http, entities), used the way the samples use
them, so the tests can check that each failure names what is missing."""

import azure.durable_functions as df
import azure.functions as func

myApp = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@myApp.orchestration_trigger(context_name="context")
def parent(context: df.DurableOrchestrationContext):
    response = yield context.call_http("GET", "http://127.0.0.1:9/nothing-listens-here")
    return response


@myApp.orchestration_trigger(context_name="context")
def child(context: df.DurableOrchestrationContext):
    return context.get_input()


@myApp.orchestration_trigger(context_name="context")
def uses_entity(context: df.DurableOrchestrationContext):
    value = yield context.call_entity(df.EntityId("Counter", "k1"), "get")
    return value


@myApp.route(route="entity/{key}")
@myApp.durable_client_input(client_name="client")
async def entity_state(req: func.HttpRequest, client) -> func.HttpResponse:
    try:
        state = await client.read_entity_state(df.EntityId("Counter", req.route_params["key"]))
    except Exception as exc:  # the SDK raises on a status it does not expect
        return func.HttpResponse(f"read_entity_state raised: {exc}", status_code=502)
    return func.HttpResponse(f"exists={state.entity_exists}", status_code=200)
