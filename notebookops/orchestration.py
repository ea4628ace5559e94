"""The notebook orchestrator: clone, fan out submits, monitor in rounds, fan in, report.

It is deterministic: no I/O, no clock but `context.current_utc_datetime`, no environment.
Every decision is a function in notebookops.policy; this module only sequences the
activities and durable timers. History stays bounded: one ActivityMonitor call per round
covers every pending run, and `continue_as_new` starts a fresh history every
few rounds (policy.generation_rounds), carrying the run state in its input.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Generator
from typing import Any

import azure.durable_functions as df

from notebookops import policy, run_events, sdk_timestamps
from notebookops.devops import delivery

# Every replay builds every history event again, each reading its timestamp (see the module).
sdk_timestamps.install()

# A run event that arrives while no wait for it is open is kept by the SDK (deferred_tasks) and
# given to the next wait, which is what the rounds expect; the SDK still warns "Potential
# duplicate Task completion" on every such event, which `notebookops run` printed to the user.
warnings.filterwarnings(
    "ignore",
    message=f"Potential duplicate Task completion for TaskId: {run_events.EVENT_NAME}$",
    category=UserWarning,
)

# Transient activity errors (network, throttling) are retried by the host; permanent ones
# come back as {"ok": false, "error": ...} values and are never retried.
ACTIVITY_RETRY = df.RetryOptions(
    first_retry_interval_in_milliseconds=5_000, max_number_of_attempts=3
)

Task = Any


def orchestrator(context: df.DurableOrchestrationContext) -> Generator[Task, Any, dict[str, Any]]:
    payload = context.get_input() or {}
    state = payload.get("state")
    if state is not None:
        state = policy.unpack(policy.carried(state))
    reported = False
    try:
        if state is None:
            state = policy.new_state(
                instance_id=context.instance_id,
                request=payload.get("request") or {},
                auth=payload.get("auth"),
                started_at=context.current_utc_datetime,
            )
            if payload.get("errors"):
                state["errors"] = list(payload["errors"])
            else:
                if not context.is_replaying:  # later episodes replay it: see _show_running
                    context.set_custom_status(policy.custom_status(state, "cloning"))
                yield from _clone(context, state)
            yield from _started(context, state)
        reporting = state.get("finishedAt") is not None  # a generation that only delivers
        if not reporting and not state["errors"] and not state["canceledByPipeline"]:
            rounds = payload.get("roundsPerGeneration")
            opens = bool(payload.get("opensEventWaits"))
            finished = yield from _run_rounds(context, state, rounds, opens)
            if not finished:
                return None  # continued as new; the next generation goes on
            yield from cancel_orphans(context, state, final=True)
        reported = True
        return (yield from _report(context, state))
    except Exception as exc:  # an orchestrator bug or an activity out of retries
        if state is None:
            state = policy.new_state(
                instance_id=context.instance_id,
                request={},
                auth=None,
                started_at=context.current_utc_datetime,
            )
        state["errors"].append(f"orchestration failed: {_first_line(exc)}")
        yield from cancel_created(context, state)
        yield from cancel_orphans(context, state, final=True)
        state["finishedAt"] = None  # the verdict is decided again, with this error
        for notebook in state["notebooks"]:
            if notebook["state"] not in policy.TERMINAL_STATES:
                policy.finish(
                    notebook,
                    "canceled",
                    context.current_utc_datetime,
                    message="the orchestration stopped before this notebook finished",
                )
        if reported:
            raise
        return (yield from _report(context, state))


def _clone(context: df.DurableOrchestrationContext, state: dict[str, Any]) -> Generator:
    request = state["request"]
    result = yield context.call_activity_with_retry(
        "ActivityClone",
        ACTIVITY_RETRY,
        {
            "instanceId": state["instanceId"],
            "repository": request["repository"],
            "patterns": [e if isinstance(e, str) else e["path"] for e in request["notebooks"]],
            "devops": request.get("devops"),
            "auth": state["auth"],
        },
    )
    if not result.get("ok"):
        state["errors"].append(result.get("error", "clone failed"))
        policy.add_unrun(state, "the repository could not be cloned")
        return
    policy.add_notebooks(state, result)


def _started(context: df.DurableOrchestrationContext, state: dict[str, Any]) -> Generator:
    """Open the pipeline's job log and say what this run will do (only with callback values)."""
    if not state["request"].get("devops"):
        return
    result = yield context.call_activity_with_retry(
        "ActivityReport",
        ACTIVITY_RETRY,
        {"phase": "started", "lines": policy.started_lines(state), **_callback(state)},
    )
    state["logId"] = result.get("logId")
    note_disabled(state, result)


