"""An in-process compute backend for orchestration tests and benchmarks.

It stands in for a remote service (Azure ML cannot be reached from here) and follows the
backend contract: a run finishes after a number of status polls, with an outcome, both
read from the notebook's own metadata so a test states its scenario in the repository:

    {"metadata": {"fake": {"polls": 3, "outcome": "failed", "transient": 0, "queuedPolls": 0}}}

`queuedPolls` keeps the run `queued` for that many status polls before it starts (a busy
cluster scaling up; -1: it never starts), `polls` then counts the polls it runs for (-1:
it never finishes by itself). `transient` makes that many status calls raise ConnectionError
first (a flaky service), `throttle` that many submits fail as a 429 would (-1: all of them),
with `echo` quoted in the error as a request header.
Runs live in a class-level table, so a "restarted" backend object still finds them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, ClassVar

from notebookops.compute.base import (
    PermanentBackendError,
    PollPolicy,
    RunError,
    RunHandle,
    RunSpec,
    RunStatus,
)


class FakeBackend:
    name = "fake"
    poll_policy = PollPolicy(first_interval_seconds=10.0, factor=1.5, max_interval_seconds=60.0)
    runs: ClassVar[dict[str, dict[str, Any]]] = {}
    submits: ClassVar[list[str]] = []  # submits that created (or found) a run
    attempts: ClassVar[list[str]] = []  # every submit call, throttled ones included
    throttled: ClassVar[dict[str, int]] = {}
    lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def reset(cls) -> None:
        with cls.lock:
            cls.runs.clear()
            cls.submits.clear()
            cls.attempts.clear()
            cls.throttled.clear()

    def submit(self, spec: RunSpec) -> RunHandle:
        notebook = json.loads((Path(spec.checkout) / spec.notebook).read_text())
        scenario = notebook.get("metadata", {}).get("fake", {})
        if scenario.get("refuse"):
            raise PermanentBackendError(f"compute target {spec.compute.get('target')!r} not found")
        with self.lock:
            self.attempts.append(spec.run_key)
            throttled = self.throttled.get(spec.run_key, 0)
            if scenario.get("throttle") == -1 or throttled < int(scenario.get("throttle", 0)):
                self.throttled[spec.run_key] = throttled + 1
                # What azure-core raises for a 429: the status line, then the service's body;
                # `echo` makes the service quote a request header in it, as some gateways do.
                echo = f" (request header: {scenario['echo']})" if scenario.get("echo") else ""
                raise RuntimeError(
                    f"(TooManyRequests) Too many job submissions, retry after 60 s{echo}\n"
                    'Code: TooManyRequests\nMessage: {"error": {"code": "TooManyRequests"}}'
                )
            self.submits.append(spec.run_key)
            self.runs.setdefault(
                spec.run_key,
                {
                    "polls": 0,
                    "need": int(scenario.get("polls", 1)),
                    "outcome": scenario.get("outcome", "succeeded"),
                    "transient": int(scenario.get("transient", 0)),
                    "queued": int(scenario.get("queuedPolls", 0)),
                    "state": "queued",
                    "parameters": spec.parameters,
                    "notebook": notebook,
                },
            )
        return RunHandle(
            backend="fake",
            run_id=spec.run_key,
            portal_url=f"https://fake/{spec.run_key}",
            data={"notebook": spec.notebook},
        )

    def status(self, handle: RunHandle) -> RunStatus:
        with self.lock:
            run = self.runs[handle.run_id]
            if run["transient"] > 0:
                run["transient"] -= 1
                raise ConnectionError("fake service unavailable")
            if run["state"] == "queued" and run["queued"] != 0:
                run["queued"] -= 1
            elif run["state"] in ("queued", "running"):
                run["polls"] += 1
                run["state"] = "running"
                if run["polls"] >= run["need"] and run["need"] >= 0:
                    run["state"] = run["outcome"]
            state = run["state"]
        error = None
        if state == "failed":
            error = RunError(
                cell_index=1, ename="ValueError", evalue="fake failure", traceback="Traceback: fake"
            )
        # A run that finished by itself reports a 2-second run; one still going or canceled
        # has no end (the fake knows no clock), so the orchestrator's own measure stands.
        finished = state in ("succeeded", "failed")
        return RunStatus(
            state=state,
            raw_status=state,
            error=error,
            started_at="2024-01-01T00:00:00Z" if finished else None,
            ended_at="2024-01-01T00:00:02Z" if finished else None,
        )

    def cancel(self, handle: RunHandle) -> None:
        with self.lock:
            run = self.runs[handle.run_id]
            if run["state"] in ("queued", "running"):
                run["state"] = "canceled"

    def fetch_output(self, handle: RunHandle, dest: Path) -> Path | None:
        with self.lock:
            notebook = self.runs[handle.run_id]["notebook"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(notebook))
        return dest
