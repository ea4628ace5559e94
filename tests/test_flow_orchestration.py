"""The real function app on devhost with a virtual clock and the in-process fake backend
(tests/fake_backend.py stands in for Azure ML, which cannot be reached from here): every
orchestration rule without waiting for real kernels or real time."""

from __future__ import annotations

import json

import pytest

from devhost import Host
from devhost.events import CONTINUE_AS_NEW, EXECUTION_STARTED, TASK_COMPLETED, TASK_SCHEDULED
from notebookops.compute.base import TERMINAL_STATES
from tests.fake_devops import FakeDevOps
from tests.flow_support import (
    APP_ROOT,
    FakeBackend,
    app_host,
    deliver,
    fake_notebook,
    make_repo,
    message,
    notebook,
)


@pytest.fixture
def devops():
    """A fake Azure DevOps on loopback (the real one cannot be reached from here)."""
    with FakeDevOps(token="s3cr3t-pipeline-token-value") as fake:
        yield fake


def run(flow_env, body, *, properties=None, message_id="m1", timeout=60):
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body, properties=properties, message_id=message_id)
        status = host.wait_for(instance, timeout)
        return host, instance, status


@pytest.fixture
def repo(flow_env):
    return make_repo(
        flow_env / "repo",
        {
            "nb/a.ipynb": fake_notebook(polls=2),
            "nb/b.ipynb": fake_notebook(polls=4, outcome="failed"),
            "nb/c.ipynb": fake_notebook(polls=3),
            "nb/slow.ipynb": fake_notebook(polls=-1),  # never finishes by itself
            "nb/smoke/one.ipynb": fake_notebook(polls=1),
            "nb/smoke/two.ipynb": fake_notebook(polls=1),
            "nb/refused.ipynb": {**fake_notebook(), "metadata": {"fake": {"refuse": True}}},
        },
    )


def test_all_pass_and_summary_matches_the_contract(flow_env, repo):
    body = message(repo, ["nb/a.ipynb", "nb/c.ipynb"], compute={"backend": "fake"})
    _, instance, status = run(flow_env, body)
    summary = status["output"]
    assert status["runtimeStatus"] == "Completed"
    assert summary["result"] == "succeeded"
    assert summary["instanceId"] == instance
    assert len(summary["commit"]) == 40
    assert summary["counts"] == {
        "total": 2,
        "succeeded": 2,
        "failed": 0,
        "timedOut": 0,
        "canceled": 0,
    }
    assert [n["path"] for n in summary["notebooks"]] == ["nb/a.ipynb", "nb/c.ipynb"]
    for nb in summary["notebooks"]:
        assert nb["runId"].startswith("nb-") and nb["portalUrl"].startswith("https://fake/")
        assert nb["outputNotebook"].endswith(nb["path"])
        assert nb["durationSeconds"] == 2.0
    assert {"startedAt", "finishedAt"} <= set(summary)


def test_failure_makes_the_run_fail_unless_allowed(flow_env, repo):
    body = message(repo, ["nb/a.ipynb", "nb/b.ipynb"], compute={"backend": "fake"})
    _, _, status = run(flow_env, body)
    summary = status["output"]
    assert summary["result"] == "failed"
    failed = summary["notebooks"][1]
    assert failed["state"] == "failed"
    assert failed["error"] == {
        "cellIndex": 1,
        "ename": "ValueError",
        "evalue": "fake failure",
        "traceback": "Traceback: fake",
    }


def test_allowed_failure_gives_succeeded_with_issues(flow_env, repo):
    body = message(
        repo,
        ["nb/a.ipynb", {"path": "nb/b.ipynb", "allowFailure": True}],
        compute={"backend": "fake"},
    )
    assert run(flow_env, body)[2]["output"]["result"] == "succeededWithIssues"


def test_globs_expand_sorted_and_parameters_merge(flow_env, repo):
    body = message(
        repo,
        ["nb/smoke/*.ipynb", {"path": "nb/a.ipynb", "parameters": {"alpha": 2}}],
        parameters={"env": "ci", "alpha": 1},
        compute={"backend": "fake"},
    )
    _, _, status = run(flow_env, body)
    paths = [n["path"] for n in status["output"]["notebooks"]]
    assert paths == ["nb/a.ipynb", "nb/smoke/one.ipynb", "nb/smoke/two.ipynb"]
    params = [run["parameters"] for run in FakeBackend.runs.values()]
    assert params.count({"env": "ci", "alpha": 2}) == 1  # the entry's own value wins
    assert params.count({"env": "ci", "alpha": 1}) == 2


def test_missing_and_malformed_notebooks_fail_alone_and_the_others_run(flow_env, repo):
    from tests.gitrepos import commit

    commit(repo, {"nb/broken.ipynb": '{"cells": ['}, "add a broken one")
    body = message(
        repo,
        ["nb/a.ipynb", "nb/nope.ipynb", {"path": "nb/broken.ipynb", "allowFailure": True}],
        compute={"backend": "fake"},
    )
    _, _, status = run(flow_env, body)
    summary = status["output"]
    assert summary["result"] == "failed"  # nb/nope.ipynb is not allowed to fail
    assert summary["errors"] == []
    by_path = {n["path"]: n for n in summary["notebooks"]}
    assert by_path["nb/a.ipynb"]["state"] == "succeeded"
    nope, broken = by_path["nb/nope.ipynb"], by_path["nb/broken.ipynb"]
    assert (nope["state"], nope["error"]["ename"]) == ("failed", "NotebookNotFound")
    assert "'nb/nope.ipynb' not found at commit" in nope["message"]
    assert (broken["state"], broken["error"]["ename"]) == ("failed", "InvalidNotebook")
    assert "invalid JSON" in broken["error"]["evalue"] and broken["allowFailure"] is True
    assert summary["counts"]["failed"] == 2 and summary["counts"]["succeeded"] == 1
    assert len(FakeBackend.submits) == 1  # only nb/a.ipynb ran