def _callback(state: dict[str, Any]) -> dict[str, Any]:
    """What activities that talk to the pipeline need: its values, the sealed token, the log."""
    devops = state["request"].get("devops")
    if not devops:
        return {}
    return {
        "devops": devops,
        "auth": state["auth"],
        "logId": state.get("logId"),
        "disabled": state.get("disabledCalls") or {},
    }


def note_disabled(state: dict[str, Any], result: Any) -> None:
    """Remember side-call kinds an activity saw refused, so later activities skip them."""
    if isinstance(result, dict) and result.get("disabled"):
        state["disabledCalls"] = {**(state.get("disabledCalls") or {}), **result["disabled"]}


# Event waits kept open between rounds: events that arrive while a round runs each fill one,
# so a burst of run ends is read in full by the next round (the SDK buffers only the latest
# event that finds no open wait). Waits add nothing to the history.
EVENT_WAITS = 8


def _run_rounds(
    context: df.DurableOrchestrationContext,
    state: dict[str, Any],
    rounds: Any = None,
    opens_waits: bool = False,
) -> Generator:
    """Returns True when every notebook is finished, False after continue_as_new, which comes
    after policy.generation_rounds rounds (`rounds`: what this generation's input names).

    With run events (a pushing backend) the wait between rounds is a race between the safety
    timer and open event waits: the losing timer is cancelled, and a round polls only the runs
    events named and those whose own safety poll is due (policy.to_poll, policy.after_polls).
    Events that arrived but were not read when a generation ends are carried in the state
    (`pollFirst`), so the next generation polls their runs first. An event that comes in the
    same batch as the generation's last step is dropped with it (the SDK cannot preserve it):
    a backend whose polls cost nothing has every run polled when the next generation starts;
    elsewhere such an event, like Event Grid's own losses or an overflow of EVENT_WAITS + 1 in
    one round, leaves its run to its safety poll.

    The SDK registers a wait only once it is yielded, and of the events that come while none
    is registered it keeps only the last. So a generation whose input says `opensEventWaits`
    (every one started by this version) first races its waits against a timer due at once:
    the events of its first round then fill them, where all but the last were lost (ends
    announced during that round waited for their safety poll). One timer and one episode
    more per generation; generations started without it replay as they were started. The
    first generation learns that the backend pushes only from its submits; where polls cost
    nothing, the round after its first race reads every run."""
    policy.mark_ready(state, context.current_utc_datetime)
    waits: list[Task] = []
    named: set[str] = set(state.pop("pollFirst", None) or [])
    named |= _every_run_if_free(state)
    if opens_waits and policy.pushing(state):
        waits = [context.wait_for_external_event(run_events.EVENT_NAME) for _ in range(EVENT_WAITS)]
        opener = context.create_timer(context.current_utc_datetime)
        winner = yield context.task_any([opener, *waits])
        if winner is not opener:
            opener.cancel()
        arrived, waits = _read_events(context, state, waits)
        named |= arrived
    opened = bool(waits) or not opens_waits
    taken = 0
    while taken < policy.generation_rounds(rounds, state):
        taken += 1
        now = context.current_utc_datetime
        polled = policy.to_poll(state, named, now) if policy.pushing(state) else None
        yield from _monitor(
            context,
            state,
            policy.cancellations(state, now),
            wait=policy.long_poll_wait(state, now),
            only=polled,
        )
        if polled is not None:
            policy.after_polls(state, polled, named, context.current_utc_datetime)
        # A failure seen in this round stops the rest now (failFast), not a round later.
        late_stops = policy.cancellations(state, context.current_utc_datetime)
        if late_stops:
            yield from _monitor(context, state, late_stops, poll=False)
        if not state["canceledByPipeline"]:
            yield from _submit_ready(context, state)
        _show_running(context, state)
        if policy.all_done(state):
            return True
        state["round"] += 1
        named = set()
        if policy.long_polling(state):  # a long-polling monitor already waited
            continue
        timer = context.create_timer(policy.next_wake(state, context.current_utc_datetime))
        if not policy.pushing(state):
            yield timer
            continue
        waits += [
            context.wait_for_external_event(run_events.EVENT_NAME)
            for _ in range(EVENT_WAITS - len(waits))
        ]
        winner = yield context.task_any([timer, *waits])
        if winner is not timer:
            timer.cancel()
            named, waits = _read_events(context, state, waits)
            if not waits:
                # Every wait was filled, so later events of the burst found none and only the
                # last was kept (short notebooks send two each).
                named |= _every_run_if_free(state)
        if not opened:
            # The first generation learns that the backend pushes from its submits, so its
            # waits open only now: of the events its runs sent before, the SDK kept the last.
            opened = True
            named |= _every_run_if_free(state)
    if policy.pushing(state):
        # The last race's events, and those that came while its round ran.
        arrived, waits = _read_events(context, state, waits)
        state["pollFirst"] = sorted(named | arrived)
    context.continue_as_new(_next_generation(state))
    return False


