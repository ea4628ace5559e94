"""The runs for people and programs, under function-level auth like every HTTP function:

GET /api/runs                            the runs, newest first (?state=, ?page=, ?pageSize=)
GET /api/runs/{instanceId}               one run: HTML for a browser, JSON otherwise
GET /api/runs/{instanceId}/notebooks/... an executed notebook (.ipynb) or its rendering (.html)
"""

import json
from urllib.parse import quote

import azure.durable_functions as df
import azure.functions as func

from notebookops import pages, status
from notebookops.activities import output_root

bp = df.Blueprint()

# The visitor's own function key travels on to this app's links, never anywhere else.
_CARRIED = ("code",)


def _carried(req: func.HttpRequest) -> dict[str, str]:
    return {k: req.params[k] for k in _CARRIED if req.params.get(k)}


def _html(req: func.HttpRequest) -> bool:
    chosen = (req.params.get("format") or "").lower()
    if chosen in ("json", "html"):
        return chosen == "html"
    return pages.wants_html(req.headers.get("accept"))


def _json(body: object, status_code: int = 200) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body),
        status_code=status_code,
        mimetype="application/json",
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


def _page(text: str, status_code: int = 200) -> func.HttpResponse:
    return func.HttpResponse(
        text,
        status_code=status_code,
        mimetype="text/html",
        charset="utf-8",
        headers=dict(pages.PAGE_HEADERS),
    )


def _not_found(what: str) -> func.HttpResponse:
    return _json({"error": f"not found: {what}"}, 404)


@bp.function_name("RunList")
@bp.route(route="runs", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
@bp.durable_client_input(client_name="client")
async def run_list(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    try:
        states, page, size = status.list_query(req.params)
    except status.BadQuery as exc:
        return _json({"error": str(exc)}, 400)
    query = _carried(req)
    listing = status.list_view(await client.get_status_all(), states, page, size, query)
    if _html(req):
        return _page(pages.runs_page(listing, states, query))
    return _json(listing)


@bp.function_name("RunStatus")
@bp.route(route="runs/{instanceId}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION)
@bp.durable_client_input(client_name="client")
async def run_status(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    instance_id = req.route_params["instanceId"]
    if not status.valid_instance_id(instance_id):
        return _not_found("run")
    query = _carried(req)
    found = await client.get_status(instance_id, show_input=False)
    view = status.run_view(found, output_root(instance_id), query)
    if view is None:
        return _not_found(f"run {instance_id!r}")
    if _html(req):
        return _page(pages.run_page(view, query))
    return _json(view)


@bp.function_name("RunNotebook")
@bp.route(
    route="runs/{instanceId}/notebooks/{*path}", methods=["GET"], auth_level=func.AuthLevel.FUNCTION
)
@bp.durable_client_input(client_name="client")
async def run_notebook(
    req: func.HttpRequest, client: df.DurableOrchestrationClient
) -> func.HttpResponse:
    instance_id = req.route_params.get("instanceId") or ""
    if not status.valid_instance_id(instance_id):
        return _not_found("notebook")
    found = await client.get_status(instance_id, show_input=False)
    if found is None or getattr(found, "runtime_status", None) is None:
        return _not_found("notebook")
    path = status.resolve_output(output_root(instance_id), req.route_params.get("path") or "")
    if path is None:
        return _not_found("notebook")
    if path.suffix == ".html":
        return func.HttpResponse(
            path.read_bytes(),
            mimetype="text/html",
            charset="utf-8",
            headers=dict(pages.NOTEBOOK_HEADERS),
        )
    return func.HttpResponse(
        path.read_bytes(),
        mimetype="application/x-ipynb+json",
        headers={
            **pages.NOTEBOOK_HEADERS,
            "Content-Disposition": f"attachment; filename*=UTF-8''{quote(path.name)}",
        },
    )
