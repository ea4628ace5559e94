"""devhost's HTTP server: the durable HTTP API subset, HTTP-triggered functions under /api/,
and Core Tools' admin endpoint for firing non-HTTP triggers.

Status codes and bodies follow the durable extension's HttpApiHandler as described in
shared/reference/durable-protocol.md section 5.3.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import azure.functions as func

from .engine import Engine, HostError
from .eventgrid import DeliveryError, parse_events, validation_response
from .events import parse_iso
from .invoke import FunctionError

log = logging.getLogger("devhost.http")
DURABLE = "/runtime/webhooks/durabletask"
EVENT_GRID = "/runtime/webhooks/eventgrid"
RUNNING_CODES = {"Pending", "Running", "ContinuedAsNew", "Suspended"}
UNSUPPORTED_APIS = {"entities": "durable entities"}
UNSUPPORTED_ACTIONS = {
    "suspend": "suspending instances",
    "resume": "resuming instances",
    "rewind": "rewinding instances",
    "restart": "restarting instances",
}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # Python's default listen backlog is 5: a burst of pipelines delivering at once had its
    # connections refused before the accept loop saw them. The kernel caps this at somaxconn.
    request_queue_size = 1024


def serve(host: Engine, address: str, port: int) -> ThreadingHTTPServer:
    handler = type("DevhostHandler", (_Handler,), {"host": host})
    server = _Server((address, port), handler)
    # shutdown() waits for the loop to look up; 0.5 s (the default) made every stop that slow.
    threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},
        name="devhost-http",
        daemon=True,
    ).start()
    return server


def _bool(query: dict[str, list[str]], key: str, default: bool) -> bool:
    for k, values in query.items():
        if k.lower() == key.lower() and values:
            return values[-1].strip().lower() == "true"
    return default


def _query_value(query: dict[str, list[str]], key: str) -> str | None:
    for k, values in query.items():
        if k.lower() == key.lower() and values:
            return values[-1]
    return None


def _parse_time(text: str | None) -> float | None:
    if not text:
        return None
    return parse_iso(text).timestamp()


_KEY_IN_QUERY = re.compile(r"([?&]code=)[^&\s\"]*")


class _Handler(BaseHTTPRequestHandler):
    host: Engine
    protocol_version = "HTTP/1.1"
    server_version = "devhost"

    def log_message(self, fmt: str, *args: Any) -> None:
        # A function key in the query (`code=`, as Functions URLs carry) is never logged, as the
        # Functions host's own request log sanitizes it.
        log.debug("%s %s", self.address_string(), _KEY_IN_QUERY.sub(r"\1[redacted]", fmt % args))

    # -- plumbing ---------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> None:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        self.send_response(status)
        if data and raw is None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"Message": message, "ExceptionMessage": message, "error": message})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        body = self._body()
        try:
            if path.startswith(DURABLE + "/"):
                self._durable(method, path[len(DURABLE) + 1 :], query, body)
            elif path.rstrip("/") == EVENT_GRID:
                self._event_grid(method, query, body)
            elif path.startswith("/admin/functions/"):
                self._admin(method, path[len("/admin/functions/") :], body)
            elif path == "/api" or path.startswith("/api/"):
                self._http_function(method, path[len("/api/") :], parts.query, body)
            elif path in ("/", "/admin/host/status"):
                self._send(200, {"state": "Running", "functions": sorted(self.host.app.functions)})
            else:
                self._error(404, f"No route for {method} {path}")
        except HostError as exc:
            self._error(exc.status, str(exc))
        except DeliveryError as exc:
            self._error(400, str(exc))
        except Exception as exc:  # never drop the connection without an answer
            log.exception("devhost: %s %s failed", method, path)
            self._error(500, f"{type(exc).__name__}: {exc}")

    # -- durable HTTP API -------------------------------------------------------------------

    def _management(self, instance_id: str) -> dict[str, str]:
        payload = json.loads(self.host.client_binding())["managementUrls"]
        return {
            k: v.replace("INSTANCEID", instance_id)
            for k, v in payload.items()
            if k != "rewindPostUri"
        }

    def _durable(self, method: str, rest: str, query: dict, body: bytes) -> None:
        host = self.host
        segments = rest.split("/")
        if segments[0] == "orchestrators" and method == "POST" and len(segments) in (2, 3):
            name = segments[1]
            instance_id = segments[2] if len(segments) == 3 and segments[2] else None
            input_text = None
            if body.strip():
                try:
                    value = json.loads(body)
                except json.JSONDecodeError as exc:
                    self._error(400, f"The request body is not valid JSON: {exc}")
                    return
                # The Python client double-encodes: the body is a JSON string holding JSON text.
                input_text = value if isinstance(value, str) else json.dumps(value)
            # The client sends ?version= (start_new(..., version=...)); none means defaultVersion.
            instance_id = host.start_orchestration(
                name, input_text, instance_id, version=_query_value(query, "version")
            )
            links = self._management(instance_id)
            payload = {"id": instance_id, **{k: v for k, v in links.items() if k != "id"}}
            timeout = _query_value(query, "timeout")
            if timeout:
                try:
                    status = host.wait_for(instance_id, timeout=float(timeout))
                    self._send(200, status.get("output"))
                    return
                except TimeoutError:
                    pass
            self._send(202, payload, {"Location": links["statusQueryGetUri"], "Retry-After": "10"})
            return
        if segments[0] in UNSUPPORTED_APIS:
            # 404 would tell the SDK "entity not found"; 501 says what is missing.
            self._error(
                501,
                f"devhost does not support {UNSUPPORTED_APIS[segments[0]]} "
                f"({method} {DURABLE}/{rest}); see README: devhost",
            )
            return
        if segments[0] != "instances":
            self._error(404, f"Unknown durable API path '{rest}'")
            return
        if len(segments) == 1 or (len(segments) == 2 and segments[1] == ""):
            self._instances_collection(method, query)
            return
        instance_id = segments[1]
        if len(segments) == 2:
            if method == "GET":
                status = host.get_status(
                    instance_id,
                    show_history=_bool(query, "showHistory", False),
                    show_history_output=_bool(query, "showHistoryOutput", False),
                    show_input=_bool(query, "showInput", True),
                )
                if status is None:
                    self._send(404)
                elif status["runtimeStatus"] in RUNNING_CODES:
                    location = self._management(instance_id)["statusQueryGetUri"]
                    self._send(202, status, {"Location": location, "Retry-After": "5"})
                elif status["runtimeStatus"] == "Failed" and _bool(
                    query, "returnInternalServerErrorOnFailure", False
                ):
                    self._send(500, status)
                else:
                    self._send(200, status)
            elif method == "DELETE":
                deleted = host.purge(instance_id)
                self._send(200, {"instancesDeleted": deleted}) if deleted else self._send(404)
            else:
                self._error(405, f"{method} is not allowed on an instance")
            return
        action = segments[2]
        if method != "POST":
            self._error(405, f"{method} is not allowed on '{action}'")
        elif action == "raiseEvent" and len(segments) == 4:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != "application/json":
                self._error(400, "Only application/json request content is supported")
                return
            try:
                value = json.loads(body) if body.strip() else None
            except json.JSONDecodeError as exc:
                self._error(400, f"The request body is not valid JSON: {exc}")
                return
            host.raise_event(instance_id, segments[3], json.dumps(value))
            self._send(202)
        elif action == "terminate" and len(segments) == 3:
            host.terminate(instance_id, _query_value(query, "reason"))
            self._send(202)
        elif action in UNSUPPORTED_ACTIONS:
            self._error(
                501,
                f"devhost does not support {UNSUPPORTED_ACTIONS[action]} "
                f"(POST .../instances/{instance_id}/{action}); see README: devhost",
            )
        else:
            self._error(404, f"Unknown instance operation '{action}'")

    def _instances_collection(self, method: str, query: dict) -> None:
        try:
            created_from = _parse_time(_query_value(query, "createdTimeFrom"))
            created_to = _parse_time(_query_value(query, "createdTimeTo"))
        except ValueError as exc:
            raise HostError(400, f"createdTimeFrom/createdTimeTo: {exc}") from exc
        statuses_text = _query_value(query, "runtimeStatus")
        statuses = (
            [s.strip() for s in statuses_text.split(",") if s.strip()] if statuses_text else None
        )
        if method == "GET":
            found = self.host.query(
                created_from, created_to, statuses, _query_value(query, "instanceIdPrefix")
            )
            top = _query_value(query, "top")
            if top and top.isdigit():
                found = found[: int(top)]
            show_input = _bool(query, "showInput", False)
            self._send(200, [self.host.status_payload(i, show_input=show_input) for i in found])
        elif method == "DELETE":
            if created_from is None:
                self._error(400, "createdTimeFrom is required to purge instances")
                return
            deleted = self.host.purge_by(created_from, created_to, statuses)
            self._send(200, {"instancesDeleted": deleted}) if deleted else self._send(404)
        else:
            self._error(405, f"{method} is not allowed on instances")

    # -- admin: fire a non-HTTP trigger --------------------------------------------------------

    def _admin(self, method: str, name: str, body: bytes) -> None:
        if method != "POST":
            self._error(405, 'use POST /admin/functions/{name} with {"input": ...}')
            return
        info = self.host.app.get(name)
        if info is None:
            self._send(
                404,
                {
                    "error": f"No function named '{name}'",
                    "functions": sorted(self.host.app.functions),
                },
            )
            return
        try:
            payload = json.loads(body) if body.strip() else {}
        except json.JSONDecodeError as exc:
            self._error(400, f"The request body is not valid JSON: {exc}")
            return
        if not isinstance(payload, dict):
            self._error(400, 'The request body must be a JSON object like {"input": ...}')
            return
        if info.trigger_type == "eventGridTrigger":
            # Core Tools' convention: {"input": "<the event's JSON>"}; an object is taken too.
            event = payload.get("input")
            if isinstance(event, str):
                try:
                    event = json.loads(event)
                except json.JSONDecodeError as exc:
                    self._error(400, f"input: not the JSON of an event: {exc}")
                    return
            try:
                self.host.deliver_event_grid(info.name, event)
            except FunctionError as exc:
                self._send(500, {"error": str(exc)})
                return
            self._send(202)
            return
        if info.trigger_type != "serviceBusTrigger":
            raise HostError(
                400,
                f"Function '{info.name}' is a {info.trigger_type}; the admin endpoint fires "
                "serviceBusTrigger and eventGridTrigger functions (use the durable API or /api/ "
                "for the others)",
            )
        if "inputBase64" in payload:
            try:
                data = base64.b64decode(payload["inputBase64"], validate=True)
            except (binascii.Error, TypeError) as exc:
                self._error(400, f"inputBase64: not valid base64: {exc}")
                return
        else:
            value = payload.get("input", "")
            data = (value if isinstance(value, str) else json.dumps(value)).encode("utf-8")
        props = payload.get("applicationProperties")
        if props is not None and not isinstance(props, dict):
            self._error(400, "applicationProperties must be a JSON object")
            return
        delivery = payload.get("deliveryCount", 1)
        if not isinstance(delivery, int) or isinstance(delivery, bool) or delivery < 1:
            self._error(400, f"deliveryCount must be a positive integer, got {delivery!r}")
            return
        try:
            self.host.deliver_service_bus(
                info.name,
                data,
                application_properties=props,
                message_id=payload.get("messageId"),
                delivery_count=delivery,
            )
        except FunctionError as exc:
            self._send(500, {"error": str(exc)})
            return
        self._send(202)

    # -- Event Grid webhook ----------------------------------------------------------------------

    def _event_grid(self, method: str, query: dict, body: bytes) -> None:
        """The Event Grid extension's webhook: validation handshake, notifications, unsubscribe."""
        name = _query_value(query, "functionName") or ""
        info = self.host.app.get(name) if name else None
        if info is None or info.trigger_type != "eventGridTrigger":
            known = sorted(f.name for f in self.host.app.of_type("eventGridTrigger"))
            self._error(
                404, f"cannot find function: '{name}' (eventGridTrigger functions: {known})"
            )
            return
        if method == "OPTIONS":
            # CloudEvents webhook validation: allow the origin that asks.
            origin = self.headers.get("WebHook-Request-Origin")
            headers = {"WebHook-Allowed-Origin": origin} if origin else {}
            self._send(200, headers={**headers, "WebHook-Allowed-Rate": "*"})
            return
        if method != "POST":
            self._error(405, f"{method} is not allowed on {EVENT_GRID}; Event Grid POSTs")
            return
        kind = self.headers.get("aeg-event-type")
        if kind == "Unsubscribe":
            self._send(202)
            return
        if kind not in ("SubscriptionValidation", "Notification"):
            self._error(
                400,
                f"aeg-event-type header: expected SubscriptionValidation, Notification or "
                f"Unsubscribe, got {kind!r}",
            )
            return
        events = parse_events(body)
        if kind == "SubscriptionValidation":
            self._send(200, validation_response(events))
            return
        failures = []
        for index, event in enumerate(events):
            try:
                self.host.deliver_event_grid(info.name, event)
            except FunctionError as exc:
                # Every event is tried; one failure makes Event Grid retry the delivery.
                log.error("devhost: %s (event %s)", exc, event.get("id"))
                failures.append({"index": index, "id": event.get("id"), "error": str(exc)})
        if failures:
            self._send(
                500,
                {"error": f"{len(failures)} of {len(events)} events failed", "failures": failures},
            )
            return
        self._send(202)

    # -- HTTP-triggered functions --------------------------------------------------------------

    def _http_function(self, method: str, route: str, raw_query: str, body: bytes) -> None:
        route = route.strip("/")
        for info in self.host.app.of_type("httpTrigger"):
            params = _match_route(info.route, route)
            if params is None:
                continue
            if info.methods and method not in info.methods:
                continue
            request = func.HttpRequest(
                method=method,
                url=f"{self.host.base_url}{self.path}",
                headers=dict(self.headers.items()),
                params={k: v[-1] for k, v in parse_qs(raw_query, keep_blank_values=True).items()},
                route_params=params,
                body=body,
            )
            try:
                response = self.host.invoke_http(info, request)
            except FunctionError as exc:
                # devhost faces no network, so the reason goes to the caller as well as the log.
                log.error("devhost: %s", exc)
                self._send(500, {"error": str(exc), "function": info.name, "reason": exc.reason})
                return
            self._reply(response)
            return
        self._error(404, f"No HTTP function matches {method} /api/{route}")

    def _reply(self, response: Any) -> None:
        if response is None:
            self._send(204)
            return
        if not isinstance(response, func.HttpResponse):
            if isinstance(response, str | bytes):
                response = func.HttpResponse(response)
            else:
                response = func.HttpResponse(json.dumps(response), mimetype="application/json")
        headers = dict(response.headers)
        if response.mimetype and "Content-Type" not in headers and "content-type" not in headers:
            charset = f"; charset={response.charset}" if response.charset else ""
            headers["Content-Type"] = f"{response.mimetype}{charset}"
        self._send(response.status_code, headers=headers, raw=response.get_body())


_SEGMENT = re.compile(r"^\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(?::[^}?]*)?(\??)\}$")


def _match_route(template: str, path: str) -> dict[str, str] | None:
    """Match ASP.NET-style route templates: {name}, {name?}, {name:constraint}, {*rest}."""
    t_parts = [p for p in template.strip("/").split("/") if p]
    p_parts = [p for p in path.split("/") if p]
    params: dict[str, str] = {}
    for index, part in enumerate(t_parts):
        match = _SEGMENT.match(part)
        if match and match.group(1):
            params[match.group(2)] = "/".join(p_parts[index:])
            return params
        if index >= len(p_parts):
            if match and match.group(3):
                continue
            return None
        if match:
            params[match.group(2)] = p_parts[index]
        elif part.lower() != p_parts[index].lower():
            return None
    return params if len(p_parts) == len(t_parts) else None


def utc_now() -> str:
    return datetime.now(UTC).isoformat()