def _every_run_if_free(state: dict[str, Any]) -> set[str]:
    """Every active run where status reads cost nothing (local), for a round to read when
    events may have been lost; elsewhere none (those runs keep their safety polls)."""
    if not policy.polls_all_each_generation(state):
        return set()
    return {n["path"] for n in policy.active(state)}


def _next_generation(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "state": policy.carry(state),
        "roundsPerGeneration": policy.ROUNDS_PER_GENERATION,
        "opensEventWaits": True,
    }


def _read_events(
    context: df.DurableOrchestrationContext, state: dict[str, Any], waits: list[Task]
) -> tuple[set[str], list[Task]]:
    """The running notebooks the arrived events name, and the waits still open."""
    done = [w for w in waits if w.is_completed]
    if done:
        _forget_consumed_event(context)
    return (
        policy.paths_of_runs(state, [w.result for w in done]),
        [w for w in waits if not w.is_completed],
    )


def _forget_consumed_event(context: df.DurableOrchestrationContext) -> None:
    """azure-functions-durable 1.7 keeps an external event that arrived while no wait was open
    (`deferred_tasks`) and applies it again to every later wait of that name, so one consumed
    event would end every later race at once and spin the generation's rounds. Once consumed,
    it is forgotten (deterministic: replay consumes the same events in the same order)."""
    deferred = getattr(context, "deferred_tasks", None)
    if isinstance(deferred, dict):
        deferred.pop(run_events.EVENT_NAME, None)


def _monitor(
    context: df.DurableOrchestrationContext,
    state: dict[str, Any],
    stops: list[dict[str, Any]],
    poll: bool = True,
    wait: float = 0.0,
    only: set[str] | None = None,
) -> Generator:
    stopping = {s["path"] for s in stops}
    wait = wait if poll and not stops else 0.0
    runs = [
        policy.watch(n)
        for n in policy.active(state)
        if poll and n["path"] not in stopping and (only is None or n["path"] in only)
    ]
    if not runs and not stops:
        return
    now = context.current_utc_datetime
    check = poll and policy.pipeline_check_due(state, now)
    monitor = yield context.call_activity_with_retry(
        "ActivityMonitor",
        ACTIVITY_RETRY,
        {
            "instanceId": state["instanceId"],
            "runs": runs,
            "cancel": stops,
            # Where the committed notebooks are, to number failing cells against them.
            "checkout": state.get("checkout"),
            "checkPipeline": check,
            "waitSeconds": wait,
            **_callback(state),
        },
    )
    policy.apply_monitor(state, monitor["runs"], context.current_utc_datetime)
    note_disabled(state, monitor)
    if check:
        state["lastPipelineCheck"] = policy.iso(now)
    if monitor.get("pipeline") == "gone":
        # Nobody waits any more (cancelled or timed out): stop every run, finish quietly.
        state["canceledByPipeline"] = True
        stops = policy.stop_all(state, context.current_utc_datetime)
        if stops:
            yield from _monitor(context, state, stops, poll=False)


