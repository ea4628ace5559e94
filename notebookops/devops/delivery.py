"""When to try TaskCompleted again, and when to stop: pure decisions over a JSON-able record.

The orchestrator calls ActivityReport's "deliver" phase for one bounded attempt, applies its
answer here, and waits on a durable timer until ``nextAt``. No clock is read: times are
passed in (the orchestrator's ``current_utc_datetime``), so replays decide the same.

The rule (README, "Reporting to the Azure DevOps pipeline"):

- back-off between attempts: 5 s, doubling, capped at 5 minutes (a longer ``Retry-After``
  from the server is honoured up to that cap);
- stop when TaskCompleted is accepted (delivered);
- stop when the task is known to have stopped waiting: a 4xx that is not 408/429, or the task's
  timeline record shows it finished (delivered if the record carries our own result, which
  means an earlier attempt landed and only its answer was lost);
- stop after 3 authentication failures (401/403, a 203 sign-in page, a redirect, HTML): a
  refused token does not heal, and a sign-in page is never retried forever;
- stop at the horizon: one hour after the later of the run's own deadline (start +
  ``timeoutMinutes``) and the moment the run finished. A pipeline set up as the README says
  (job ``timeoutInMinutes`` a little above the message's ``timeoutMinutes``) has failed the
  job on its own by then.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

FIRST_SECONDS = 5.0
FACTOR = 2.0
MAX_SECONDS = 300.0
HORIZON_AFTER = timedelta(hours=1)
AUTH_ATTEMPTS = 3
# continue_as_new after this many attempts in one generation keeps history bounded while
# an outage lasts (each attempt adds an activity, a timer and two episodes: about 8 events).
ATTEMPTS_PER_GENERATION = 10
WAITING_STATES = ("pending", "inprogress")


def _iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def new_delivery(
    result: str, started_at: str, timeout_minutes: float, finished_at: datetime
) -> dict[str, Any]:
    deadline = _parse(started_at) + timedelta(minutes=float(timeout_minutes))
    horizon = max(deadline, finished_at) + HORIZON_AFTER
    return {
        "result": result,
        "attempts": 0,
        "authFailures": 0,
        "delivered": False,
        "done": False,
        "lastError": None,
        "horizon": _iso(horizon),
        "nextAt": None,
    }


def next_attempt_at(delivery: dict[str, Any]) -> datetime | None:
    return _parse(delivery["nextAt"]) if delivery.get("nextAt") else None


def backoff_seconds(attempts: int, retry_after: float | None = None) -> float:
    delay = min(MAX_SECONDS, FIRST_SECONDS * FACTOR ** max(0, attempts - 1))
    if retry_after is not None:
        delay = min(MAX_SECONDS, max(delay, float(retry_after)))
    return delay


def apply(delivery: dict[str, Any], answer: dict[str, Any], now: datetime) -> None:
    """Record one attempt's answer and decide: done (delivered or not), or when to retry."""
    delivery["attempts"] += 1
    outcome = answer.get("outcome")
    error = _line(answer.get("error"))
    record = answer.get("record") or {}
    state = str(record.get("state") or "").lower()
    finished = bool(state) and state not in WAITING_STATES
    ours = finished and record.get("result") == delivery["result"]
    delivery["nextAt"] = None
    if outcome == "accepted":
        delivery.update(delivered=True, done=True, lastError=None)
        return
    if outcome == "rejected" or (outcome != "auth" and finished):
        if ours:
            note = f"; the task record shows {record.get('result')}: an earlier attempt landed"
            delivery.update(delivered=True, done=True, lastError=(error or "") + note)
        else:
            why = (
                f"; the task record shows it finished ({record.get('result') or state})"
                if finished
                else "; the task no longer waits"
            )
            delivery.update(done=True, lastError=(error or "TaskCompleted refused") + why)
        return
    delivery["lastError"] = error or f"TaskCompleted: {outcome}"
    if outcome == "auth":
        delivery["authFailures"] += 1
        if delivery["authFailures"] >= AUTH_ATTEMPTS:
            delivery["done"] = True
            delivery["lastError"] += f"; gave up after {AUTH_ATTEMPTS} authentication failures"
            return
    horizon = _parse(delivery["horizon"])
    if now >= horizon:
        delivery["done"] = True
        delivery["lastError"] += (
            f"; gave up after {delivery['attempts']} attempts at the horizon {delivery['horizon']}"
        )
        return
    wake = now + timedelta(seconds=backoff_seconds(delivery["attempts"], answer.get("retryAfter")))
    delivery["nextAt"] = _iso(min(wake, horizon))


def view(delivery: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``callback`` object of the output and summary.json."""
    if delivery is None:
        return None
    shown = {
        "delivered": bool(delivery["delivered"]),
        "attempts": int(delivery["attempts"]),
        "lastError": delivery.get("lastError"),
    }
    if not delivery["done"] and delivery.get("nextAt"):
        shown["nextAttemptAt"] = delivery["nextAt"]
    return shown


def _line(text: Any) -> str | None:
    if not text:
        return None
    line = " ".join(str(text).split())
    return line if len(line) <= 400 else line[:399] + "…"