def test_bad_ref_fails_without_retrying(flow_env, repo):
    body = message(repo, ["nb/a.ipynb"], compute={"backend": "fake"})
    body["repository"]["ref"] = "no-such-branch"
    _, _, status = run(flow_env, body)
    assert status["output"]["result"] == "failed"
    assert "no-such-branch" in status["output"]["errors"][0]
    # What the message named is kept: the notebook, not run, with the reason.
    [notebook] = status["output"]["notebooks"]
    assert notebook["path"] == "nb/a.ipynb" and notebook["state"] == "canceled"
    assert notebook["message"] == "not run: the repository could not be cloned"


def test_a_failed_clone_keeps_the_commit_the_message_named(flow_env, repo):
    body = message(repo, ["nb/a.ipynb", "nb/*.ipynb"], compute={"backend": "fake"})
    body["repository"]["commit"] = "1" * 40  # not in the repository
    output = run(flow_env, body)[2]["output"]
    assert output["result"] == "failed" and output["commit"] == "1" * 40
    # A pattern names no notebook until the clone expands it; the plain path is kept.
    assert [n["path"] for n in output["notebooks"]] == ["nb/a.ipynb"]
    assert output["counts"]["canceled"] == output["counts"]["total"] == 1


def test_permanent_backend_error_fails_that_notebook_only(flow_env, repo):
    body = message(
        repo, ["nb/a.ipynb", "nb/refused.ipynb"], compute={"backend": "fake", "target": "gpu-x"}
    )
    summary = run(flow_env, body)[2]["output"]
    by_path = {n["path"]: n for n in summary["notebooks"]}
    assert by_path["nb/a.ipynb"]["state"] == "succeeded"
    assert by_path["nb/refused.ipynb"]["state"] == "failed"
    assert "'gpu-x' not found" in by_path["nb/refused.ipynb"]["error"]["evalue"]


def test_transient_status_errors_are_tolerated(flow_env):
    repo = make_repo(flow_env / "r2", {"nb/x.ipynb": fake_notebook(polls=2, transient=2)})
    summary = run(flow_env, message(repo, ["nb/x.ipynb"], compute={"backend": "fake"}))[2]["output"]
    assert summary["result"] == "succeeded"


def test_per_notebook_timeout_cancels_that_run(flow_env, repo):
    """The fake enforces no limit itself (like a runner that hung): the orchestrator stops the
    run at its limit plus the grace it leaves a runner to report the cell on its own."""
    from notebookops.policy import RUNNER_GRACE_SECONDS

    body = message(
        repo,
        ["nb/a.ipynb", {"path": "nb/slow.ipynb", "timeoutMinutes": 30}],
        compute={"backend": "fake"},
        timeoutMinutes=600,
    )
    _, _, status = run(flow_env, body)
    summary = status["output"]
    slow = summary["notebooks"][1]
    assert slow["state"] == "timedOut"
    assert slow["message"] == "timeoutMinutes 30 reached"
    assert slow["error"]["ename"] == "TimeoutError"
    assert summary["result"] == "failed"
    # The backend was told to stop.
    assert FakeBackend.runs[slow["runId"]]["state"] == "canceled"
    # Stopped at the deadline, not at the next poll after it.
    assert slow["durationSeconds"] == pytest.approx(30 * 60 + RUNNER_GRACE_SECONDS, abs=1)


def test_queue_time_never_counts_against_a_notebooks_timeout(flow_env):
    """Forty minutes waiting for compute (scale-up, image build), then a short run: the
    notebook's 5-minute limit counts from its start, so it succeeds, and the summary tells
    the queue time apart from the execution time."""
    repo = make_repo(
        flow_env / "rq",
        {
            "nb/busy.ipynb": fake_notebook(polls=3, queuedPolls=45),
            "nb/hangs.ipynb": fake_notebook(polls=-1, queuedPolls=45),
        },
    )
    body = message(
        repo,
        [
            {"path": "nb/busy.ipynb", "timeoutMinutes": 5},
            {"path": "nb/hangs.ipynb", "timeoutMinutes": 5},
        ],
        compute={"backend": "fake"},
        timeoutMinutes=600,
    )
    summary = run(flow_env, body)[2]["output"]
    busy, hangs = summary["notebooks"]
    assert busy["state"] == "succeeded", busy
    assert busy["queuedSeconds"] > 30 * 60  # it waited longer than its limit, and still ran
    assert busy["durationSeconds"] == 2.0  # the backend's own start and end
    # The one that never ends is stopped 5 minutes (plus the grace) after it started.
    assert hangs["state"] == "timedOut" and hangs["message"] == "timeoutMinutes 5 reached"
    assert hangs["queuedSeconds"] > 30 * 60
    assert hangs["durationSeconds"] == pytest.approx(5 * 60 + 60, abs=1)
    assert summary["result"] == "failed"


