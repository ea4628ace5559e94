"""From a queue message (or an HTTP request) to a started orchestration, exactly once.

The instance id is derived from the pipeline's (PlanId, JobId, TaskInstanceId), so a
redelivered message finds its instance and starts nothing; without callback values the
Service Bus message id plays that role.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from notebookops import policy, redact, sealing

if TYPE_CHECKING:
    from notebookops.request import Callback

log = logging.getLogger("notebookops")
ORCHESTRATOR = "OrchestratorFunction"


class InvalidMessage(ValueError):
    """A message we cannot run and cannot report on: raising lets Service Bus retry it and
    then dead-letter it, so nothing is lost."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("invalid message: " + "; ".join(errors))


@dataclass
class StartOutcome:
    instance_id: str
    started: bool
    errors: list[str]


def instance_id_for(callback: Callback | None, message_id: str | None) -> str:
    if callback is not None:
        key = f"{callback.plan_id}:{callback.job_id}:{callback.task_instance_id}".lower()
        return "nb-" + hashlib.sha256(key.encode()).hexdigest()[:32]
    if not message_id:
        raise InvalidMessage(["the message has no callback values and no message id to key it by"])
    return "msg-" + hashlib.sha256(message_id.encode()).hexdigest()[:32]


def orchestration_input(request: Any, callback: Callback | None, errors: list[str]) -> dict:
    """What the orchestrator gets: the request with its token masked, the token sealed."""
    payload: dict[str, Any] = {"request": request.to_dict(mask_secrets=True) if request else {}}
    if request is None and callback is not None:
        payload["request"]["devops"] = callback.to_dict(mask_secrets=True)
    payload["auth"] = sealing.seal(callback.auth_token) if callback else None
    if errors:
        payload["errors"] = [f"invalid request: {e}" for e in errors]
    payload["roundsPerGeneration"] = policy.ROUNDS_PER_GENERATION
    payload["opensEventWaits"] = True  # see orchestration._run_rounds
    return payload


async def start_from_message(
    client: Any,
    body: bytes | str | Mapping[str, Any],
    *,
    properties: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    message_id: str | None = None,
) -> StartOutcome:
    # Imported here: the message models (pydantic) cost start-up time every function pays,
    # while only a starter that receives a message needs them.
    from notebookops.request import inspect_message

    request, callback, errors = inspect_message(body, properties=properties, headers=headers)
    if callback is not None:
        redact.register_secret(callback.auth_token)
    if errors and callback is None:
        raise InvalidMessage(errors)
    instance_id = instance_id_for(callback, message_id)
    existing = await client.get_status(instance_id)
    if existing and existing.runtime_status is not None:
        log.info(
            "duplicate delivery for instance %s (already %s); nothing started",
            instance_id,
            existing.runtime_status.name,
        )
        return StartOutcome(instance_id, False, errors)
    await client.start_new(
        ORCHESTRATOR, instance_id, orchestration_input(request, callback, errors)
    )
    if errors:
        log.warning(
            "instance %s started to report an invalid request: %s", instance_id, "; ".join(errors)
        )
    else:
        log.info(
            "instance %s started: %d notebook entries on %s",
            instance_id,
            len(request.notebooks),
            request.compute.backend,
        )
    return StartOutcome(instance_id, True, errors)
