"""host.json settings taken from app settings (%TASKHUB_NAME%, %ORCHESTRATION_VERSION%)."""

import azure.durable_functions as df
import azure.functions as func

myApp = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@myApp.route(route="orchestrators/{functionName}")
@myApp.durable_client_input(client_name="client")
async def http_start(req: func.HttpRequest, client):
    instance_id = await client.start_new(req.route_params["functionName"])
    return client.create_check_status_response(req, instance_id)


@myApp.orchestration_trigger(context_name="context")
def report_version(context: df.DurableOrchestrationContext):
    return context.version