def test_whole_run_deadline_cancels_what_never_started(flow_env):
    """At the run's deadline the running notebook times out, while the one still queued on
    the backend and the one waiting for a maxParallel slot are canceled: they did not fail."""
    repo = make_repo(
        flow_env / "rd",
        {
            "nb/1-runs.ipynb": fake_notebook(polls=-1),
            "nb/2-queued.ipynb": fake_notebook(queuedPolls=-1),
            "nb/3-waits.ipynb": fake_notebook(),
        },
    )
    body = message(
        repo, ["nb/*.ipynb"], compute={"backend": "fake"}, timeoutMinutes=15, maxParallel=2
    )
    summary = run(flow_env, body)[2]["output"]
    runs, queued, waits = summary["notebooks"]
    assert runs["state"] == "timedOut"
    assert runs["message"] == "the run's timeoutMinutes 15 reached"
    for never in (queued, waits):
        assert never["state"] == "canceled", never
        assert never["message"] == "not started before the run's deadline (timeoutMinutes 15)"
        assert never["durationSeconds"] is None
        assert never["queuedSeconds"] == pytest.approx(15 * 60, abs=1)
    # Both created jobs were told to stop; the third was never submitted.
    assert FakeBackend.runs[runs["runId"]]["state"] == "canceled"
    assert FakeBackend.runs[queued["runId"]]["state"] == "canceled"
    assert waits["runId"] is None and len(FakeBackend.submits) == 2
    assert summary["counts"]["timedOut"] == 1 and summary["counts"]["canceled"] == 2
    assert summary["result"] == "failed"


def test_a_submit_out_of_retries_fails_that_notebook_only(flow_env):
    """Sustained 429s on one notebook's submit: after its activity retries it is `failed`
    with a one-line error, and the other notebooks run to their own verdicts."""
    repo = make_repo(
        flow_env / "rt",
        {
            "nb/a.ipynb": fake_notebook(polls=2),
            "nb/b.ipynb": fake_notebook(polls=2, throttle=-1),
            "nb/c.ipynb": fake_notebook(polls=2, throttle=2),  # two 429s, then accepted
        },
    )
    _, _, status = run(flow_env, message(repo, ["nb/*.ipynb"], compute={"backend": "fake"}))
    assert status["runtimeStatus"] == "Completed"
    summary = status["output"]
    states = {n["path"]: n["state"] for n in summary["notebooks"]}
    assert states == {"nb/a.ipynb": "succeeded", "nb/b.ipynb": "failed", "nb/c.ipynb": "succeeded"}
    throttled = summary["notebooks"][1]
    assert throttled["message"] == (
        "submit failed after its retries: RuntimeError: (TooManyRequests) "
        "Too many job submissions, retry after 60 s…"  # the 429's body is on the next lines
    )
    assert throttled["error"]["ename"] == "SubmitFailed" and throttled["runId"] is None
    assert summary["errors"] == []  # a notebook's problem, not the run's
    assert summary["result"] == "failed"
    b_key = next(k for k in FakeBackend.attempts if "nb-b" in k)
    assert FakeBackend.attempts.count(b_key) == 3  # the activity's three attempts


def test_a_submit_error_quoting_the_pipeline_token_is_redacted_everywhere(flow_env, devops):
    """A throttling gateway that quotes the Authorization header in its 429: the notebook's
    one-line error reaches the summary, the durable status and history without the token."""
    token = devops.properties()["AuthToken"]
    repo = make_repo(
        flow_env / "rs",
        {"nb/echo.ipynb": fake_notebook(throttle=-1, echo=f"Authorization: Basic {token}")},
    )
    body = message(repo, ["nb/echo.ipynb"], compute={"backend": "fake"})
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body, properties=devops.properties())
        status = host.wait_for(instance, 60)
        full = host.get_status(instance, show_history=True, show_history_output=True)
    (nb,) = status["output"]["notebooks"]
    assert nb["state"] == "failed"
    assert nb["message"].startswith("submit failed after its retries: RuntimeError: (TooMany")
    assert "Authorization: Basic ***" in nb["message"]
    assert token not in json.dumps(full)


def test_an_orchestration_error_cancels_every_job_already_created(flow_env, monkeypatch):
    """Status reads fail for good (the status endpoint is down) while cancel still works: the
    run ends failed with the error, and the jobs it created do not keep running unwatched."""
    from notebookops import activities

    real_monitor = activities.monitor

    def status_down(payload):
        if payload.get("runs"):
            raise ConnectionError("status endpoint unreachable")
        return real_monitor(payload)  # cancel-only rounds

    monkeypatch.setattr(activities, "monitor", status_down)
    repo = make_repo(
        flow_env / "rx",
        {f"nb/n{i}.ipynb": fake_notebook(polls=-1) for i in range(3)},
    )
    body = message(repo, ["nb/*.ipynb"], compute={"backend": "fake"}, maxParallel=2)
    _, _, status = run(flow_env, body)
    summary = status["output"]
    assert status["runtimeStatus"] == "Completed"
    assert summary["result"] == "failed"
    assert "status endpoint unreachable" in summary["errors"][0]
    assert [n["state"] for n in summary["notebooks"]] == ["canceled"] * 3
    created = [n["runId"] for n in summary["notebooks"] if n["runId"]]
    assert len(created) == 2  # maxParallel 2: the third was never submitted
    assert all(FakeBackend.runs[key]["state"] == "canceled" for key in created)
    assert summary["notebooks"][2]["message"].startswith("not started")


