"""A Service Bus starter like the app's own: one instance per message, its id from the
message's application properties, started once even when the message comes again."""

import json

import azure.durable_functions as df
import azure.functions as func

myApp = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@myApp.service_bus_queue_trigger(
    arg_name="msg", queue_name="runs", connection="ServiceBusConnection"
)
@myApp.durable_client_input(client_name="client")
async def queue_start(msg: func.ServiceBusMessage, client: df.DurableOrchestrationClient) -> None:
    instance_id = msg.application_properties["InstanceId"]
    existing = await client.get_status(instance_id)
    if existing and existing.runtime_status is not None:
        return
    await client.start_new("echo", instance_id, json.loads(msg.get_body()))


@myApp.orchestration_trigger(context_name="context")
def echo(context: df.DurableOrchestrationContext):
    value = yield context.call_activity("stamp", context.get_input())
    return value


@myApp.activity_trigger(input_name="payload")
def stamp(payload: dict) -> dict:
    return {**payload, "stamped": True}