def _submit_ready(context: df.DurableOrchestrationContext, state: dict[str, Any]) -> Generator:
    ready = policy.pending(state)[: policy.free_slots(state)]
    if not ready:
        return
    request = state["request"]
    tasks = []
    for notebook in ready:
        tasks.append(
            context.call_activity_with_retry(
                "ActivitySubmit",
                ACTIVITY_RETRY,
                {
                    "instanceId": state["instanceId"],
                    "path": notebook["path"],
                    "repository": request["repository"]["url"],
                    "commit": state["commit"],
                    "checkout": state.get("checkout"),
                    "parameters": policy.parameters_for(state, notebook),
                    "timeoutSeconds": policy.notebook_timeout_seconds(state, notebook),
                    "compute": policy.compute_for(state, notebook),
                    "strictParameters": bool(request.get("strictParameters")),
                    **_callback(state),
                },
            )
        )
    results = yield from _each_result(context, tasks)
    now = context.current_utc_datetime
    for notebook, result in zip(ready, results, strict=True):
        if isinstance(result, Exception):
            # Out of retries (a 429 storm, an outage): that notebook fails, the others go on.
            result = policy.submit_failure(result)
        note_disabled(state, result)
        if result.get("pollPolicy") and not state.get("pollPolicy"):
            state["pollPolicy"] = result["pollPolicy"]
        policy.mark_submitted(notebook, result, now)
    yield from cancel_orphans(context, state, final=False)
    _show_running(context, state)


def _show_running(context: df.DurableOrchestrationContext, state: dict[str, Any]) -> None:
    """The custom status after a round. The host keeps the last status an episode set, and code
    that replays ran in an earlier episode, which set the same status then: so a replaying round
    builds none (a status of every notebook, once per replayed round of every episode)."""
    if not context.is_replaying:
        context.set_custom_status(policy.custom_status(state, "running"))


def _each_result(context: df.DurableOrchestrationContext, tasks: list[Task]) -> Generator:
    """Like task_all, but one failed task does not fail the rest: returns each task's value,
    or the exception it failed with, in the tasks' order. (task_all fails at the first error
    and leaves the other results unread.)

    One task_any over all of them schedules them all at once (the SDK records a task's action
    when it is first yielded); then each task is awaited in turn. A task_any over the pending
    ones after every completion did the same with N compound tasks of up to N children, which
    every replay of the generation rebuilt: quadratic in the notebooks submitted. Neither adds
    an action after the first, so histories recorded either way replay alike."""
    if not tasks:
        return []
    yield context.task_any(tasks)
    for task in tasks:
        if not task.is_completed:
            with contextlib.suppress(Exception):  # kept as that task's result below
                yield task
    return [t.result for t in tasks]


def cancel_created(context: df.DurableOrchestrationContext, state: dict[str, Any]) -> Generator:
    """Cancel every run already created and not finished: for any path that stops the
    orchestration early on an error. Never raises; a cancel that fails too is added to the
    run's errors, so nobody is told the runs were stopped when they may still be going."""
    stops = policy.stop_created(
        state,
        context.current_utc_datetime,
        "the orchestration stopped before this notebook finished",
    )
    if not stops:
        return
    try:
        yield from _monitor(context, state, stops, poll=False)
    except Exception as exc:
        state["errors"].append(
            f"could not cancel {len(stops)} run(s) ({', '.join(s['path'] for s in stops)}): "
            f"{_first_line(exc)}"
        )