def test_whole_run_timeout_stops_every_pending_run(flow_env, repo):
    body = message(
        repo, ["nb/slow.ipynb", "nb/a.ipynb"], compute={"backend": "fake"}, timeoutMinutes=15
    )
    summary = run(flow_env, body)[2]["output"]
    states = {n["path"]: n["state"] for n in summary["notebooks"]}
    assert states == {"nb/a.ipynb": "succeeded", "nb/slow.ipynb": "timedOut"}
    assert summary["result"] == "failed"
    slow = summary["notebooks"][1]
    assert slow["message"] == "the run's timeoutMinutes 15 reached"
    # The run's deadline is wall clock: 15 minutes from the run's start, queue time included.
    assert slow["durationSeconds"] + slow["queuedSeconds"] == pytest.approx(15 * 60, abs=1)


def test_fail_fast_cancels_the_rest(flow_env, repo):
    body = message(
        repo, ["nb/b.ipynb", "nb/slow.ipynb"], compute={"backend": "fake"}, failFast=True
    )
    summary = run(flow_env, body)[2]["output"]
    states = {n["path"]: n["state"] for n in summary["notebooks"]}
    assert states == {"nb/b.ipynb": "failed", "nb/slow.ipynb": "canceled"}
    assert "failFast" in summary["notebooks"][1]["message"]


def test_max_parallel_bounds_runs_in_flight(flow_env):
    files = {f"nb/n{i:02}.ipynb": fake_notebook(polls=2) for i in range(6)}
    repo = make_repo(flow_env / "r3", files)
    body = message(repo, ["nb/*.ipynb"], compute={"backend": "fake"}, maxParallel=2)
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body)
        peak = 0
        while True:
            status = host.get_status(instance)
            custom = status.get("customStatus") or {}
            counts = custom.get("counts") or {}
            peak = max(peak, counts.get("running", 0) + counts.get("queued", 0))
            if status["runtimeStatus"] == "Completed":
                break
            host.wait_for  # noqa: B018 - keep polling
        assert status["output"]["result"] == "succeeded"
    assert peak <= 2
    assert len(FakeBackend.submits) == 6


def test_history_stays_bounded_over_many_rounds(flow_env):
    """Runs that need 400 polls: continue_as_new keeps each generation's history small."""
    files = {f"nb/n{i}.ipynb": fake_notebook(polls=400) for i in range(5)}
    repo = make_repo(flow_env / "r4", files)
    body = message(repo, ["nb/*.ipynb"], compute={"backend": "fake"}, timeoutMinutes=10080)
    sizes = []
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body)
        while True:
            history = host.history(instance)
            sizes.append(len(history))
            status = host.get_status(instance)
            if status["runtimeStatus"] == "Completed":
                break
        generation = next(e for e in history if e["EventType"] == EXECUTION_STARTED)["Generation"]
    assert status["output"]["result"] == "succeeded"
    assert generation >= 60  # 400 rounds at ROUNDS_PER_GENERATION (2) per generation
    # Documented bound (README): 3 events per notebook + 100 per generation.
    assert max(sizes) <= 3 * 5 + 100
    assert not any(e["EventType"] == CONTINUE_AS_NEW for e in history[:-1])


def test_duplicate_delivery_starts_one_instance_and_one_run_per_notebook(flow_env, repo, devops):
    CALLBACK = devops.properties()
    body = message(repo, ["nb/a.ipynb", "nb/c.ipynb"], compute={"backend": "fake"})
    with app_host(flow_env / "state") as host:
        first = deliver(host, body, properties=CALLBACK, message_id="m1")
        second = deliver(host, body, properties=CALLBACK, message_id="m2")  # redelivered copy
        assert first == second
        host.wait_for(first, 60)
        third = deliver(host, body, properties=CALLBACK, message_id="m3")  # after it finished
        assert third == first
        assert len(host.store.list_instances()) == 1
    assert len(FakeBackend.submits) == 2


def test_invalid_message_with_callback_values_finishes_failed_with_the_errors(flow_env, devops):
    CALLBACK = devops.properties()
    body = {
        "repository": {"url": "https://dev.azure.com/contoso/p/_git/r"},
        "notebooks": ["../x.ipynb"],
        "timeoutMinutes": -5,
    }
    _, _, status = run(flow_env, body, properties=CALLBACK)
    summary = status["output"]
    assert summary["result"] == "failed"
    joined = " ".join(summary["errors"])
    assert "notebooks[0]" in joined and "timeoutMinutes" in joined


def test_invalid_message_without_callback_values_raises_for_the_dead_letter_queue(flow_env):
    from devhost import FunctionError

    with app_host(flow_env / "state") as host:
        with pytest.raises(FunctionError, match="notebooks"):
            deliver(host, {"repository": {"url": "https://example.com/r.git"}, "notebooks": []})
        assert host.store.list_instances() == []


