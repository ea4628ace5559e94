"""Benchmark 2's baseline: monitoring written the way the Durable Functions monitoring sample
does it, for many notebooks: one status activity per run per round and no continue_as_new, so
the history grows with every round (the sample's own comment admits it "explodes the history
table"). Its activities use the same in-process fake backend as the real app in the benchmark.
"""

from __future__ import annotations

from datetime import timedelta

import azure.durable_functions as df
import azure.functions as func

from notebookops.compute.base import RunHandle, RunSpec
from tests.fake_backend import FakeBackend

app = df.DFApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@app.orchestration_trigger(context_name="context")
def SampleMonitor(context: df.DurableOrchestrationContext):
    runs = context.get_input()
    handles = yield context.task_all([context.call_activity("SampleSubmit", r) for r in runs])
    policy = FakeBackend.poll_policy
    pending, verdicts, polls = list(handles), {}, 0
    while pending:
        statuses = yield context.task_all(
            [context.call_activity("SampleStatus", h) for h in pending]
        )
        still = []
        for handle, status in zip(pending, statuses, strict=True):
            if status["state"] in ("succeeded", "failed", "canceled", "timedOut"):
                verdicts[handle["runId"]] = status["state"]
            else:
                still.append(handle)
        pending = still
        if pending:
            wait = timedelta(seconds=policy.interval(polls))
            polls += 1
            yield context.create_timer(context.current_utc_datetime + wait)
    return verdicts


@app.activity_trigger(input_name="run")
def SampleSubmit(run: dict) -> dict:
    spec = RunSpec(
        run_key=run["runKey"],
        instance_id=run["instanceId"],
        notebook=run["notebook"],
        checkout=run["checkout"],
        commit="bench",
    )
    return FakeBackend().submit(spec).to_dict()


@app.activity_trigger(input_name="handle")
def SampleStatus(handle: dict) -> dict:
    return FakeBackend().status(RunHandle.from_dict(handle)).to_dict()
