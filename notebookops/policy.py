"""The orchestrator's decisions as pure functions over a JSON-able run state.

Nothing here reads a clock, the environment or a file: times are passed in (the
orchestrator's `current_utc_datetime`), so the same history always gives the same
decisions on replay, and each rule can be tested on its own.
"""

from __future__ import annotations

import base64
import json
import zlib
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

import orjson

from notebookops.compute.base import TERMINAL_STATES, parse_iso

PENDING = "pending"  # not submitted yet (waiting for a maxParallel slot)
ACTIVE_STATES = frozenset({"queued", "running"})
FAILURE_STATES = frozenset({"failed", "timedOut"})
RESULTS = ("succeeded", "succeededWithIssues", "failed", "canceled")

# Poll spacing when a backend reports none (first round, factor, cap), in seconds.
DEFAULT_POLL = {"firstIntervalSeconds": 5.0, "factor": 1.5, "maxIntervalSeconds": 60.0}

# A notebook's own limit is enforced by whatever runs it (the local runner, the Azure ML job),
# which can name the cell that was running and save the partial notebook. The orchestrator
# stops the run itself only this long after the limit, for a runner that could not.
RUNNER_GRACE_SECONDS = 60.0


def iso(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@lru_cache(maxsize=8192)
def parse(ts: str) -> datetime:
    """A time the state holds (iso()). Cached: every replay of a generation reads the same
    deadlines and stamps again, round after round (a pure function, so replay stays exact)."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def utc(now: datetime) -> datetime:
    """`now` with the standard library's UTC: the SDK's times carry dateutil zones (tzlocal on a
    UTC machine), and every comparison with one of those calls its Python utcoffset()."""
    return now if now.tzinfo is UTC else now.astimezone(UTC)


def new_state(
    *, instance_id: str, request: dict[str, Any], auth: str | None, started_at: datetime
) -> dict[str, Any]:
    deadline = started_at + timedelta(minutes=float(request.get("timeoutMinutes", 60)))
    return {
        "instanceId": instance_id,
        "request": request,
        "auth": auth,
        "startedAt": iso(started_at),
        "deadline": iso(deadline),
        "commit": None,
        "checkout": None,
        "pollPolicy": None,
        "round": 0,
        "canceledByPipeline": False,
        "logId": None,
        "lastPipelineCheck": None,
        "errors": [],
        "notebooks": [],
    }


def add_notebooks(state: dict[str, Any], clone: dict[str, Any]) -> None:
    """Record the clone's commit and one entry per resolved notebook, in path order."""
    entries = state["request"]["notebooks"]
    state["commit"] = clone["commit"]
    state["checkout"] = clone.get("checkout")
    for item in clone["notebooks"]:
        entry = entries[item["entryIndex"]]
        entry = {"path": entry} if isinstance(entry, str) else entry
        state["notebooks"].append(_new_notebook(item["path"], item["entryIndex"], entry))
        if item.get("problem"):  # missing or malformed: this notebook fails, the others run
            state["notebooks"][-1].update(
                state="failed",
                message=item["problem"],
                error={
                    "cellIndex": None,
                    "ename": item.get("problemType") or "InvalidNotebook",
                    "evalue": item["problem"],
                    "traceback": "",
                },
            )


def _new_notebook(path: str, entry_index: int, entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "path": path,
        "entryIndex": entry_index,
        "allowFailure": bool(entry.get("allowFailure", False)),
        "timeoutMinutes": entry.get("timeoutMinutes"),
        "state": PENDING,
        "runId": None,
        "portalUrl": None,
        "handle": None,
        "submittedAt": None,
        "startedAt": None,  # execution start, once the backend reports it running
        "deadline": None,  # startedAt + timeoutMinutes + RUNNER_GRACE_SECONDS
        "durationSeconds": None,
        "queuedSeconds": None,
        "error": None,
        "message": None,
        "outputNotebook": None,
        "outputHtml": None,
        "executionSeconds": None,
        "slowestCells": [],
    }


# A notebook's fields while they hold their initial value (_new_notebook): left out of the
# state a generation hands to the next (pack), put back when a generation starts (unpack).
_NOTEBOOK_DEFAULTS = {
    k: v for k, v in _new_notebook("", 0, {}).items() if k not in ("path", "entryIndex", "state")
}


def pack(state: dict[str, Any]) -> dict[str, Any]:
    """The state as continue_as_new carries it: the next generation's input, which every replay
    of that generation parses again. A notebook's fields that still hold their initial value
    stay out, and so does a finished notebook's handle (nothing reads it once the run ended)."""
    notebooks = []
    for notebook in state["notebooks"]:
        kept = {
            k: v
            for k, v in notebook.items()
            if k not in _NOTEBOOK_DEFAULTS or v != _NOTEBOOK_DEFAULTS[k]
        }
        if notebook["state"] in TERMINAL_STATES:
            kept.pop("handle", None)
        notebooks.append(kept)
    return {**state, "notebooks": notebooks}


# continue_as_new carries the packed state as text: its compact JSON, zlib-compressed (level 1:
# most of the size for a third of level 6's time), in base64. Each episode receives the
# generation's input twice (the context's input and the ExecutionStarted event), and text the
# host serializes and the SDK parses costs per character: at 500 notebooks 270 KB of JSON
# became 29 KB, and JSON text inside JSON escapes every quote.
CARRIED_LEVEL = 1


def carry(state: dict[str, Any]) -> str:
    """The state as the next generation's input carries it: pack(state), compressed (orjson
    writes and reads it several times faster than json; it is read by every episode)."""
    text = orjson.dumps(pack(state))
    return base64.b64encode(zlib.compress(text, CARRIED_LEVEL)).decode("ascii")


def carried(value: str | dict[str, Any]) -> dict[str, Any]:
    """The packed state an input carries: carry()'s text, or the JSON object an older version
    carried as it was."""
    if isinstance(value, str):
        return orjson.loads(zlib.decompress(base64.b64decode(value, validate=True)))
    return value


def unpack(state: dict[str, Any]) -> dict[str, Any]:
    """A generation's state as the rules read it: every notebook field present. A state that a
    version without pack() carried (every field already there) reads the same."""
    state["notebooks"] = [{**_NOTEBOOK_DEFAULTS, **n} for n in state["notebooks"]]
    return state


def add_unrun(state: dict[str, Any], why: str) -> None:
    """A run that failed before its notebooks were resolved (the clone) still reports what
    the message named: the commit it asked for, and each notebook path that is not a pattern,
    canceled with the reason."""
    request = state["request"]
    commit = (request.get("repository") or {}).get("commit")
    if state.get("commit") is None and isinstance(commit, str) and commit:
        state["commit"] = commit
    if state["notebooks"]:
        return
    for index, raw in enumerate(request.get("notebooks") or []):
        entry = {"path": raw} if isinstance(raw, str) else raw
        path = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(path, str) or any(c in path for c in "*?["):
            continue
        notebook = _new_notebook(path, index, entry)
        notebook.update(state="canceled", message=f"not run: {why}")
        state["notebooks"].append(notebook)


def parameters_for(state: dict[str, Any], notebook: dict[str, Any]) -> dict[str, Any]:
    """Global parameters overlaid by the notebook entry's own."""
    entry = state["request"]["notebooks"][notebook["entryIndex"]]
    own = entry.get("parameters", {}) if isinstance(entry, dict) else {}
    return {**state["request"].get("parameters", {}), **own}


def compute_for(state: dict[str, Any], notebook: dict[str, Any]) -> dict[str, Any]:
    """The message's compute, with the notebook entry's own kernel or python in place of the
    message's (an entry naming either replaces both)."""
    compute = dict(state["request"].get("compute") or {})
    entry = state["request"]["notebooks"][notebook["entryIndex"]]
    if isinstance(entry, dict) and (entry.get("kernel") or entry.get("python")):
        compute.pop("kernel", None)
        compute.pop("python", None)
        compute.update({k: entry[k] for k in ("kernel", "python") if entry.get(k)})
    return compute


def notebook_timeout_minutes(state: dict[str, Any], notebook: dict[str, Any]) -> float:
    return float(notebook.get("timeoutMinutes") or state["request"].get("timeoutMinutes", 60))


def notebook_timeout_seconds(state: dict[str, Any], notebook: dict[str, Any]) -> float:
    """The notebook's execution limit, handed to the backend (from when it starts running)."""
    return notebook_timeout_minutes(state, notebook) * 60.0


def mark_ready(state: dict[str, Any], now: datetime) -> None:
    """Queue time counts from here: the clone is done and the notebooks wait to run (for a
    maxParallel slot, then in the backend's queue)."""
    for notebook in state["notebooks"]:
        if not notebook.get("readyAt"):
            notebook["readyAt"] = iso(now)


def _minutes(value: float) -> str:
    return f"{value:g}"


def active(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in state["notebooks"] if n["state"] in ACTIVE_STATES]


def watch(notebook: dict[str, Any]) -> dict[str, Any]:
    """A run as ActivityMonitor's input names it. Every replay of a generation serializes each
    of its rounds' inputs again, so only what the monitor uses goes: the handle without its
    portal link (for people; no backend reads it back), and the state last seen: the monitor
    answers only for runs with news (apply_monitor reads a run it saw as it was as no change),
    and a long poll returns at once for a run that changed while the round was scheduled."""
    handle = notebook["handle"]
    if "portalUrl" in handle:  # a handle kept by a version before mark_submitted dropped it
        handle = {k: v for k, v in handle.items() if k != "portalUrl"}
    return {"path": notebook["path"], "handle": handle, "seen": notebook["state"]}


def pending(state: dict[str, Any]) -> list[dict[str, Any]]:
    return [n for n in state["notebooks"] if n["state"] == PENDING]


def all_done(state: dict[str, Any]) -> bool:
    return all(n["state"] in TERMINAL_STATES for n in state["notebooks"])


def free_slots(state: dict[str, Any]) -> int:
    return max(0, int(state["request"].get("maxParallel", 20)) - len(active(state)))


def one_line(text: str, limit: int = 500) -> str:
    """The first non-empty line of an error, cut to `limit` characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    if len(lines) > 1 or len(first) > limit:
        first = first[: limit - 1].rstrip() + "\u2026"
    return first


def submit_failure(error: BaseException | str) -> dict[str, Any]:
    """A submit activity that ran out of retries, as a submit result for that notebook only.

    The durable SDK words it "Activity function 'ActivitySubmit' failed: Type: message" plus a
    JSON blob on the next lines; people need the `Type: message` part."""
    text = one_line(str(error))
    for prefix in ("Activity function 'ActivitySubmit' failed:", "TransientError:"):
        if text.startswith(prefix):
            text = text[len(prefix) :].strip()
    return {
        "ok": False,
        "error": f"submit failed after its retries: {text or 'unknown error'}",
        # An attempt may have created the run before its answer was lost: cancel it by key.
        "mayExist": True,
    }


def mark_submitted(notebook: dict[str, Any], result: dict[str, Any], now: datetime) -> None:
    """Record a submit. The notebook's deadline is not set here: it counts from the moment the
    backend reports it running (see mark_running), so queue time cannot time it out."""
    if not result.get("ok"):
        finish(
            notebook,
            "failed",
            now,
            message=one_line(result.get("error") or "submit failed"),
            ename=result.get("ename") or "SubmitFailed",
        )
        if result.get("mayExist"):
            notebook["orphan"] = "pending"
        return
    if result.get("warnings"):
        notebook["warnings"] = list(result["warnings"])
    handle = result["handle"]
    notebook.update(
        state="queued",
        # The portal link is kept once, beside it: the handle travels in every monitor input.
        handle={k: v for k, v in handle.items() if k != "portalUrl"},
        runId=handle.get("runId"),
        portalUrl=handle.get("portalUrl"),
        submittedAt=iso(now),
        deadline=None,
    )


def mark_running(
    state: dict[str, Any], notebook: dict[str, Any], reported: str | None, now: datetime
) -> None:
    """The notebook executes: its own deadline starts now, or when the backend says it started.

    The backend's startedAt is on the backend's clock; it is trusted only between submission and
    this observation (a skewed or garbled time can neither shorten the deadline below what the
    orchestrator saw nor push it past the first round that saw the run going)."""
    if notebook.get("startedAt"):
        return
    started = now
    when = parse_iso(reported) if reported else None
    submitted = parse(notebook["submittedAt"]) if notebook.get("submittedAt") else None
    if when is not None:
        started = min(when, now)
        if submitted is not None:
            started = max(started, submitted)
    notebook["startedAt"] = iso(started)
    ready = notebook.get("readyAt") or notebook.get("submittedAt") or iso(started)
    notebook["queuedSeconds"] = _seconds_between(ready, started)
    limit = notebook_timeout_seconds(state, notebook) + RUNNER_GRACE_SECONDS
    notebook["deadline"] = iso(started + timedelta(seconds=limit))


def _seconds_between(since: str, until: datetime) -> float:
    return round(max(0.0, (until - parse(since)).total_seconds()), 3)


def finish(
    notebook: dict[str, Any],
    state: str,
    now: datetime,
    *,
    message: str | None = None,
    ename: str | None = None,
) -> None:
    notebook["state"] = state
    if message:
        notebook["message"] = message
        if notebook.get("error") is None and ename:
            notebook["error"] = {
                "cellIndex": None,
                "ename": ename,
                "evalue": message,
                "traceback": "",
            }
    # durationSeconds is execution time: measured from the start, when there was one; a
    # notebook that never ran has none, and all its time was queue time.
    if notebook.get("startedAt"):
        if notebook.get("durationSeconds") is None:
            notebook["durationSeconds"] = _seconds_between(notebook["startedAt"], now)
    elif notebook.get("queuedSeconds") is None and notebook.get("readyAt"):
        notebook["queuedSeconds"] = _seconds_between(notebook["readyAt"], now)


def cancellations(state: dict[str, Any], now: datetime) -> list[dict[str, Any]]:
    """Runs to stop now, each with the state it ends in: deadlines first, then failFast.

    - The run's deadline (wall clock) times out what is running and cancels what never
      started: a notebook still queued did not fail, it was not given its chance.
    - A notebook's own deadline exists only once it runs (mark_running), so queue time
      cannot time it out.
    Notebooks never submitted end at once (they have no run to cancel)."""
    now = utc(now)
    run_deadline = parse(state["deadline"])
    run_minutes = _minutes(float(state["request"].get("timeoutMinutes", 60)))
    stops: list[dict[str, Any]] = []
    fail_fast = bool(state["request"].get("failFast")) and any(
        n["state"] in FAILURE_STATES and not n["allowFailure"] for n in state["notebooks"]
    )
    for notebook in state["notebooks"]:
        if notebook["state"] in TERMINAL_STATES:
            continue
        started = notebook["state"] == "running" or bool(notebook.get("startedAt"))
        if now >= run_deadline and started:
            reason, why = "timedOut", f"the run's timeoutMinutes {run_minutes} reached"
        elif now >= run_deadline:
            reason, why = "canceled", "not started before the run's deadline"
            why += f" (timeoutMinutes {run_minutes})"
        elif notebook.get("deadline") and now >= parse(notebook["deadline"]):
            limit = _minutes(notebook_timeout_minutes(state, notebook))
            reason, why = "timedOut", f"timeoutMinutes {limit} reached"
        elif fail_fast:
            reason, why = "canceled", "canceled by failFast after another notebook failed"
        else:
            continue
        if notebook["state"] == PENDING:
            prefix = "" if why.startswith("not started") else "not started: "
            finish(notebook, "canceled", now, message=prefix + why)
            continue
        stops.append(
            {
                "path": notebook["path"],
                "handle": notebook["handle"],
                "state": reason,
                "message": why,
            }
        )
    return stops


def apply_monitor(state: dict[str, Any], results: list[dict[str, Any]], now: datetime) -> None:
    now = utc(now)
    by_path = {n["path"]: n for n in state["notebooks"]}
    for result in results:
        notebook = by_path.get(result["path"])
        if notebook is None or notebook["state"] in TERMINAL_STATES:
            continue
        new_state = result.get("state") or notebook["state"]
        ran = new_state == "running" or (
            new_state in TERMINAL_STATES and (result.get("startedAt") or new_state != "canceled")
        )
        if ran and notebook["state"] != PENDING:
            mark_running(state, notebook, result.get("startedAt"), now)
        if result.get("durationSeconds") is not None:
            notebook["durationSeconds"] = result["durationSeconds"]
        if result.get("error"):
            notebook["error"] = result["error"]
        if result.get("outputNotebook"):
            notebook["outputNotebook"] = result["outputNotebook"]
        message = result.get("message")
        if (
            new_state == "canceled"
            and not result.get("stopped")
            and _past_limit(state, notebook, now)
        ):
            # Canceled by the backend itself after the notebook's limit (an Azure ML job's own
            # timeout): that is the limit firing, not someone canceling.
            limit = _minutes(notebook_timeout_minutes(state, notebook))
            new_state, message = "timedOut", f"timeoutMinutes {limit} reached"
            notebook["error"] = None
        if new_state == "timedOut" and (result.get("stopped") or notebook.get("error") is None):
            # Stopped from outside the runner: say where it was, from the partial notebook.
            message, notebook["error"] = timeout_verdict(message or "", result.get("runningCell"))
        for key in ("outputHtml", "executionSeconds", "slowestCells"):
            if result.get(key) is not None:
                notebook[key] = result[key]
        if new_state in TERMINAL_STATES:
            finish(
                notebook,
                new_state,
                now,
                message=message,
                ename={"failed": "RunFailed", "timedOut": "TimeoutError"}.get(new_state),
            )
        else:
            notebook["state"] = new_state
            if message:
                notebook["message"] = message


def timeout_verdict(limit: str, cell: int | None) -> tuple[str, dict[str, Any]]:
    """`timeoutMinutes 3 reached in cell 5`, and the error that goes with it."""
    message = f"{limit} in cell {cell}" if cell is not None else limit
    return message, {"cellIndex": cell, "ename": "TimeoutError", "evalue": limit, "traceback": ""}


def _past_limit(state: dict[str, Any], notebook: dict[str, Any], now: datetime) -> bool:
    if not notebook.get("startedAt"):
        return False
    elapsed = (now - parse(notebook["startedAt"])).total_seconds()
    return elapsed >= notebook_timeout_seconds(state, notebook)


def pushing(state: dict[str, Any]) -> bool:
    """The backend's runs announce their end by events: wait for one or the safety interval."""
    return float((state.get("pollPolicy") or {}).get("pushIntervalSeconds") or 0) > 0


def polls_all_each_generation(state: dict[str, Any]) -> bool:
    """With events, a generation starts by polling every run (PollPolicy: status reads that
    cost nothing, local)."""
    policy = state.get("pollPolicy") or {}
    return pushing(state) and bool(policy.get("pollAllEachGeneration"))


# A generation ends (continue_as_new) after this many monitor rounds. Every episode replays its
# generation from the start, re-parsing each event and re-serializing each activity input, so
# shorter generations cost less CPU; with run events a generation takes more, because an
# event that comes with a generation's last batch is lost (see orchestration._run_rounds).
ROUNDS_PER_GENERATION = 2
EVENT_ROUNDS_PER_GENERATION = 10
# A generation whose input names no count was started by a version that always took 10; it
# replays as it was started.
LEGACY_ROUNDS_PER_GENERATION = 10


def generation_rounds(given: Any, state: dict[str, Any]) -> int:
    """The rounds this generation takes: `given` is what its input names (the starter and
    continue_as_new write ROUNDS_PER_GENERATION), at least EVENT_ROUNDS_PER_GENERATION once
    the backend pushes run events."""
    if not isinstance(given, int) or isinstance(given, bool) or given < 1:
        return LEGACY_ROUNDS_PER_GENERATION
    return max(given, EVENT_ROUNDS_PER_GENERATION) if pushing(state) else given


def paths_of_runs(state: dict[str, Any], events: list[Any]) -> set[str]:
    """The active notebooks whose runs the events name (unknown or finished runs: none).

    The Python durable client's raise_event encodes its data twice (json.dumps, then the HTTP
    body as JSON), so an event's payload arrives as JSON text; both forms are read."""
    run_ids = set()
    for event in events:
        if isinstance(event, str):
            try:
                event = json.loads(event)
            except ValueError:
                continue
        if isinstance(event, dict):
            run_ids.add(event.get("runId"))
    return {n["path"] for n in active(state) if n.get("runId") in run_ids}


def next_wake(state: dict[str, Any], now: datetime) -> datetime:
    """Back off between rounds, but never sleep past the nearest deadline. With run events the
    wait lasts until the earliest run's safety poll (see schedule_safety)."""
    now = utc(now)
    policy = state.get("pollPolicy") or DEFAULT_POLL
    if pushing(state):
        schedule_safety(state, now)
        due = [parse(n["safetyAt"]) for n in active(state)]
        first = timedelta(seconds=float(policy["pushIntervalSeconds"]))
        wake = max(now, min(due, default=now + first))
    else:
        interval = float(policy["firstIntervalSeconds"]) * float(policy["factor"]) ** state["round"]
        interval = min(interval, float(policy["maxIntervalSeconds"]))
        wake = now + timedelta(seconds=interval)
    deadlines = [parse(state["deadline"])] + [
        parse(n["deadline"]) for n in active(state) if n.get("deadline")
    ]
    nearest = min(deadlines)
    if nearest > now:
        wake = min(wake, nearest)
    return wake


# With run events, a run's safety interval grows this much after each safety poll that finds
# it still going, up to the policy's cap, while the instance's events can be trusted: at least
# TRUSTED_SHARE of the run ends it saw were announced (x4 from 300 s: polls at 5, 25, 85 min...).
SAFETY_GROWTH = 4.0
TRUSTED_SHARE = 0.8


def _safety_bounds(state: dict[str, Any]) -> tuple[float, float]:
    policy = state.get("pollPolicy") or {}
    first = float(policy.get("pushIntervalSeconds") or 0)
    return first, max(first, float(policy.get("pushMaxIntervalSeconds") or 0))


def schedule_safety(state: dict[str, Any], now: datetime) -> None:
    """Give each running notebook without one its first safety poll: one first interval after
    its submit. Idempotent."""
    first, _ = _safety_bounds(state)
    for notebook in active(state):
        if not notebook.get("safetyAt"):
            since = parse(notebook["submittedAt"]) if notebook.get("submittedAt") else now
            notebook["safetySeconds"] = first
            notebook["safetyAt"] = iso(since + timedelta(seconds=first))


# A round polls the runs whose safety poll is due within this share of their interval (at
# most SAFETY_SLACK_MAX seconds) too, so runs submitted moments apart share rounds instead of
# each waking the orchestrator; minutes early would only cost status calls.
SAFETY_SLACK = 0.25
SAFETY_SLACK_MAX = 30.0


def to_poll(state: dict[str, Any], named: set[str], now: datetime) -> set[str]:
    """With run events, a round polls the runs events named and those whose safety poll is
    due (or nearly: _slack), nothing else. Where status reads cost nothing (local), a round
    woken by events also polls every run last seen running: the SDK keeps only the last of
    the events that come while no wait is open (during a generation's first round), so an
    end announced beside another run's start was lost and waited for its safety poll."""
    now = utc(now)
    schedule_safety(state, now)
    also_running = bool(named) and polls_all_each_generation(state)
    return {
        n["path"]
        for n in active(state)
        if n["path"] in named
        or (also_running and n["state"] == "running")
        or parse(n["safetyAt"]) <= now + _slack(n)
    }


def _slack(notebook: dict[str, Any]) -> timedelta:
    seconds = SAFETY_SLACK * float(notebook.get("safetySeconds") or 0)
    return timedelta(seconds=min(seconds, SAFETY_SLACK_MAX))


def _missed_event(notebook: dict[str, Any], now: datetime, grace: float) -> bool:
    """A run found succeeded, without its event, well after its end: Azure ML announces every
    completed run (RunCompleted), so the event was lost. Failed and canceled runs may produce
    none, and an end younger than `grace` may still have its event on the way (late)."""
    if notebook["state"] != "succeeded" or not notebook.get("startedAt"):
        return False
    ended = parse(notebook["startedAt"]) + timedelta(
        seconds=float(notebook.get("durationSeconds") or 0)
    )
    return (now - ended).total_seconds() > grace


def events_trusted(state: dict[str, Any]) -> bool:
    """Events keep arriving: some run's end came by event, and at least TRUSTED_SHARE of the
    ends seen were announced (a run a safety poll found ended had its event missed)."""
    announced = int(state.get("announcedEnds") or 0)
    missed = int(state.get("missedEvents") or 0)
    return announced > 0 and announced >= TRUSTED_SHARE * (announced + missed)


def after_polls(state: dict[str, Any], polled: set[str], named: set[str], now: datetime) -> None:
    """Count what this round's polls say about the events, and plan each run's next safety poll.

    - A run an event named and the poll found ended was announced; one a safety poll found
      succeeded well after its end, unannounced, had its event missed (_missed_event).
    - A run still going is polled again one safety interval from now. After its own safety
      poll that interval grows (SAFETY_GROWTH, up to the cap) while events are trusted, and
      falls back to the first interval when they are not. So a run whose end is never
      announced is seen at most the cap after it ended, and at most the first interval once
      the instance's events have proven unreliable."""
    now = utc(now)
    first, cap = _safety_bounds(state)
    by_path = {n["path"]: n for n in state["notebooks"]}
    announced = [
        p for p in polled & named if p in by_path and by_path[p]["state"] in TERMINAL_STATES
    ]
    missed = [p for p in polled - named if p in by_path and _missed_event(by_path[p], now, first)]
    state["announcedEnds"] = int(state.get("announcedEnds") or 0) + len(announced)
    state["missedEvents"] = int(state.get("missedEvents") or 0) + len(missed)
    trusted = events_trusted(state)
    for path in polled:
        notebook = by_path.get(path)
        if notebook is None or notebook["state"] in TERMINAL_STATES:
            continue
        seconds = float(notebook.get("safetySeconds") or first)
        if not trusted:
            seconds = first
        elif path not in named:
            seconds = min(cap, seconds * SAFETY_GROWTH)
        notebook["safetySeconds"] = seconds
        notebook["safetyAt"] = iso(now + timedelta(seconds=seconds))


def long_polling(state: dict[str, Any]) -> bool:
    """The backend waits for changes itself (monitor long poll) instead of durable timers."""
    return float((state.get("pollPolicy") or {}).get("longPollSeconds") or 0) > 0


def long_poll_wait(state: dict[str, Any], now: datetime) -> float:
    """How long the next monitor round may wait for a change: the backend's long poll, but
    never past the nearest deadline (0 when there is nothing to wait for)."""
    now = utc(now)
    limit = float((state.get("pollPolicy") or {}).get("longPollSeconds") or 0)
    if limit <= 0 or not active(state):
        return 0.0
    deadlines = [parse(state["deadline"])] + [
        parse(n["deadline"]) for n in active(state) if n.get("deadline")
    ]
    until = (min(deadlines) - now).total_seconds()
    return round(max(0.0, min(limit, until)), 3)


def counts(state: dict[str, Any]) -> dict[str, int]:
    tally = {
        "total": len(state["notebooks"]),
        "succeeded": 0,
        "failed": 0,
        "timedOut": 0,
        "canceled": 0,
        "running": 0,
        "queued": 0,
        "pending": 0,
    }
    for notebook in state["notebooks"]:
        tally[notebook["state"]] = tally.get(notebook["state"], 0) + 1
    return tally


def result_of(state: dict[str, Any]) -> str:
    if state["errors"] or not state["notebooks"]:
        return "failed"
    if state.get("canceledByPipeline"):
        return "canceled"
    blocking = [
        n
        for n in state["notebooks"]
        if n["state"] in FAILURE_STATES | {"canceled"} and not n["allowFailure"]
    ]
    if blocking:
        return "failed"
    if any(n["state"] != "succeeded" for n in state["notebooks"]):
        return "succeededWithIssues"
    return "succeeded"


# Durable Functions limits the custom status to 16 KB of UTF-16 JSON text, on every storage
# backend; a larger one fails the orchestration. The budget leaves room for the host's own
# serialization of the same value.
CUSTOM_STATUS_MAX_BYTES = 16 * 1024
_STATUS_BUDGET = CUSTOM_STATUS_MAX_BYTES - 1024
# Who is listed first when not every notebook fits: what people look for while a run goes.
_LIST_FIRST = {"running": 0, "failed": 1, "timedOut": 1, "canceled": 2, "queued": 3, "pending": 4}
_ERRORS_LISTED, _ERROR_CHARS = 10, 300


def utf16_size(value: Any) -> int:
    """Bytes of `value`'s JSON text in UTF-16, as the custom status limit counts them."""
    return len(json.dumps(value, ensure_ascii=False).encode("utf-16-le"))


def custom_status(state: dict[str, Any], phase: str) -> dict[str, Any]:
    """What people see while the run goes: no token, no parameters, no handles.

    It fits the custom status limit however many notebooks run: when the notebooks do not all
    fit, those running, failed, canceled, queued and pending are listed first (in run order),
    and `unlisted` counts the rest; `counts` always covers every notebook, and the output lists
    every notebook once the run ends."""
    errors = state["errors"]
    status = {
        "phase": phase,
        "commit": state.get("commit"),
        "counts": counts(state),
        "notebooks": [_progress(n) for n in state["notebooks"]],
        "errors": errors,
        "callback": state.get("callback"),
    }
    if utf16_size(status) <= _STATUS_BUDGET:
        return status
    if len(errors) > _ERRORS_LISTED or any(len(str(e)) > _ERROR_CHARS for e in errors):
        kept = [str(e)[:_ERROR_CHARS] for e in errors[:_ERRORS_LISTED]]
        more = len(errors) - len(kept)
        status["errors"] = kept + ([f"... and {more} more (in the output)"] if more else [])
    entries = status["notebooks"]
    status["notebooks"], status["unlisted"] = [], len(entries)
    room = _STATUS_BUDGET - utf16_size(status)
    order = sorted(range(len(entries)), key=lambda i: (_LIST_FIRST.get(entries[i]["state"], 5), i))
    listed = []
    for i in order:
        cost = utf16_size(entries[i]) + 4  # and its separator
        if cost > room:
            break
        room -= cost
        listed.append(i)
    status["notebooks"] = [entries[i] for i in sorted(listed)]
    status["unlisted"] = len(entries) - len(listed)
    return status


# The status page shows a finished notebook's error line while the others still run; the
# custom status is capped (16 KB on Azure), so only the line, never the traceback.
PROGRESS_EVALUE_MAX = 200


def _progress(notebook: dict[str, Any]) -> dict[str, Any]:
    entry = {
        "path": notebook["path"],
        "state": notebook["state"],
        "allowFailure": notebook["allowFailure"],
        "portalUrl": notebook["portalUrl"],
    }
    if notebook.get("durationSeconds") is not None:
        entry["durationSeconds"] = notebook["durationSeconds"]
    if notebook.get("executionSeconds") is not None:
        entry["executionSeconds"] = notebook["executionSeconds"]
    error = notebook.get("error")
    if error:
        entry["error"] = {
            "cellIndex": error.get("cellIndex"),
            "ename": error.get("ename"),
            "evalue": str(error.get("evalue") or "")[:PROGRESS_EVALUE_MAX],
        }
    return entry


def summary(state: dict[str, Any], finished_at: datetime) -> dict[str, Any]:
    """The orchestration output and summary.json, in the design.md contract."""
    return {
        "instanceId": state["instanceId"],
        "result": result_of(state),
        "commit": state.get("commit"),
        "startedAt": state["startedAt"],
        "finishedAt": iso(finished_at),
        "counts": {
            k: v
            for k, v in counts(state).items()
            if k in ("total", "succeeded", "failed", "timedOut", "canceled")
        },
        "errors": state["errors"],
        "notebooks": [
            {
                "path": n["path"],
                "state": n["state"],
                "allowFailure": n["allowFailure"],
                "runId": n["runId"],
                "portalUrl": n["portalUrl"],
                "durationSeconds": n["durationSeconds"],  # execution only
                "queuedSeconds": n.get("queuedSeconds"),  # accepted -> execution start
                "error": n["error"],
                "message": n["message"],
                "outputNotebook": n["outputNotebook"],
                # .get: state carried across continue_as_new by an older version lacks them.
                "outputHtml": n.get("outputHtml"),
                "executionSeconds": n.get("executionSeconds"),
                "slowestCells": n.get("slowestCells") or [],
                "warnings": n.get("warnings") or [],
            }
            for n in state["notebooks"]
        ],
        # {delivered, attempts, lastError} once the run reports to a pipeline, else None.
        "callback": state.get("callback"),
    }


# The pipeline sends no cancel message; its timeline record is read at most this often.
PIPELINE_CHECK_SECONDS = 60.0


def pipeline_check_due(state: dict[str, Any], now: datetime) -> bool:
    if not state["request"].get("devops"):
        return False
    last = state.get("lastPipelineCheck")
    return last is None or (now - parse(last)).total_seconds() >= PIPELINE_CHECK_SECONDS


def stop_all(state: dict[str, Any], now: datetime) -> list[dict[str, Any]]:
    """Stops for every unfinished notebook because the pipeline no longer waits."""
    return stop_created(state, now, "the pipeline was canceled or timed out")


def stop_created(state: dict[str, Any], now: datetime, why: str) -> list[dict[str, Any]]:
    """Stops for every run already created and not finished (the orchestration itself is
    stopping); notebooks never submitted end at once."""
    stops = []
    for notebook in state["notebooks"]:
        if notebook["state"] == PENDING:
            finish(notebook, "canceled", now, message=f"not started: {why}")
        elif notebook["state"] in ACTIVE_STATES and notebook.get("handle"):
            stops.append(
                {
                    "path": notebook["path"],
                    "handle": notebook["handle"],
                    "state": "canceled",
                    "message": why,
                }
            )
    return stops


def started_lines(state: dict[str, Any]) -> list[str]:
    """The first lines the pipeline shows: what was accepted, or why nothing will run."""
    request = state["request"]
    backend = (request.get("compute") or {}).get("backend", "local")
    if state["errors"]:
        return [f"notebookops run {state['instanceId']}: cannot start"] + [
            f"error: {e}" for e in state["errors"]
        ]
    lines = [
        f"notebookops run {state['instanceId']} accepted: commit {state['commit']}, "
        f"{len(state['notebooks'])} notebook(s) on {backend}"
    ]
    lines += [f"  {n['path']}" for n in state["notebooks"]]
    return lines


# A run a submit may have created although the submit failed (see submit_failure): to cancel
# by its run key now, and again when the run stops if that did not get through.
_ORPHAN_RETRY = frozenset({"pending", "error"})


def orphans(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs to cancel by run key, with what the backend needs to find them."""
    return [
        {"path": n["path"], "compute": compute_for(state, n)}
        for n in state["notebooks"]
        if n.get("orphan") in _ORPHAN_RETRY
    ]


def apply_orphans(state: dict[str, Any], results: list[dict[str, Any]], final: bool) -> None:
    """Record what cancelling by run key found. `final`: the run is stopping, so a cancel that
    failed again is not tried any more, and the notebook's message says the run may go on."""
    by_path = {n["path"]: n for n in state["notebooks"]}
    for result in results:
        notebook = by_path.get(result.get("path"))
        if notebook is None or notebook.get("orphan") not in _ORPHAN_RETRY:
            continue
        outcome = result.get("outcome") or "error"
        run = result.get("runId") or "(named by its run key)"
        note = None
        if outcome == "canceled":
            note = f"its run {run}, created before an answer was lost, was canceled"
        elif outcome == "error" and final:
            outcome = "left"
            note = (
                f"its run {run} may have been created before an answer was "
                f"lost and could not be canceled ({one_line(result.get('error') or '', 200)}); "
                "cancel it in the service"
            )
        notebook["orphan"] = outcome
        if note:
            notebook["message"] = f"{notebook.get('message') or 'submit failed'}; {note}"
