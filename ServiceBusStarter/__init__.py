"""Service Bus queue -> validated request -> orchestration (or a skipped duplicate)."""

import azure.durable_functions as df
import azure.functions as func

from notebookops.starter import start_from_message

bp = df.Blueprint()


@bp.function_name("ServiceBusStarter")
@bp.service_bus_queue_trigger(
    arg_name="msg", queue_name="%NOTEBOOKOPS_QUEUE%", connection="ServiceBusConnection"
)
@bp.durable_client_input(client_name="client")
async def service_bus_starter(
    msg: func.ServiceBusMessage, client: df.DurableOrchestrationClient
) -> None:
    # Extension 5.x fills both; application_properties only exists in azure-functions >= 1.19.
    properties = getattr(msg, "application_properties", None) or msg.user_properties
    await start_from_message(
        client, msg.get_body(), properties=properties, message_id=msg.message_id
    )