def test_the_token_never_reaches_durable_state_status_or_output(flow_env, repo, caplog, devops):
    CALLBACK = devops.properties()
    body = message(repo, ["nb/a.ipynb", "nb/b.ipynb"], compute={"backend": "fake"})
    token = CALLBACK["AuthToken"]
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body, properties=CALLBACK)
        status = host.wait_for(instance, 60)
        full = host.get_status(instance, show_history=True, show_history_output=True)
        carried = _carried_states(host, instance)
        db_bytes = (flow_env / "state" / "devhost.sqlite3").read_bytes()
        wal = flow_env / "state" / "devhost.sqlite3-wal"
        db_bytes += wal.read_bytes() if wal.exists() else b""
    assert status["output"]["result"] == "failed"
    assert token not in json.dumps(full)
    assert token.encode() not in db_bytes
    # The state continue_as_new carries is compressed: read, it holds the sealed token only.
    assert carried and all(token not in json.dumps(c) for c in carried)
    assert all(c["auth"] and c["auth"] != token for c in carried)
    assert token not in caplog.text
    outputs = "".join(p.read_text() for p in (flow_env / "outputs").rglob("*") if p.is_file())
    assert token not in outputs


def _carried_states(host, instance):
    """Every state a generation of the instance was given or handed on, read (policy.carried)."""
    from notebookops import policy

    with host.store.read() as db:
        rows = db.execute(
            "SELECT event FROM history WHERE instance_id=? ORDER BY seq", (instance,)
        ).fetchall()
    inputs = [host.get_status(instance)["input"]]
    for (text,) in rows:
        event = json.loads(text)
        text = event.get("Input") if event["EventType"] == EXECUTION_STARTED else None
        if event["EventType"] == CONTINUE_AS_NEW:
            text = event.get("Result")  # devhost and DTFx keep its input there
        if text:
            inputs.append(json.loads(text))
    return [policy.carried(i["state"]) for i in inputs if isinstance(i, dict) and i.get("state")]


def test_activity_out_of_retries_still_reports_a_failed_summary(flow_env, repo, monkeypatch):
    from notebookops import activities

    def broken(payload):
        raise ConnectionError("compute service unreachable")

    monkeypatch.setattr(activities, "monitor", broken)
    body = message(repo, ["nb/a.ipynb"], compute={"backend": "fake"})
    _, _, status = run(flow_env, body)
    summary = status["output"]
    assert status["runtimeStatus"] == "Completed"
    assert summary["result"] == "failed"
    assert "ActivityMonitor" in summary["errors"][0]
    assert "compute service unreachable" in summary["errors"][0]
    assert summary["notebooks"][0]["state"] == "canceled"
    # The cancel goes through the same broken activity: the run says the job may live on.
    assert "could not cancel 1 run(s) (nb/a.ipynb)" in summary["errors"][1]


def test_local_notebook_metadata_unused_by_fake(flow_env):
    # Guard: the fake reads its scenario from the committed notebook, not from defaults.
    repo = make_repo(flow_env / "r5", {"nb/plain.ipynb": notebook("x = 1")})
    summary = run(flow_env, message(repo, ["nb/plain.ipynb"], compute={"backend": "fake"}))[2]
    assert summary["output"]["result"] == "succeeded"


def test_a_backends_start_time_is_trusted_only_between_submission_and_observation():
    """The deadline counts from the backend's startedAt (its own clock), but a skewed or
    garbled time can neither start it before the submit nor after the round that saw it."""
    from datetime import UTC, datetime, timedelta

    from notebookops import policy

    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    state = {"request": {"timeoutMinutes": 600}, "notebooks": []}

    def started(reported, seen=t0 + timedelta(minutes=30)):
        notebook = {"timeoutMinutes": 5, "submittedAt": policy.iso(t0), "readyAt": policy.iso(t0)}
        policy.mark_running(state, notebook, reported, seen)
        return notebook

    inside = started("2026-01-01T12:20:00+00:00")
    assert inside["startedAt"] == "2026-01-01T12:20:00.000000Z"
    assert inside["queuedSeconds"] == 20 * 60
    assert inside["deadline"] == policy.iso(
        t0 + timedelta(minutes=25, seconds=policy.RUNNER_GRACE_SECONDS)
    )
    assert started("2025-12-31T00:00:00Z")["startedAt"] == policy.iso(t0)  # before the submit
    assert started("2026-01-02T00:00:00Z")["startedAt"] == "2026-01-01T12:30:00.000000Z"
    assert started("not a time")["startedAt"] == "2026-01-01T12:30:00.000000Z"
    assert started(None)["startedAt"] == "2026-01-01T12:30:00.000000Z"


