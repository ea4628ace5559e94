"""GET /api/runs/{instanceId}: a redacted view of one run for people."""

import json

import azure.durable_functions as df
import azure.functions as func

from notebookops.status import run_view

bp = df.Blueprint()


@bp.function_name("RunStatus")
@bp.route(route="runs/{instanceId}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
@bp.durable_client_input(client_name="client")
async def run_status(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    status = await client.get_status(req.route_params["instanceId"], show_input=False)
    view = run_view(status)
    if view is None:
        body = {"error": f"no run with id {req.route_params['instanceId']!r}"}
        return func.HttpResponse(json.dumps(body), status_code=404, mimetype="application/json")
    return func.HttpResponse(json.dumps(view), mimetype="application/json")
