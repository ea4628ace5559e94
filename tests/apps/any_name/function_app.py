"""An app written the way the Durable Functions v2 samples are: the FunctionRegister is a
module-level `myApp`, not `app`, and the durable functions live in a blueprint."""

import azure.durable_functions as df
import azure.functions as func
from any_name_blueprint import bp

myApp = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)
myApp.register_functions(bp)


@myApp.route(route="orchestrators/{functionName}")
@myApp.durable_client_input(client_name="client")
async def http_start(req: func.HttpRequest, client):
    payload = req.get_json() if req.get_body() else None
    instance_id = await client.start_new(req.route_params["functionName"], client_input=payload)
    return client.create_check_status_response(req, instance_id)


@myApp.route(route="explode")
def explode(req: func.HttpRequest) -> func.HttpResponse:
    raise ValueError(f"the widget {req.params.get('widget')} is on fire")