def test_each_generation_carries_a_small_state_and_each_round_a_small_monitor_input(flow_env):
    """Every replay of a generation parses its input and re-serializes every activity input
    of its rounds (benchmark 2 measures that CPU), so what travels holds what is used: a
    finished notebook's handle and fields still at their initial value stay out of the
    state continue_as_new carries, and a monitor input names each run by its handle without
    the portal link; the summary still has everything."""
    from devhost.events import TASK_SCHEDULED
    from notebookops import policy

    files = {"nb/quick.ipynb": fake_notebook(polls=2), "nb/long.ipynb": fake_notebook(polls=25)}
    repo = make_repo(flow_env / "r5", files)
    body = message(repo, ["nb/*.ipynb"], compute={"backend": "fake"}, timeoutMinutes=10080)
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body)
        status = host.wait_for(instance, 60)
        history = host.history(instance)  # the last generation's
    started = next(e for e in history if e["EventType"] == EXECUTION_STARTED)
    monitor_inputs = [
        json.loads(e["Input"])
        for e in history
        if e["EventType"] == TASK_SCHEDULED and e["Name"] == "ActivityMonitor"
    ]
    assert status["output"]["result"] == "succeeded"
    assert started["Generation"] >= 1
    payload = json.loads(started["Input"])
    by_path = {n["path"]: n for n in policy.carried(payload["state"])["notebooks"]}
    quick, long = by_path["nb/quick.ipynb"], by_path["nb/long.ipynb"]
    assert quick["state"] == "succeeded" and "handle" not in quick
    assert long["state"] == "running" and "portalUrl" not in long["handle"]
    assert not [k for n in by_path.values() for k, v in n.items() if v is None or v == []]
    runs = [r for i in monitor_inputs for r in i["runs"]]
    assert runs and all(set(r) == {"path", "handle", "seen"} for r in runs)
    assert all("portalUrl" not in r["handle"] for r in runs)
    summary = {n["path"]: n for n in status["output"]["notebooks"]}
    for path in files:
        assert summary[path]["portalUrl"] == f"https://fake/{summary[path]['runId']}"
        assert summary[path]["error"] is None and summary[path]["message"] is None
        assert summary[path]["outputNotebook"]


class _Rounds(Host):
    """devhost, recording each monitor round (what it was asked, what it answered) and the
    custom status a person reading the instance's status sees after every episode."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rounds: list[tuple[dict, dict]] = []
        self.seen: list[tuple[set[str], dict]] = []  # (runs ended in this episode, status)

    def _commit(self, inst, history, rows, res, now):
        events = history + [e for e, _ in res.history]
        asked = {
            e["EventId"]: json.loads(e["Input"])
            for e in events
            if e["EventType"] == TASK_SCHEDULED and e["Name"] == "ActivityMonitor"
        }
        ended = set()
        for event, _ in res.history:
            if event["EventType"] == TASK_COMPLETED and event["TaskScheduledId"] in asked:
                answer = json.loads(event["Result"])
                self.rounds.append((asked[event["TaskScheduledId"]], answer))
                ended |= {r["path"] for r in answer["runs"] if r["state"] in TERMINAL_STATES}
        super()._commit(inst, history, rows, res, now)
        self.seen.append((ended, self.get_status(inst.instance_id)["customStatus"] or {}))


def _run_recorded(flow_env, folder: str, files: dict) -> tuple[_Rounds, dict]:
    """The notebooks `files` on the fake backend through a recording devhost on the virtual
    clock: the host (its rounds and statuses) and the final status, which succeeded."""
    repo = make_repo(flow_env / folder, files)
    body = message(repo, ["nb/*.ipynb"], compute={"backend": "fake"}, timeoutMinutes=600)
    with _Rounds(APP_ROOT, flow_env / "state", clock="virtual") as host:
        instance = deliver(host, body)
        status = host.wait_for(instance, 60)
    assert status["output"]["result"] == "succeeded"
    return host, status


def test_a_monitor_round_answers_only_for_runs_with_news(flow_env):
    """A round's answer lands in the history every later episode of the generation parses
    again, so the monitor answers only for runs whose state changed since the orchestrator
    saw them: a run still queued or still running is left out, and the summary is what it
    was (queue time measured from the transition to running, durations, outputs)."""
    files = {
        "nb/waits.ipynb": fake_notebook(polls=4, queuedPolls=3),
        "nb/runs.ipynb": fake_notebook(polls=8),
    }
    host, status = _run_recorded(flow_env, "r7", files)
    summary = {n["path"]: n for n in status["output"]["notebooks"]}
    # Queued for 3 more polls than the other, so queued for longer: the moment it was seen
    # running was in an answer.
    assert summary["nb/waits.ipynb"]["queuedSeconds"] > summary["nb/runs.ipynb"]["queuedSeconds"]
    for entry in summary.values():
        assert entry["state"] == "succeeded" and entry["durationSeconds"] == 2.0
        assert entry["outputNotebook"] and entry["outputHtml"]
    answered = 0
    for asked, answer in host.rounds:
        seen = {r["path"]: r["seen"] for r in asked["runs"]}
        assert set(seen) <= set(files) and set(seen.values()) <= {"queued", "running"}
        for result in answer["runs"]:
            assert result["state"] != seen[result["path"]]  # news only
        answered += len(answer["runs"])
    # Each run is answered for when it starts running and when it ends: 4 answers in all,
    # over rounds that watched the two runs 15 times (3 + 4 and 8 status reads).
    assert answered == 4
    assert sum(len(asked["runs"]) for asked, _ in host.rounds) == 3 + 4 + 8
    assert any(not answer["runs"] for _, answer in host.rounds)


def test_the_status_shows_each_round_as_it_happens(flow_env, monkeypatch):
    """The custom status is built by the rounds that run, not by those that replay (the host
    keeps the last status an episode set): after the episode that saw a notebook end, the
    status already shows it ended, while the other still runs, and it never goes back."""
    from notebookops import policy

    built = []
    real = policy.custom_status
    monkeypatch.setattr(policy, "custom_status", lambda *a: built.append(a[1]) or real(*a))
    files = {"nb/quick.ipynb": fake_notebook(polls=2), "nb/long.ipynb": fake_notebook(polls=9)}
    host, status = _run_recorded(flow_env, "r8", files)
    assert status["customStatus"]["phase"] == "finished"
    states = [
        {n["path"]: n["state"] for n in custom.get("notebooks", [])} for _, custom in host.seen
    ]
    ended_at = {path: i for i, (ended, _) in enumerate(host.seen) for path in ended}
    assert set(ended_at) == set(files)
    for path, index in ended_at.items():
        # From the episode that saw it end on, the status says so.
        assert all(s[path] == "succeeded" for s in states[index:])
        assert all(s.get(path) != "succeeded" for s in states[:index])
    assert states[ended_at["nb/quick.ipynb"]]["nb/long.ipynb"] == "running"
    # Not one status per replayed round: at most one per episode that ran a round anew.
    assert built.count("running") <= len(host.seen)


def test_a_state_carried_by_an_older_version_reads_the_same():
    """A generation started by a version that carried every field (no pack) goes on as one
    carried by this version: unpack fills what pack left out, and nothing else."""
    from datetime import UTC, datetime

    from notebookops import policy

    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    state = policy.new_state(
        instance_id="i1", request={"notebooks": ["a.ipynb", "b.ipynb"]}, auth=None, started_at=now
    )
    policy.add_notebooks(
        state,
        {
            "commit": "c" * 40,
            "checkout": "/c",
            "notebooks": [
                {"path": "a.ipynb", "entryIndex": 0},
                {"path": "b.ipynb", "entryIndex": 1},
            ],
        },
    )
    handle = {"backend": "fake", "runId": "r-a", "portalUrl": "https://fake/r-a", "data": {}}
    for entry in state["notebooks"]:
        policy.mark_submitted(entry, {"ok": True, "handle": {**handle}}, now)
    policy.apply_monitor(state, [{"path": "a.ipynb", "state": "succeeded"}], now)
    old = json.loads(json.dumps(state))  # what a version without pack() carried
    assert policy.unpack(json.loads(json.dumps(old))) == old
    packed = json.loads(json.dumps(policy.pack(state)))
    assert len(json.dumps(packed)) < 0.8 * len(json.dumps(old))
    again = policy.unpack(packed)
    assert again["notebooks"][0]["handle"] is None  # finished: its handle is not carried
    assert {**again["notebooks"][0], "handle": old["notebooks"][0]["handle"]} == old["notebooks"][0]
    assert again["notebooks"][1] == old["notebooks"][1]
    assert policy.summary(again, now) == policy.summary(old, now)
    assert policy.cancellations(again, now) == policy.cancellations(old, now) == []


def test_the_carried_state_is_compressed_and_reads_back_as_packed():
    """continue_as_new carries pack(state) as compressed text (every episode receives it twice,
    and the host and the SDK pay per character); it reads back as the packed state, and an
    older version's input, which carried that JSON object as it was, reads the same."""
    from datetime import UTC, datetime

    from notebookops import policy

    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    paths = [f"nb/n{i:03d}.ipynb" for i in range(500)]
    state = policy.new_state(
        instance_id="i1", request={"notebooks": paths}, auth="sealed", started_at=now
    )
    policy.add_notebooks(
        state,
        {
            "commit": "c" * 40,
            "notebooks": [{"path": p, "entryIndex": i} for i, p in enumerate(paths)],
        },
    )
    for i, entry in enumerate(state["notebooks"]):
        handle = {"backend": "fake", "runId": f"r-{i}", "portalUrl": f"https://fake/r-{i}"}
        policy.mark_submitted(entry, {"ok": True, "handle": handle}, now)
    policy.apply_monitor(state, [{"path": p, "state": "running"} for p in paths[:250]], now)
    policy.apply_monitor(state, [{"path": "nb/n000.ipynb", "state": "succeeded"}], now)
    packed = json.loads(json.dumps(policy.pack(state)))
    text = policy.carry(state)
    assert isinstance(text, str) and len(text) < 0.2 * len(json.dumps(packed))
    assert policy.carried(json.loads(json.dumps(text))) == packed
    assert policy.carried(packed) is packed  # an older version's input
    assert policy.unpack(policy.carried(text)) == policy.unpack(packed)
    with pytest.raises(ValueError):
        policy.carried("not base64 at all!")


