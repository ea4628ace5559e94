"""Event Grid deliveries as the Functions host's Event Grid extension receives them.

Event Grid posts to `/runtime/webhooks/eventgrid?functionName=NAME` with an `aeg-event-type`
header: `SubscriptionValidation` (answer the validationCode), `Notification` (invoke the
function once per event in the body's array) or `Unsubscribe`. Bodies use the Event Grid
schema (an array of events) or CloudEvents 1.0 (one event or an array). Event Grid itself
never delivers an event without its required fields, so devhost refuses one with a 400 that
names the event and the field: such a body is a test's mistake, not a real delivery.
"""

from __future__ import annotations

import json
from typing import Any


class DeliveryError(ValueError):
    """A delivery Event Grid would never send; the message names the event and the field.
    The engine and the HTTP layer answer it with 400."""


VALIDATION_EVENT = "Microsoft.EventGrid.SubscriptionValidationEvent"
EVENT_GRID_FIELDS = ("id", "eventType", "subject", "eventTime")
CLOUD_EVENT_FIELDS = ("id", "source", "type", "specversion")


def parse_events(body: bytes) -> list[dict[str, Any]]:
    """The events of one delivery, each checked for the fields its schema requires."""
    try:
        value = json.loads(body) if body.strip() else None
    except json.JSONDecodeError as exc:
        raise DeliveryError(f"The Event Grid request body is not valid JSON: {exc}") from exc
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise DeliveryError(
            f"The Event Grid request body must be a non-empty JSON array of events, got {value!r}",
        )
    for index, event in enumerate(value):
        check_event(event, f"events[{index}]")
    return value


def check_event(event: Any, where: str = "event") -> None:
    if not isinstance(event, dict):
        raise DeliveryError(f"{where}: an event must be a JSON object, got {event!r}")
    fields = CLOUD_EVENT_FIELDS if "specversion" in event else EVENT_GRID_FIELDS
    for name in fields:
        # subject is required but may be empty (the validation event's is "").
        if not isinstance(event.get(name), str) or not (event[name] or name == "subject"):
            raise DeliveryError(
                f"{where}.{name}: required by the "
                f"{'CloudEvents' if fields is CLOUD_EVENT_FIELDS else 'Event Grid'} schema, "
                f"got {event.get(name)!r}",
            )


def validation_response(events: list[dict[str, Any]]) -> dict[str, str]:
    """The answer to the subscription validation handshake: echo the first event's code."""
    event = events[0]
    if event.get("eventType") != VALIDATION_EVENT:
        raise DeliveryError(
            f"events[0].eventType: a SubscriptionValidation delivery carries a "
            f"{VALIDATION_EVENT}, got {event.get('eventType')!r}",
        )
    data = event.get("data")
    code = data.get("validationCode") if isinstance(data, dict) else None
    if not isinstance(code, str) or not code:
        raise DeliveryError(f"events[0].data.validationCode: expected a string, got {code!r}")
    return {"validationResponse": code}