def cancel_orphans(
    context: df.DurableOrchestrationContext, state: dict[str, Any], final: bool
) -> Generator:
    """Cancel by run key the runs of submits that failed after an attempt whose answer was
    lost: right after the failure (best effort), and once more when the run stops. Never
    raises: a failure is kept in the notebook's message."""
    orphans = policy.orphans(state)
    if not orphans:
        return
    try:
        answer = yield context.call_activity_with_retry(
            "ActivityMonitor",
            ACTIVITY_RETRY,
            {"instanceId": state["instanceId"], "runs": [], "cancel": [], "orphans": orphans},
        )
        results = answer.get("orphans") or []
    except Exception as exc:
        results = [
            {"path": o["path"], "outcome": "error", "error": _first_line(exc)} for o in orphans
        ]
    policy.apply_orphans(state, results, final)


def _report(context: df.DurableOrchestrationContext, state: dict[str, Any]) -> Generator:
    """Publish the results (best effort, once), then deliver TaskCompleted on durable timers.

    The verdict and finishedAt are fixed when reporting starts, so every later generation
    (continue_as_new while an outage lasts) reports the same summary. Returns the summary,
    or None after continue_as_new."""
    # A generation that only delivers holds nothing else, so it may take several attempts;
    # the generation that ran the notebooks takes one, then continues as new if it failed.
    fresh = state.get("finishedAt") is not None
    if state.get("finishedAt") is None:
        state["finishedAt"] = policy.iso(context.current_utc_datetime)
        state["published"] = False
        state["delivery"] = None
    finished_at = policy.parse(state["finishedAt"])
    summary = policy.summary(state, finished_at)
    context.set_custom_status(policy.custom_status(state, "reporting"))
    if not state.get("published"):
        try:
            published = yield context.call_activity_with_retry(
                "ActivityReport",
                ACTIVITY_RETRY,
                {"phase": "publish", "summary": summary, **_callback(state)},
            )
            note_disabled(state, published)
        except Exception:  # noqa: S110 - side calls never decide the verdict
            pass
        state["published"] = True
    if state["request"].get("devops"):
        if state["canceledByPipeline"]:
            state["callback"] = {
                "delivered": False,
                "attempts": 0,
                "lastError": "not sent: the task record shows the pipeline stopped waiting",
            }
        else:
            limit = delivery.ATTEMPTS_PER_GENERATION if fresh else 1
            done = yield from _deliver(context, state, summary["result"], limit)
            if not done:
                return None  # continued as new; the next generation goes on delivering
    summary = policy.summary(state, finished_at)
    context.set_custom_status(policy.custom_status(state, "finished"))
    return summary


def _deliver(
    context: df.DurableOrchestrationContext, state: dict[str, Any], result: str, limit: int
) -> Generator:
    """TaskCompleted, one bounded activity attempt at a time, durable timers in between
    (notebookops.devops.delivery has the rule). True when done, False after continue_as_new."""
    record = state.get("delivery")
    if record is None:
        record = state["delivery"] = delivery.new_delivery(
            result,
            state["startedAt"],
            state["request"].get("timeoutMinutes", 60),
            policy.parse(state["finishedAt"]),
        )
    attempts = 0
    while not record["done"]:
        if attempts >= limit:
            context.continue_as_new(_next_generation(state))
            return False
        wake = delivery.next_attempt_at(record)
        if wake is not None and wake > context.current_utc_datetime:
            yield context.create_timer(wake)
        try:
            answer = yield context.call_activity(
                "ActivityReport",
                {
                    "phase": "deliver",
                    "result": result,
                    "attempt": record["attempts"] + 1,
                    **_callback(state),
                },
            )
        except Exception as exc:
            answer = {"outcome": "unavailable", "error": f"ActivityReport: {_first_line(exc)}"}
        delivery.apply(record, answer, context.current_utc_datetime)
        attempts += 1
        state["callback"] = delivery.view(record)
        context.set_custom_status(policy.custom_status(state, "reporting"))
    state["callback"] = delivery.view(record)
    return True


def _first_line(exc: BaseException) -> str:
    # Activity failures arrive as "Activity function 'X' failed: Type: msg \n {details}";
    # people get the first line only, never a nested stack trace.
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    return first if len(first) <= 300 else first[:299] + "…"
