"""The devhost engine: schedules orchestrator episodes and activities over the SQLite store.

One scheduler thread runs orchestrator episodes (they are pure replay, cheap and
single-threaded in the real host's out-of-process shim too); activities run on a thread
pool sized like the host's `maxConcurrentActivityFunctions`. The engine opens no socket:
`devhost.host.Host` adds the HTTP server (devhost.http), which depends on the engine and
never the other way round.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import events as ev
from .app import AppIndex, AppIndexError, FunctionInfo, load_app
from .clock import Clock, make_clock
from .episode import EpisodeResult, instance_id_problem, run_episode
from .eventgrid import DeliveryError, check_event
from .invoke import (
    FunctionError,
    call,
    event_grid_event,
    failure_details,
    run_activity,
    service_bus_message,
)
from .store import Instance, Store

log = logging.getLogger("devhost")

TERMINAL = {"Completed", "Failed", "Terminated", "Canceled"}
RUNNING = {"Pending", "Running", "ContinuedAsNew", "Suspended"}


class HostError(Exception):
    """A client request the host refuses; `status` is the HTTP status the real host uses."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


def validate_instance_id(instance_id: str) -> None:
    problem = instance_id_problem(instance_id)
    if problem:
        raise HostError(400, problem)


def _ts(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


class Engine:
    def __init__(
        self,
        app_dir: str | Path,
        state_dir: str | Path,
        *,
        clock: str | Clock | None = "real",
        activity_workers: int | None = None,
        load_local_settings: bool = True,
    ) -> None:
        self.app_dir = Path(app_dir).resolve()
        self.state_dir = Path(state_dir)
        self.clock = make_clock(clock)
        self._activity_workers = activity_workers
        self._load_local_settings = load_local_settings
        self.app: AppIndex | None = None
        self.store: Store | None = None
        self._cond = threading.Condition()
        self._changed = threading.Condition()
        self._wakeup = False
        self._stopping = False
        self._inflight = 0
        self._last_work_id = 0
        self._history: dict[str, list[dict[str, Any]]] = {}
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.base_url = ""
        self.stats = {"episodes": 0, "activities": 0, "replay_seconds": 0.0}

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Engine:
        if self._load_local_settings:
            self._apply_local_settings()
        self.app = load_app(self.app_dir)
        self.store = Store(self.state_dir)
        if self.clock.virtual:
            latest = self.store.max_timestamp()
            if latest:
                self.clock.advance_to(_ts(latest))
        workers = self._activity_workers or int(
            self.app.durable_setting("maxConcurrentActivityFunctions", 10 * (os.cpu_count() or 1))
        )
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="activity")
        self._open_doors()
        self._thread = threading.Thread(target=self._loop, name="devhost-scheduler", daemon=True)
        self._thread.start()
        log.info(
            "devhost: %d functions from %s, state in %s, listening on %s",
            len(self.app.functions),
            self.app_dir,
            self.store.path,
            self.base_url,
        )
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread:
            self._thread.join(timeout=30)
        self._close_doors()
        if self._pool:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self.store:
            self.store.close()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _open_doors(self) -> None:
        """Where a subclass opens its listeners (and sets base_url); the bare engine has none."""

    def _close_doors(self) -> None:
        """Close what _open_doors opened, after the scheduler stopped."""

    def _apply_local_settings(self) -> None:
        # Core Tools loads local.settings.json Values into the environment; so do we,
        # without overriding what the caller already set.
        path = self.app_dir / "local.settings.json"
        if not path.is_file():
            return
        try:
            values = json.loads(path.read_text(encoding="utf-8")).get("Values", {})
        except (json.JSONDecodeError, AttributeError) as exc:
            raise AppIndexError(f"{path}: not valid JSON: {exc}") from exc
        for key, value in values.items():
            os.environ.setdefault(key, str(value))

    def _notify(self) -> None:
        with self._cond:
            self._wakeup = True
            self._cond.notify_all()

    def _changed_notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    # -- scheduler -------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
            try:
                progressed = self._tick()
            except Exception:  # a host bug must not stop every instance
                log.exception("devhost: scheduler error")
                progressed = False
            if progressed:
                continue
            with self._cond:
                if self._stopping:
                    return
                if self._wakeup:
                    self._wakeup = False
                    continue
                next_at = self.store.next_visible_at()
                if self.clock.virtual:
                    if self._inflight == 0 and next_at is not None:
                        self.clock.advance_to(_ts(next_at))
                        continue
                    self._cond.wait(timeout=1.0)
                else:
                    delay = 0.5 if next_at is None else next_at - self.clock.now().timestamp()
                    self._cond.wait(timeout=min(0.5, max(0.0, delay)))

    def _tick(self) -> bool:
        progressed = False
        for work in self.store.work_after(self._last_work_id):
            self._last_work_id = work.id
            with self._cond:
                self._inflight += 1
            self._pool.submit(self._run_work, work)
            progressed = True
        ready = self.store.ready_inbox(self.clock.now().timestamp())
        for instance_id, rows in ready.items():
            self._process(instance_id, rows)
            progressed = True
        return progressed

    def _process(self, instance_id: str, rows: list) -> None:
        inst = self.store.get_instance(instance_id)
        stale = [
            r.id
            for r in rows
            if inst is None
            or inst.runtime_status in TERMINAL
            or r.execution_id not in (None, inst.execution_id)
        ]
        if stale:
            with self.store.transaction() as db:
                db.executemany("DELETE FROM inbox WHERE id=?", [(i,) for i in stale])
        rows = [r for r in rows if r.id not in set(stale)]
        if not rows or inst is None:
            return
        rows.sort(key=lambda r: 0 if r.kind == "start" else 1)
        history = self._history.get(instance_id)
        if history is None:
            history = self.store.history(instance_id)
        now = self.clock.now()
        started = time.process_time()
        try:
            result = run_episode(app=self.app, instance=inst, history=history, inbox=rows, now=now)
        except Exception as exc:  # devhost's own bug: fail this instance, keep the others
            log.exception("devhost: episode of %s crashed", instance_id)
            result = EpisodeResult(status="Failed", failure=f"devhost internal error: {exc!r}")
        self.stats["replay_seconds"] += time.process_time() - started
        self.stats["episodes"] += 1
        self._commit(inst, history, rows, result, now)

    def _commit(
        self, inst: Instance, history: list, rows: list, res: EpisodeResult, now: datetime
    ) -> None:
        ts = now.timestamp()
        new_events = list(res.history)
        if res.status == "Completed":
            new_events.append(
                (ev.execution_completed(now, "Completed", json.dumps(res.output)), False)
            )
        elif res.status == "Failed":
            new_events.append((ev.execution_completed(now, "Failed", res.failure), False))
        elif res.status == "ContinuedAsNew":
            new_events.append((ev.continue_as_new(now, res.continue_input), False))
        with self.store.transaction() as db:
            row = db.execute(
                "SELECT runtime_status, execution_id FROM instances WHERE instance_id=?",
                (inst.instance_id,),
            ).fetchone()
            if row is None or row[0] in TERMINAL or row[1] != inst.execution_id:
                # Terminated or purged while the episode ran: its result is void.
                db.executemany("DELETE FROM inbox WHERE id=?", [(r.id,) for r in rows])
                self._history.pop(inst.instance_id, None)
                return
            seq = len(history)
            db.executemany(
                "INSERT INTO history (instance_id, seq, hidden, event) VALUES (?, ?, ?, ?)",
                [
                    (inst.instance_id, seq + i, int(hidden), json.dumps(e))
                    for i, (e, hidden) in enumerate(new_events)
                ],
            )
            db.executemany("DELETE FROM inbox WHERE id=?", [(r.id,) for r in rows])
            for timer_id in res.canceled_timers:
                db.execute(
                    "DELETE FROM inbox WHERE instance_id=? AND kind='timer' "
                    "AND json_extract(event, '$.TimerId')=?",
                    (inst.instance_id, timer_id),
                )
            db.executemany(
                "INSERT INTO inbox (instance_id, execution_id, visible_at, kind, event, meta) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (
                        inst.instance_id,
                        inst.execution_id,
                        m.visible_at.timestamp(),
                        m.kind,
                        json.dumps(m.event),
                        json.dumps(m.meta) if m.meta else None,
                    )
                    for m in res.messages
                ],
            )
            db.executemany(
                "INSERT INTO work (instance_id, execution_id, name, input, task_id, attempt, retry) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        inst.instance_id,
                        inst.execution_id,
                        w.name,
                        w.input,
                        w.task_id,
                        w.attempt,
                        json.dumps(w.retry) if w.retry else None,
                    )
                    for w in res.work
                ],
            )
            for child in res.children if res.status != "Failed" else ():
                self._start_child(db, inst, child, now)
            custom = json.dumps(res.custom_status) if res.custom_status_set else inst.custom_status
            status = res.status
            output = inst.output
            if status == "Completed":
                output = json.dumps(res.output)
            elif status == "Failed":
                output = json.dumps(res.failure)
            if status in TERMINAL:
                db.execute("DELETE FROM inbox WHERE instance_id=?", (inst.instance_id,))
                db.execute("DELETE FROM work WHERE instance_id=?", (inst.instance_id,))
                _tell_parent(
                    db, inst, status, output if status == "Completed" else res.failure, now
                )
            if status == "ContinuedAsNew":
                execution_id = uuid.uuid4().hex
                generation = inst.generation + 1
                db.execute("DELETE FROM history WHERE instance_id=?", (inst.instance_id,))
                db.execute(
                    "DELETE FROM inbox WHERE instance_id=? AND execution_id IS NOT NULL",
                    (inst.instance_id,),
                )
                db.execute("DELETE FROM work WHERE instance_id=?", (inst.instance_id,))
                start = ev.execution_started(
                    now,
                    name=inst.name,
                    instance_id=inst.instance_id,
                    execution_id=execution_id,
                    input_text=res.continue_input,
                    parent_instance_id=inst.parent_instance_id,
                    generation=generation,
                    # DTFx keeps the version across continue-as-new unless a new one is given,
                    # and the Python SDK's continue_as_new gives none.
                    version=inst.version,
                )
                db.execute(
                    "INSERT INTO inbox (instance_id, execution_id, visible_at, kind, event) "
                    "VALUES (?, ?, ?, 'start', ?)",
                    (inst.instance_id, execution_id, ts, json.dumps(start)),
                )
                db.execute(
                    "UPDATE instances SET runtime_status='Running', execution_id=?, input=?, "
                    "custom_status=?, last_updated_time=?, generation=?, next_id=0, "
                    "scheduled='[]' WHERE instance_id=?",
                    (execution_id, res.continue_input, custom, ts, generation, inst.instance_id),
                )
            else:
                db.execute(
                    "UPDATE instances SET runtime_status=?, output=?, custom_status=?, "
                    "last_updated_time=?, next_id=?, scheduled=? WHERE instance_id=?",
                    (
                        status,
                        output,
                        custom,
                        ts,
                        res.next_id,
                        json.dumps(res.scheduled),
                        inst.instance_id,
                    ),
                )
        if res.status == "ContinuedAsNew" or res.status in TERMINAL:
            self._history.pop(inst.instance_id, None)
        else:
            history.extend(e for e, _ in new_events)
            self._history[inst.instance_id] = history
        if res.failure:
            log.warning("devhost: instance %s failed: %s", inst.instance_id, res.failure)
        self._changed_notify()

    def _start_child(self, db: Any, parent: Instance, child: Any, now: datetime) -> None:
        """Create a sub-orchestration in the parent's commit; an id that is running already
        fails the parent's task instead (the running instance is left alone)."""
        row = db.execute(
            "SELECT runtime_status FROM instances WHERE instance_id=?", (child.instance_id,)
        ).fetchone()
        if row is not None and row[0] not in TERMINAL:
            failed = ev.sub_orchestration_failed(
                now,
                child.task_id,
                f"An Orchestration instance with the status {row[0]} already exists "
                f"(instance '{child.instance_id}').",
                None,
            )
            db.execute(
                "INSERT INTO inbox (instance_id, execution_id, visible_at, kind, event) "
                "VALUES (?, ?, ?, 'completion', ?)",
                (parent.instance_id, parent.execution_id, now.timestamp(), json.dumps(failed)),
            )
            return
        if row is not None:
            _purge(db, child.instance_id)
        self._history.pop(child.instance_id, None)
        start = ev.execution_started(
            now,
            name=child.name,
            instance_id=child.instance_id,
            execution_id=uuid.uuid4().hex,
            input_text=child.input,
            parent_instance_id=parent.instance_id,
            generation=0,
            version=child.version,
        )
        _insert_instance(
            db,
            start,
            now,
            child.version,
            parent=(parent.instance_id, parent.execution_id, child.task_id),
            retry=child.retry,
        )

    def _run_work(self, work: Any) -> None:
        try:
            info = self.app.get(work.name)
            kind, meta = "completion", None
            try:
                # An activity may bind a durable client too, as on the Functions host.
                bindings = (
                    {info.client_binding: self.client_binding()} if info.client_binding else None
                )
                result = run_activity(info, work.input, str(self.app_dir), bindings)
                event_builder = lambda now: ev.task_completed(now, work.task_id, result)  # noqa: E731
            except FunctionError as exc:
                reason = f"Activity function '{work.name}' failed: {exc.reason}"
                details = failure_details(exc)
                event_builder = lambda now: ev.task_failed(now, work.task_id, reason, details)  # noqa: E731
                if work.retry:
                    kind = "retry_failed"
                    meta = {
                        "name": work.name,
                        "input": work.input,
                        "attempt": work.attempt,
                        "maxAttempts": work.retry["maxAttempts"],
                        "intervalMs": work.retry["intervalMs"],
                    }
            now = self.clock.now()
            with self.store.transaction() as db:
                gone = db.execute("DELETE FROM work WHERE id=?", (work.id,)).rowcount == 0
                if not gone:
                    db.execute(
                        "INSERT INTO inbox (instance_id, execution_id, visible_at, kind, event, meta) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (
                            work.instance_id,
                            work.execution_id,
                            now.timestamp(),
                            kind,
                            json.dumps(event_builder(now)),
                            json.dumps(meta) if meta else None,
                        ),
                    )
            self.stats["activities"] += 1
        except Exception:
            log.exception("devhost: activity %s could not be recorded", work.name)
        finally:
            with self._cond:
                self._inflight -= 1
                self._wakeup = True
                self._cond.notify_all()

    # -- client operations -------------------------------------------------------------------

    def start_new(
        self,
        name: str,
        input: Any = None,
        instance_id: str | None = None,
        *,
        version: str | None = None,
    ) -> str:
        """Python API: like DurableOrchestrationClient.start_new (the value is JSON-encoded);
        without `version`, host.json's extensions.durableTask.defaultVersion applies."""
        return self.start_orchestration(
            name, None if input is None else json.dumps(input), instance_id, version=version
        )

    def start_orchestration(
        self,
        name: str,
        input_text: str | None,
        instance_id: str | None = None,
        *,
        version: str | None = None,
    ) -> str:
        info = self.app.get(name)
        if info is None or info.trigger_type != "orchestrationTrigger":
            raise HostError(
                400,
                f"The function '{name}' doesn't exist, is disabled, or is not an orchestrator "
                "function. Additional info: the following are the known orchestrator functions: "
                + ", ".join(sorted(f.name for f in self.app.of_type("orchestrationTrigger"))),
            )
        instance_id = instance_id if instance_id is not None else uuid.uuid4().hex
        validate_instance_id(instance_id)
        if version is None:
            version = self.app.default_version
        now = self.clock.now()
        execution_id = uuid.uuid4().hex
        start = ev.execution_started(
            now,
            name=info.name,
            instance_id=instance_id,
            execution_id=execution_id,
            input_text=input_text,
            parent_instance_id=None,
            generation=0,
            version=version,
        )
        with self.store.transaction() as db:
            row = db.execute(
                "SELECT runtime_status FROM instances WHERE instance_id=?", (instance_id,)
            ).fetchone()
            if row is not None:
                if row[0] not in TERMINAL:
                    raise HostError(
                        409,
                        f"An Orchestration instance with the status {row[0]} already exists "
                        f"(instance '{instance_id}').",
                    )
                _purge(db, instance_id)
            _insert_instance(db, start, now, version)
        self._history.pop(instance_id, None)
        self._notify()
        self._changed_notify()
        return instance_id

    def raise_event(
        self,
        instance_id: str,
        event_name: str,
        input_text: str | None,
        at: datetime | None = None,
    ) -> None:
        """Raise an event now, or (`at`) make it visible only from that time: a late delivery,
        which the virtual clock advances to as it does to a timer."""
        now = self.clock.now()
        if at is not None and at > now:
            now = at
        with self.store.transaction() as db:
            _require_live(db, instance_id, "it takes no events")
            db.execute(
                "INSERT INTO inbox (instance_id, execution_id, visible_at, kind, event) "
                "VALUES (?, NULL, ?, 'event', ?)",
                (
                    instance_id,
                    now.timestamp(),
                    json.dumps(ev.event_raised(now, event_name, input_text)),
                ),
            )
        self._notify()

    def terminate(self, instance_id: str, reason: str | None) -> None:
        now = self.clock.now()
        with self.store.transaction() as db:
            _require_live(db, instance_id, "it cannot be terminated")
            seq = db.execute(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM history WHERE instance_id=?", (instance_id,)
            ).fetchone()[0]
            db.execute(
                "INSERT INTO history (instance_id, seq, hidden, event) VALUES (?, ?, 0, ?)",
                (instance_id, seq, json.dumps(ev.execution_terminated(now, reason))),
            )
            db.execute(
                "UPDATE instances SET runtime_status='Terminated', output=?, last_updated_time=? "
                "WHERE instance_id=?",
                (json.dumps(reason), now.timestamp(), instance_id),
            )
            db.execute("DELETE FROM inbox WHERE instance_id=?", (instance_id,))
            db.execute("DELETE FROM work WHERE instance_id=?", (instance_id,))
            child = self.store.get_instance(instance_id)
            _tell_parent(db, child, "Terminated", reason, now)
        self._history.pop(instance_id, None)
        self._notify()
        self._changed_notify()

    def purge(self, instance_id: str) -> int:
        with self.store.transaction() as db:
            count = _purge(db, instance_id)
        self._history.pop(instance_id, None)
        return count

    def purge_by(
        self, created_from: float, created_to: float | None, statuses: list[str] | None
    ) -> int:
        ids = [i.instance_id for i in self.query(created_from, created_to, statuses, None)]
        return sum(self.purge(i) for i in ids)

    def query(
        self,
        created_from: float | None,
        created_to: float | None,
        statuses: list[str] | None,
        prefix: str | None,
    ) -> list[Instance]:
        found = []
        for inst in self.store.list_instances():
            if created_from is not None and inst.created_time < created_from:
                continue
            if created_to is not None and inst.created_time > created_to:
                continue
            if statuses and inst.runtime_status not in statuses:
                continue
            if prefix and not inst.instance_id.startswith(prefix):
                continue
            found.append(inst)
        return found

    def get_status(
        self,
        instance_id: str,
        *,
        show_history: bool = False,
        show_history_output: bool = False,
        show_input: bool = True,
    ) -> dict | None:
        inst = self.store.get_instance(instance_id)
        if inst is None:
            return None
        return self.status_payload(
            inst,
            show_history=show_history,
            show_history_output=show_history_output,
            show_input=show_input,
        )

    def status_payload(
        self,
        inst: Instance,
        *,
        show_history: bool = False,
        show_history_output: bool = False,
        show_input: bool = True,
    ) -> dict:
        def fmt(t: float) -> str:
            return _ts(t).strftime("%Y-%m-%dT%H:%M:%SZ")

        payload = {
            "name": inst.name,
            "instanceId": inst.instance_id,
            "runtimeStatus": inst.runtime_status,
            "input": inst.input if show_input else None,
            "customStatus": json.loads(inst.custom_status) if inst.custom_status else None,
            "output": json.loads(inst.output) if inst.output else None,
            "createdTime": fmt(inst.created_time),
            "lastUpdatedTime": fmt(inst.last_updated_time),
        }
        if show_history:
            payload["historyEvents"] = _history_view(
                self.store.history(inst.instance_id), show_history_output
            )
        return payload

    def history(self, instance_id: str) -> list[dict[str, Any]]:
        """The raw events of the instance's current execution, as sent to the SDK."""
        return self.store.history(instance_id)

    def wait_changed(self, timeout: float) -> None:
        """Block until some instance changes (a committed episode, a start, a termination) or
        `timeout` passes, whichever is first: a follower's poll without the poll's delay."""
        with self._changed:
            self._changed.wait(timeout=timeout)

    def wait_for(self, instance_id: str, timeout: float = 60.0) -> dict:
        """Block until the instance is terminal; return its status (with output)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.get_status(instance_id)
            if status and status["runtimeStatus"] in TERMINAL:
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"instance {instance_id} not finished after {timeout:.0f}s "
                    f"(status {status['runtimeStatus'] if status else 'unknown'})"
                )
            with self._changed:
                self._changed.wait(timeout=min(0.25, remaining))

    # -- triggers ------------------------------------------------------------------------------

    def client_binding(self) -> str:
        """The durableClient binding string the host gives the SDK, pointing at this server."""
        hub = self.app.hub_name
        base = f"{self.base_url}/runtime/webhooks/durabletask"
        query = f"taskHub={hub}&connection=Storage"
        inst = f"{base}/instances/INSTANCEID"
        return json.dumps(
            {
                "taskHubName": hub,
                "connectionName": None,
                "creationUrls": {
                    "createNewInstancePostUri": f"{base}/orchestrators/{{functionName}}[/{{instanceId}}]?",
                    "createAndWaitOnNewInstancePostUri": (
                        f"{base}/orchestrators/{{functionName}}[/{{instanceId}}]"
                        "?timeout={timeoutInSeconds}&pollingInterval={intervalInSeconds}"
                    ),
                },
                "managementUrls": {
                    "id": "INSTANCEID",
                    "statusQueryGetUri": f"{inst}?{query}",
                    "sendEventPostUri": f"{inst}/raiseEvent/{{eventName}}?{query}",
                    "terminatePostUri": f"{inst}/terminate?reason={{text}}&{query}",
                    "rewindPostUri": f"{inst}/rewind?reason={{text}}&{query}",
                    "purgeHistoryDeleteUri": f"{inst}?{query}",
                    "restartPostUri": f"{inst}/restart?{query}",
                    "suspendPostUri": f"{inst}/suspend?reason={{text}}&{query}",
                    "resumePostUri": f"{inst}/resume?reason={{text}}&{query}",
                },
                "baseUrl": base,
                "requiredQueryStringParameters": "",
                "rpcBaseUrl": base + "/",
                "httpBaseUrl": None,
            }
        )

    def _kwargs(self, info: FunctionInfo, trigger_value: Any) -> dict[str, Any]:
        kwargs = {info.trigger["name"]: trigger_value}
        if info.client_binding:
            kwargs[info.client_binding] = self.client_binding()
        return kwargs

    def deliver_service_bus(
        self,
        function_name: str,
        body: bytes | str,
        *,
        application_properties: dict[str, Any] | None = None,
        message_id: str | None = None,
        delivery_count: int = 1,
    ) -> Any:
        """Invoke a serviceBusTrigger function with one message, as the Service Bus extension
        would; a raised exception propagates (Service Bus would abandon and redeliver)."""
        info = self._trigger_function(function_name, "serviceBusTrigger")
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body)
        message = service_bus_message(
            data,
            message_id=message_id or uuid.uuid4().hex,
            delivery_count=delivery_count,
            application_properties=application_properties,
        )
        return call(info, self._kwargs(info, message), str(self.app_dir))

    def deliver_event_grid(self, function_name: str, event: dict[str, Any]) -> Any:
        """Invoke an eventGridTrigger function with one event (Event Grid or CloudEvents
        schema), as the Event Grid extension does for each event of a delivery; a raised
        exception propagates (Event Grid would retry the delivery)."""
        info = self._trigger_function(function_name, "eventGridTrigger")
        try:
            check_event(event)
        except DeliveryError as exc:
            raise HostError(400, str(exc)) from exc
        try:
            value = event_grid_event(event)
        except ValueError as exc:  # the worker's converter parses eventTime
            raise HostError(400, f"event.eventTime: {event.get('eventTime')!r}: {exc}") from exc
        return call(info, self._kwargs(info, value), str(self.app_dir))

    def _trigger_function(self, function_name: str, trigger_type: str) -> FunctionInfo:
        info = self.app.get(function_name)
        if info is None:
            raise HostError(404, f"No function named '{function_name}'.")
        if info.trigger_type != trigger_type:
            raise HostError(
                400, f"Function '{info.name}' is a {info.trigger_type}, not a {trigger_type}."
            )
        return info

    def invoke_http(self, info: FunctionInfo, request: Any) -> Any:
        return call(info, self._kwargs(info, request), str(self.app_dir))


def _insert_instance(
    db: Any,
    start: dict[str, Any],
    now: datetime,
    version: str | None,
    parent: tuple[str, str, int] | None = None,
    retry: dict[str, Any] | None = None,
) -> None:
    """A new Pending instance and its start message; `parent` is (instance, execution, task),
    `retry` the state its failure is reported back with when the parent retries it."""
    ids = start["OrchestrationInstance"]
    parent_id, parent_execution, parent_task = parent or (None, None, None)
    db.execute(
        "INSERT INTO instances (instance_id, name, execution_id, runtime_status, input, "
        "created_time, last_updated_time, version, parent_instance_id, parent_execution_id, "
        "parent_task_id, parent_retry) VALUES (?, ?, ?, 'Pending', ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            ids["InstanceId"],
            start["Name"],
            ids["ExecutionId"],
            start["Input"],
            now.timestamp(),
            now.timestamp(),
            version,
            parent_id,
            parent_execution,
            parent_task,
            json.dumps(retry) if retry else None,
        ),
    )
    db.execute(
        "INSERT INTO inbox (instance_id, execution_id, visible_at, kind, event) "
        "VALUES (?, ?, ?, 'start', ?)",
        (ids["InstanceId"], ids["ExecutionId"], now.timestamp(), json.dumps(start)),
    )


def _tell_parent(db: Any, child: Instance | None, status: str, result: Any, now: datetime) -> None:
    """A finished sub-orchestration completes its parent's task, as DTFx sends it: Completed
    with the output's JSON text, anything else (Failed, Terminated) as a failure, which goes
    through the retry timers when the parent called it with retry."""
    if child is None or child.parent_instance_id is None or child.parent_task_id is None:
        return
    kind, meta = "completion", None
    if status == "Completed":
        event = ev.sub_orchestration_completed(now, child.parent_task_id, result)
    else:
        reason = (
            result
            if status == "Failed"
            else f"Sub-orchestration '{child.instance_id}' was terminated: {result}"
        )
        event = ev.sub_orchestration_failed(now, child.parent_task_id, reason, None)
        if child.parent_retry:
            kind, meta = "retry_failed", json.loads(child.parent_retry)
    db.execute(
        "INSERT INTO inbox (instance_id, execution_id, visible_at, kind, event, meta) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (
            child.parent_instance_id,
            child.parent_execution_id,
            now.timestamp(),
            kind,
            json.dumps(event),
            json.dumps(meta) if meta else None,
        ),
    )


def _require_live(db: Any, instance_id: str, why: str) -> None:
    """404 for an unknown instance, 410 for a finished one, as the durable HTTP API answers."""
    row = db.execute(
        "SELECT runtime_status FROM instances WHERE instance_id=?", (instance_id,)
    ).fetchone()
    if row is None:
        raise HostError(404, f"No instance with ID '{instance_id}' found.")
    if row[0] in TERMINAL:
        raise HostError(410, f"The instance '{instance_id}' is already {row[0]}; {why}.")


def _purge(db: Any, instance_id: str) -> int:
    count = db.execute("DELETE FROM instances WHERE instance_id=?", (instance_id,)).rowcount
    for table in ("history", "inbox", "work"):
        db.execute(f"DELETE FROM {table} WHERE instance_id=?", (instance_id,))  # noqa: S608
    return count


_STATUS_NAMES = {code: name for name, code in ev.STATUS_CODES.items()}
# Scheduling events the status API folds into their completions (FunctionName, ScheduledTime),
# and the episode markers it leaves out, as the Durable extension's status API does.
_FOLDED = {
    ev.ORCHESTRATOR_STARTED,
    ev.ORCHESTRATOR_COMPLETED,
    ev.TASK_SCHEDULED,
    ev.SUB_ORCHESTRATION_CREATED,
}
_COMPLETIONS = {
    ev.TASK_COMPLETED,
    ev.TASK_FAILED,
    ev.SUB_ORCHESTRATION_COMPLETED,
    ev.SUB_ORCHESTRATION_FAILED,
}


def _json_value(text: Any) -> Any:
    """Results are stored as JSON text; the status API shows the value (text that is not JSON,
    such as a failure reason, stays a string)."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _history_view(history: list[dict[str, Any]], with_output: bool) -> list[dict[str, Any]]:
    """historyEvents as the durable status API documents them: event names, FunctionName and
    ScheduledTime on completions, Result as a value (with showHistoryOutput), and
    OrchestrationStatus by name on ExecutionCompleted."""
    scheduled = {
        e["EventId"]: e
        for e in history
        if e["EventType"] in (ev.TASK_SCHEDULED, ev.SUB_ORCHESTRATION_CREATED)
    }
    view = []
    for event in history:
        kind = event["EventType"]
        if kind in _FOLDED:
            continue
        item: dict[str, Any] = {"EventType": ev.EVENT_NAMES.get(kind, str(kind))}
        if kind == ev.EXECUTION_STARTED:
            item["FunctionName"] = event.get("Name")
            if event.get("Version"):
                item["Version"] = event["Version"]
        elif kind in _COMPLETIONS:
            origin = scheduled.get(event.get("TaskScheduledId"), {})
            item["FunctionName"] = origin.get("Name")
            item["ScheduledTime"] = origin.get("Timestamp")
            if "InstanceId" in origin:
                item["InstanceId"] = origin["InstanceId"]
            if kind in (ev.TASK_FAILED, ev.SUB_ORCHESTRATION_FAILED):
                item["Reason"] = event.get("Reason")
                item["Details"] = event.get("Details")
        elif kind == ev.EXECUTION_COMPLETED:
            item["OrchestrationStatus"] = _STATUS_NAMES.get(
                event.get("OrchestrationStatus"), event.get("OrchestrationStatus")
            )
        elif kind in (ev.TIMER_CREATED, ev.TIMER_FIRED):
            item["FireAt"] = event.get("FireAt")
            if kind == ev.TIMER_FIRED:
                item["TimerId"] = event.get("TimerId")
        elif kind == ev.EVENT_RAISED:
            item["Name"] = event.get("Name")
            if with_output:
                item["Input"] = _json_value(event.get("Input"))
        elif kind == ev.EXECUTION_TERMINATED:
            item["Input"] = event.get("Input")
        if with_output and kind in (
            ev.TASK_COMPLETED,
            ev.SUB_ORCHESTRATION_COMPLETED,
            ev.EXECUTION_COMPLETED,
            ev.CONTINUE_AS_NEW,
        ):
            item["Result"] = _json_value(event.get("Result"))
        item["Timestamp"] = event["Timestamp"]
        view.append(item)
    return view
