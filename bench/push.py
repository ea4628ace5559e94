"""Benchmark 8: Event Grid push against polling, on devhost's virtual clock.

N notebooks whose fake Azure ML jobs end at seeded random times over 1-120 minutes (10% fail),
run twice through the real app (ServiceBusStarter -> OrchestratorFunction -> activities):

- (a) polling only: Azure ML's own policy, 15 s x1.5 up to 120 s;
- (b) push: the backend declares `pushes_events`, NOTEBOOKOPS_RUN_EVENTS=1, a per-run safety
  poll 300 s after submit growing x4 per poll to 3600 s while events are trusted, and the fake
  service raises the run's end on the orchestration at a virtual time
  (devhost's `raise_event(..., at=)`): 10% of the ends are never announced, 10% announced twice,
  20% late (30 s to 3 min, so out of order with later ends), the rest within 0.2-2 s.

The fake backend is in-process and reads the host's virtual clock: a job is running until its
scheduled end, then reports its outcome. Detection latency is the virtual time from a job's
scheduled end to the status reply that first told the orchestrator (the activity's answer is
seen by the orchestrator at that same virtual instant). Status calls are counted per notebook-
hour of job time. Both runs must reach the same verdicts, and no generation's history may
exceed 3N+100 events.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

from bench.common import ROOT, Report, git_env, in_process_app_env, write_repo
from bench.scale import ObservedHost
from notebookops.compute.base import PollPolicy, RunError, RunHandle, RunSpec, RunStatus
from tests.fake_backend import FakeBackend

SEED = 14
DROP, DUPLICATE, LATE = 0.10, 0.10, 0.20
SAFETY_SECONDS = 300
SAFETY_MAX_SECONDS = 3600


class ClockedBackend(FakeBackend):
    """The fake Azure ML service on the host's virtual clock: a job ends at its scheduled time,
    and (with `pushes_events`) announces its end as Event Grid would, imperfectly."""

    poll_policy = PollPolicy(first_interval_seconds=15.0, factor=1.5, max_interval_seconds=120.0)
    pushes_events = False
    host: ClassVar[Any] = None
    seed: ClassVar[int] = SEED
    jobs: ClassVar[dict[str, dict[str, Any]]] = {}
    status_calls: ClassVar[int] = 0
    events: ClassVar[dict[str, int]] = {}

    @classmethod
    def setup(cls, host: Any, push: bool, seed: int) -> None:
        FakeBackend.reset()
        cls.host, cls.pushes_events, cls.seed = host, push, seed
        cls.jobs, cls.status_calls = {}, 0
        cls.events = {"dropped": 0, "duplicated": 0, "late": 0, "raised": 0}

    def submit(self, spec: RunSpec) -> RunHandle:
        handle = super().submit(spec)
        now = self.host.clock.now()
        with self.lock:
            if spec.run_key in self.jobs:  # a retried submit finds its job
                return handle
            scenario = self.runs[spec.run_key]["notebook"]["metadata"]["fake"]
            end = now + timedelta(seconds=float(scenario["endSeconds"]))
            deliveries = self._deliveries(spec.run_key, end) if self.pushes_events else []
            self.jobs[spec.run_key] = {
                "submitted": now,
                "end": end,
                "seen": None,
                "announced": bool(deliveries) or not self.pushes_events,
            }
        status = "Failed" if scenario["outcome"] == "failed" else "Completed"
        payload = json.dumps({"runId": spec.run_key, "status": status})
        from notebookops.run_events import EVENT_NAME

        for at in deliveries:
            self.host.raise_event(spec.instance_id, EVENT_NAME, payload, at=at)
        return handle

    def _deliveries(self, run_key: str, end: datetime) -> list[datetime]:
        # One generator per job: the faults do not depend on the order submits ran in.
        rng = random.Random(f"{self.seed}/{run_key}")
        if rng.random() < DROP:
            self.events["dropped"] += 1
            return []
        if rng.random() < LATE:
            self.events["late"] += 1
            first = end + timedelta(seconds=rng.uniform(30, 180))
        else:
            first = end + timedelta(seconds=rng.uniform(0.2, 2.0))
        times = [first]
        if rng.random() < DUPLICATE:
            self.events["duplicated"] += 1
            times.append(first + timedelta(seconds=rng.uniform(0.0, 60.0)))
        self.events["raised"] += len(times)
        return times

    def status(self, handle: RunHandle) -> RunStatus:
        now = self.host.clock.now()
        with self.lock:
            type(self).status_calls += 1
            job = self.jobs[handle.run_id]
            run = self.runs[handle.run_id]
            ended = now >= job["end"]
            if ended and job["seen"] is None:
                job["seen"] = now
            if ended and run["state"] in ("queued", "running"):
                run["state"] = run["outcome"]
            elif run["state"] == "queued":
                run["state"] = "running"
            state = run["state"]
        terminal = state in ("succeeded", "failed")
        error = None
        if state == "failed":
            error = RunError(
                cell_index=1, ename="ValueError", evalue="fake failure", traceback="Traceback: fake"
            )
        return RunStatus(
            state=state,
            raw_status=state,
            error=error,
            started_at=_iso(job["submitted"]),
            ended_at=_iso(job["end"]) if terminal else None,
        )


def _iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _notebook(end_seconds: float, outcome: str) -> dict[str, Any]:
    from nbformat import v4

    nb = v4.new_notebook(cells=[v4.new_code_cell("print('fake')")])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.metadata["fake"] = {"endSeconds": end_seconds, "outcome": outcome}
    return nb


def _one(repo: Path, paths: list[str], state: Path, push: bool, seed: int) -> dict[str, Any]:
    from notebookops import run_events
    from notebookops.starter import instance_id_for

    if push:
        os.environ[run_events.EVENTS_SETTING] = "1"
        os.environ[run_events.SAFETY_POLL_SETTING] = str(SAFETY_SECONDS)
        os.environ[run_events.SAFETY_POLL_MAX_SETTING] = str(SAFETY_MAX_SECONDS)
    else:
        os.environ.pop(run_events.EVENTS_SETTING, None)
    body = {
        "repository": {"url": repo.as_uri(), "ref": "main"},
        "notebooks": paths,
        "compute": {"backend": "fake"},
        "timeoutMinutes": 10080,
        "maxParallel": len(paths),
    }
    started = time.perf_counter()
    with ObservedHost(ROOT, state, clock="virtual") as host:
        ClockedBackend.setup(host, push, seed)
        host.deliver_service_bus("ServiceBusStarter", json.dumps(body).encode(), message_id="m1")
        instance = instance_id_for(None, "m1")
        status = host.wait_for(instance, timeout=600)
        wall = time.perf_counter() - started
    output = status.get("output") or {}
    jobs = ClockedBackend.jobs
    if len(jobs) != len(paths) or any(j["seen"] is None for j in jobs.values()):
        raise RuntimeError(f"benchmark run did not see every job end: {status}")
    latencies = sorted((j["seen"] - j["end"]).total_seconds() for j in jobs.values())
    unannounced = [
        (j["seen"] - j["end"]).total_seconds() for j in jobs.values() if not j["announced"]
    ]
    job_hours = sum((j["end"] - j["submitted"]).total_seconds() for j in jobs.values()) / 3600
    return {
        "result": output.get("result"),
        "verdicts": {n["path"]: n["state"] for n in output.get("notebooks", [])},
        "latencies": latencies,
        "medianLatency": statistics.median(latencies),
        "p95Latency": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
        "worstUnannounced": max(unannounced, default=None),
        "statusCalls": ClockedBackend.status_calls,
        "callsPerNotebookHour": ClockedBackend.status_calls / job_hours,
        "maxHistory": host.max_history,
        "events": dict(ClockedBackend.events),
        "wall": wall,
    }


def run(report: Report, notebooks: int = 50, max_minutes: float = 120.0) -> dict[str, Any]:
    from notebookops.compute import registry

    root = Path(tempfile.mkdtemp(prefix="nbops-bench-push-"))
    saved = dict(os.environ)
    saved_factory = registry._factories.get("fake")
    try:
        in_process_app_env(root)
        genv = git_env(root / "home")
        registry._factories["fake"] = ClockedBackend
        rng = random.Random(SEED + notebooks)
        ends = [rng.uniform(60.0, max_minutes * 60.0) for _ in range(notebooks)]
        outcomes = ["failed" if rng.random() < 0.1 else "succeeded" for _ in range(notebooks)]
        files = {
            f"nb/n{i:03d}.ipynb": _notebook(e, o)
            for i, (e, o) in enumerate(zip(ends, outcomes, strict=True))
        }
        repo = write_repo(root / "repo", files, genv)
        paths = list(files)
        polled = _one(repo, paths, root / "state-poll", push=False, seed=SEED)
        pushed = _one(repo, paths, root / "state-push", push=True, seed=SEED)
        bound = 3 * notebooks + 100
        print(
            f"  N={notebooks}, jobs end {min(ends) / 60:.1f}..{max(ends) / 60:.1f} min "
            f"(seed {SEED + notebooks}), events {pushed['events']}"
        )
        for label, r in (("polling", polled), ("push", pushed)):
            print(
                f"    {label:8} latency median {r['medianLatency']:.1f} s p95 "
                f"{r['p95Latency']:.1f} s, status calls {r['statusCalls']} "
                f"({r['callsPerNotebookHour']:.1f}/notebook-hour), largest generation "
                f"{r['maxHistory']} events, wall {r['wall']:.1f} s",
                flush=True,
            )
        report.add(
            "8 push",
            f"N={notebooks}: detection latency median (p95)",
            f"{pushed['medianLatency']:.1f} s ({pushed['p95Latency']:.1f} s)",
            f"{polled['medianLatency']:.1f} s ({polled['p95Latency']:.1f} s)",
            _ratio(polled["medianLatency"], pushed["medianLatency"]),
            "push median <= 5 s",
            pushed["medianLatency"] <= 5.0,
        )
        report.add(
            "8 push",
            f"N={notebooks}: status calls per notebook-hour",
            f"{pushed['callsPerNotebookHour']:.1f}",
            f"{polled['callsPerNotebookHour']:.1f}",
            _ratio(polled["callsPerNotebookHour"], pushed["callsPerNotebookHour"]),
            "poll/push >= 10x",
            polled["statusCalls"] >= 10 * pushed["statusCalls"],
        )
        worst = pushed["worstUnannounced"]
        report.add(
            "8 push",
            f"N={notebooks}: slowest sighting of a job whose event was lost (push)",
            "none lost" if worst is None else f"{worst:.1f} s",
            "",
            "",
            f"(safety poll {SAFETY_SECONDS} s growing to {SAFETY_MAX_SECONDS} s)",
            None,
        )
        same = polled["verdicts"] == pushed["verdicts"] and polled["result"] == pushed["result"]
        report.add(
            "8 push",
            f"N={notebooks}: final verdicts (result; failed notebooks)",
            f"{pushed['result']}; {_failed(pushed)}",
            f"{polled['result']}; {_failed(polled)}",
            "",
            "identical",
            same and len(pushed["verdicts"]) == notebooks,
        )
        report.add(
            "8 push",
            f"N={notebooks}: largest generation history (events)",
            str(pushed["maxHistory"]),
            str(polled["maxHistory"]),
            "",
            f"<= 3N+100 = {bound}",
            max(pushed["maxHistory"], polled["maxHistory"]) <= bound,
        )
        return {"ends": ends, "outcomes": outcomes, "polling": polled, "push": pushed}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        if saved_factory is None:
            registry._factories.pop("fake", None)
        else:
            registry._factories["fake"] = saved_factory
        shutil.rmtree(root, ignore_errors=True)


def _failed(result: dict[str, Any]) -> int:
    return sum(1 for state in result["verdicts"].values() if state != "succeeded")


def _ratio(base: float, ours: float) -> str:
    return f"poll/push {base / ours:.1f}x" if ours > 0 else ""
