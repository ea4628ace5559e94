"""Call user functions the way the Python worker does: keyword arguments named after bindings,
values converted by azure-functions' own converters, async functions run to completion."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import json
import threading
import traceback
import uuid
from typing import Any

import azure.functions as func
from azure.functions import meta
from azure.functions.durable_functions import ActivityTriggerConverter
from azure.functions.eventgrid import EventGridEventInConverter
from azure.functions.servicebus import ServiceBusMessageInConverter

from .app import FunctionInfo


class FunctionError(Exception):
    """A user function raised; `reason` is what the worker reports ("Type: message")."""

    def __init__(self, function: str, exc: BaseException) -> None:
        self.function = function
        self.reason = f"{type(exc).__name__}: {exc}"
        self.stack = "".join(traceback.format_exception(exc))
        super().__init__(f"function '{function}' failed: {self.reason}")


class _Context:
    """The `context` parameter the worker passes to functions that ask for it."""

    def __init__(self, name: str, directory: str) -> None:
        self.invocation_id = str(uuid.uuid4())
        self.function_name = name
        self.function_directory = directory
        self.trace_context = None
        self.retry_context = None
        self.thread_local_storage = None


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """One long-lived loop for async functions, as the worker has: the durable client keeps
    an aiohttp session bound to the loop it was first used on."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="devhost-async", daemon=True).start()
            atexit.register(_close_client_session, _LOOP)
        return _LOOP


def _close_client_session(loop: asyncio.AbstractEventLoop) -> None:
    """Close the durable client's shared aiohttp session on its loop at exit (the worker's
    process just dies; ours would otherwise print 'Unclosed client session')."""
    from azure.durable_functions.models.utils import http_utils

    close = getattr(http_utils, "_close_session", None)
    if close is not None and loop.is_running():
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=5)


def call(info: FunctionInfo, kwargs: dict[str, Any], app_dir: str) -> Any:
    if "context" in info.params and "context" not in kwargs:
        kwargs["context"] = _Context(info.name, app_dir)
    try:
        result = info.func(**kwargs)
        if inspect.isawaitable(result):
            result = asyncio.run_coroutine_threadsafe(_await(result), _event_loop()).result()
    except Exception as exc:
        raise FunctionError(info.name, exc) from exc
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def run_activity(
    info: FunctionInfo,
    input_text: str | None,
    app_dir: str,
    bindings: dict[str, Any] | None = None,
) -> str | None:
    """Returns TaskCompleted.Result: the JSON text the host records for the activity's value.
    `bindings`: the function's input bindings besides its trigger (a durable client)."""
    argument = ActivityTriggerConverter.decode(
        meta.Datum(input_text if input_text is not None else "null", "string"),
        trigger_metadata=None,
    )
    value = call(info, {**(bindings or {}), info.trigger["name"]: argument}, app_dir)
    datum = ActivityTriggerConverter.encode(value, expected_type=None)
    # The host parses the worker's JSON and re-serialises it compactly (DurableActivityContext).
    text = datum.value
    if text is None:
        return None
    return json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)


def failure_details(error: FunctionError) -> str:
    """TaskFailed.Details: the host serialises the RpcException the worker's failure became."""
    return json.dumps(
        {
            "ClassName": "Microsoft.Azure.WebJobs.Script.Workers.Rpc.RpcException",
            "Message": f"Result: Failure\nException: {error.reason}\nStack: {error.stack}",
        }
    )


def service_bus_message(
    body: bytes,
    *,
    message_id: str,
    delivery_count: int,
    application_properties: dict[str, Any] | None,
) -> func.ServiceBusMessage:
    """Build the message through the worker's converter, from the trigger metadata the
    Service Bus extension 5.x sends (both property keys carry the same dictionary)."""
    props = json.dumps(application_properties or {})
    metadata = {
        "MessageId": meta.Datum(message_id, "string"),
        "DeliveryCount": meta.Datum(delivery_count, "int"),
        "ApplicationProperties": meta.Datum(props, "json"),
        "UserProperties": meta.Datum(props, "json"),
        "ContentType": meta.Datum("application/json", "string"),
    }
    return ServiceBusMessageInConverter.decode(meta.Datum(body, "bytes"), trigger_metadata=metadata)


def event_grid_event(event: dict[str, Any]) -> func.EventGridEvent:
    """Build the trigger value through the worker's converter from the event's JSON, as the
    host sends it (a CloudEvents 1.0 event becomes an azure.functions CloudEvent)."""
    return EventGridEventInConverter.decode(
        meta.Datum(json.dumps(event), "json"), trigger_metadata=None
    )