def test_a_run_whose_generations_carried_the_state_uncompressed_goes_on_the_same(
    flow_env, monkeypatch
):
    """A generation started by the version before compression (its input holds the packed state
    as a JSON object) goes on on this one: the run ends as a run carried compressed ends."""
    from notebookops import policy

    files = {"nb/quick.ipynb": fake_notebook(polls=2), "nb/long.ipynb": fake_notebook(polls=9)}
    repo = make_repo(flow_env / "r9", files)
    body = message(repo, ["nb/*.ipynb"], compute={"backend": "fake"}, timeoutMinutes=600)
    outputs = []
    for label, carry in (("object", policy.pack), ("text", policy.carry)):
        monkeypatch.setattr(policy, "carry", carry)
        FakeBackend.reset()
        with app_host(flow_env / f"state-{label}") as host:
            instance = deliver(host, body, message_id="m1")  # the same instance id
            status = host.wait_for(instance, 60)
            started = next(e for e in host.history(instance) if e["EventType"] == EXECUTION_STARTED)
        carried = json.loads(started["Input"])["state"]
        assert isinstance(carried, dict if label == "object" else str)
        assert started["Generation"] >= 2
        outputs.append(status["output"])
    assert outputs[0]["result"] == "succeeded"
    assert outputs[0] == outputs[1]


