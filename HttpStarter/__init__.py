"""POST /api/runs: the same message over HTTP (the Invoke Azure Function task), callback
values in headers; answers 202 at once with a link to RunStatus and no secrets."""

import json
import uuid
from urllib.parse import urlsplit

import azure.durable_functions as df
import azure.functions as func

from notebookops.starter import InvalidMessage, start_from_message

bp = df.Blueprint()


@bp.function_name("HttpStarter")
@bp.route(route="runs", methods=["POST"], auth_level=func.AuthLevel.FUNCTION)
@bp.durable_client_input(client_name="client")
async def http_starter(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    try:
        outcome = await start_from_message(
            client, req.get_body(), headers=dict(req.headers), message_id=f"http-{uuid.uuid4().hex}"
        )
    except InvalidMessage as exc:
        body = {"error": "invalid request", "errors": exc.errors}
        return func.HttpResponse(json.dumps(body), status_code=400, mimetype="application/json")
    parts = urlsplit(req.url)
    status_url = f"{parts.scheme}://{parts.netloc}/api/runs/{outcome.instance_id}"
    body = {
        "id": outcome.instance_id,
        "statusUrl": status_url,
        "duplicate": not outcome.started,
        "errors": outcome.errors,
    }
    return func.HttpResponse(
        json.dumps(body),
        status_code=202,
        mimetype="application/json",
        headers={"Location": status_url, "Retry-After": "10"},
    )