def test_a_generation_started_without_a_round_count_takes_the_ten_rounds_it_was_started_with(
    flow_env,
):
    """An instance started (or continued) by a version that always took 10 monitor rounds per
    generation names no count in its input: that generation replays with 10 on this code (a
    different count would be a non-determinism error mid-generation), and the generations
    this code starts take policy.ROUNDS_PER_GENERATION."""
    from devhost import Host
    from devhost.events import TASK_SCHEDULED
    from notebookops import policy
    from notebookops.request import parse_request
    from notebookops.starter import orchestration_input
    from tests.flow_support import APP_ROOT

    class Generations(Host):
        """devhost, recording the monitor rounds of each generation as it ends."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.rounds: list[int] = []

        def _commit(self, inst, history, rows, res, now):
            if res.status in ("ContinuedAsNew", "Completed"):
                events = history + [e for e, _ in res.history]
                monitors = [
                    e
                    for e in events
                    if e["EventType"] == TASK_SCHEDULED and e["Name"] == "ActivityMonitor"
                ]
                self.rounds.append(len(monitors))
            super()._commit(inst, history, rows, res, now)

    files = {"nb/long.ipynb": fake_notebook(polls=23)}
    repo = make_repo(flow_env / "r6", files)
    body = message(repo, ["nb/*.ipynb"], compute={"backend": "fake"}, timeoutMinutes=10080)
    new = orchestration_input(parse_request(body), None, [])
    assert new["roundsPerGeneration"] == policy.ROUNDS_PER_GENERATION == 2
    old = {k: v for k, v in new.items() if k != "roundsPerGeneration"}
    every = policy.ROUNDS_PER_GENERATION
    for payload, first in ((old, 10), (new, every)):
        with Generations(APP_ROOT, flow_env / f"state-{first}", clock="virtual") as host:
            instance = host.start_new("OrchestratorFunction", payload)
            status = host.wait_for(instance, 60)
        rounds = host.rounds
        assert status["runtimeStatus"] == "Completed"
        assert status["output"]["result"] == "succeeded"
        # 23 polls: the first generation takes as many rounds as its input says (its first
        # round submits, with nothing to poll yet), every later one ROUNDS_PER_GENERATION,
        # the last ends with the run.
        assert rounds[0] == first - 1
        assert all(r == every for r in rounds[1:-1])
        assert sum(rounds) == 23


def _wide_files(count: int) -> dict:
    folder = "nb/a-folder-with-a-rather-long-and-descriptive-name"
    files = {
        f"{folder}/experiment-{i:03d}-with-a-long-descriptive-name.ipynb": fake_notebook(
            polls=2 + i % 5
        )
        for i in range(count)
    }
    files[f"{folder}/experiment-007-with-a-long-descriptive-name.ipynb"] = fake_notebook(
        polls=1, outcome="failed"
    )
    return files


def test_a_run_of_many_notebooks_keeps_its_custom_status_within_16_kb(flow_env):
    """The durable extension fails an out-of-process orchestration whose custom status is over
    16 KB of UTF-16 JSON, and devhost does as it does. 120 notebooks with long paths would need
    about 30 KB: the status lists the running, failed and waiting ones first and counts the
    rest, every notebook stays counted, and the output lists them all."""
    from devhost.episode import custom_status_problem

    files = _wide_files(120)
    repo = make_repo(flow_env / "wide", files)
    body = message(repo, ["nb/**/*.ipynb"], compute={"backend": "fake"}, timeoutMinutes=600)
    with _Rounds(APP_ROOT, flow_env / "state", clock="virtual") as host:
        instance = deliver(host, body)
        status = host.wait_for(instance, 120)
    assert status["runtimeStatus"] == "Completed", status["output"]
    assert status["output"]["result"] == "failed"  # the one notebook that fails
    assert len(status["output"]["notebooks"]) == 120
    failed = next(p for p in files if "experiment-007" in p)
    statuses = [custom for _, custom in host.seen if custom.get("notebooks")]
    assert statuses
    assert all(custom_status_problem(custom) is None for custom in statuses)
    assert all(custom["counts"]["total"] == 120 for custom in statuses)
    assert any(custom.get("unlisted") for custom in statuses)
    for custom in statuses:
        listed = {n["path"]: n["state"] for n in custom["notebooks"]}
        assert len(listed) + custom.get("unlisted", 0) == 120
        running = custom["counts"]["running"]
        # What people look for comes first: every running notebook, and the failed one.
        assert sum(1 for s in listed.values() if s == "running") == running
        if custom["counts"]["failed"]:
            assert listed[failed] == "failed"


def test_devhost_fails_an_orchestration_whose_custom_status_is_over_16_kb(flow_env, monkeypatch):
    """What the Azure host does with a status over the limit, met by the same run with the
    status's own limit lifted: the orchestration fails with the host's message."""
    from notebookops import policy

    monkeypatch.setattr(policy, "_STATUS_BUDGET", 10**9)
    repo = make_repo(flow_env / "wide", _wide_files(120))
    body = message(repo, ["nb/**/*.ipynb"], compute={"backend": "fake"}, timeoutMinutes=600)
    _, _, status = run(flow_env, body, timeout=120)
    assert status["runtimeStatus"] == "Failed"
    assert "must not exceed 16 KB" in json.dumps(status["output"])
