"""The app reporting to a waiting Azure DevOps pipeline, end to end on devhost.

Azure DevOps cannot be reached from here: tests/fake_devops.py is a fake server on
127.0.0.1 that speaks the documented REST protocol and records every request. Compute is
the in-process fake backend on a virtual clock, so deadlines and cancellation take no time.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from datetime import timedelta
from pathlib import Path

import pytest

from devhost import VirtualClock
from devhost.events import EXECUTION_STARTED
from notebookops.report import junit_xml
from tests.devhost_support import http
from tests.fake_devops import FakeDevOps
from tests.flow_support import FakeBackend, app_host, deliver, fake_notebook, make_repo, message

TOKEN = "pipeline-token-Zq8v2L"


@pytest.fixture
def devops():
    with FakeDevOps(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def repo(flow_env):
    return make_repo(
        flow_env / "repo",
        {
            "nb/a.ipynb": fake_notebook(polls=2),
            "nb/b.ipynb": fake_notebook(polls=3, outcome="failed"),
            "nb/slow.ipynb": fake_notebook(polls=-1),
        },
    )


def body_for(repo, notebooks, **fields):
    return message(
        repo, notebooks, compute={"backend": "fake"}, devops={"buildId": "4242"}, **fields
    )


def run(flow_env, devops, body, timeout=60):
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body, properties=devops.properties())
        return host.wait_for(instance, timeout)


def test_all_pass_reports_log_feed_test_results_and_one_task_completed(
    flow_env, repo, devops, monkeypatch
):
    monkeypatch.setenv("NOTEBOOKOPS_PUBLIC_URL", "http://127.0.0.1:7071")
    status = run(flow_env, devops, body_for(repo, ["nb/a.ipynb"]))
    assert status["output"]["result"] == "succeeded"
    assert [e["result"] for e in devops.task_completed_events()] == ["succeeded"]
    event = devops.task_completed_events()[0]
    assert event["taskId"] == devops.task_instance_id and event["jobId"] == devops.job_id
    assert len(devops.task_started_events()) == 1
    feed = "\n".join(devops.feed_lines())
    assert "accepted: commit" in feed
    assert "submitted nb/a.ipynb: https://fake/" in feed
    assert "finished nb/a.ipynb: succeeded" in feed
    assert "result: succeeded" in feed
    log_text = devops.log_text()
    assert "accepted: commit" in log_text and "result: succeeded" in log_text
    assert devops.task_record()["log"]["id"] is not None
    runs = devops.test_runs()
    assert len(runs) == 1 and runs[0]["state"] == "Completed"
    assert [r["outcome"] for r in runs[0]["results"]] == ["Passed"]
    assert runs[0]["results"][0]["attachments"], "the executed notebook is attached"
    creations = [r for r in devops.requests_to("/logs", method="POST") if r.path.endswith("/logs")]
    assert len(creations) == 1  # created once, then appended
    (tab,) = devops.summary_attachments()  # the pipeline's summary tab
    assert tab["name"] == "notebookops.md"
    assert tab["content"].startswith("### Notebooks: ✅ succeeded")
    assert "| nb/a.ipynb | succeeded |" in tab["content"]
    assert tab["content"].rstrip().endswith(f"/api/runs/{status['output']['instanceId']})")


def test_failures_make_the_pipeline_fail_with_the_cell(flow_env, repo, devops):
    status = run(flow_env, devops, body_for(repo, ["nb/a.ipynb", "nb/b.ipynb"]))
    assert status["output"]["result"] == "failed"
    assert [e["result"] for e in devops.task_completed_events()] == ["failed"]
    assert any(
        "finished nb/b.ipynb: failed" in line and "(cell 1)" in line for line in devops.feed_lines()
    )
    outcomes = {r["automatedTestName"]: r["outcome"] for r in devops.test_runs()[0]["results"]}
    assert sorted(outcomes.values()) == ["Failed", "Passed"]


def test_allowed_failures_only_give_succeeded_with_issues(flow_env, repo, devops):
    body = body_for(repo, ["nb/a.ipynb", {"path": "nb/b.ipynb", "allowFailure": True}])
    run(flow_env, devops, body)
    assert [e["result"] for e in devops.task_completed_events()] == ["succeededWithIssues"]


def test_clone_failure_is_reported_failed(flow_env, repo, devops):
    run(flow_env, devops, body_for(repo, ["nb/missing.ipynb"]))
    assert [e["result"] for e in devops.task_completed_events()] == ["failed"]
    assert "nb/missing.ipynb" in devops.log_text()


def test_invalid_message_with_callback_values_fails_the_pipeline_with_the_errors(flow_env, devops):
    body = {
        "repository": {"url": "https://dev.azure.com/x/y/_git/z"},
        "notebooks": [],
        "maxParallel": 0,
    }
    run(flow_env, devops, body)
    assert [e["result"] for e in devops.task_completed_events()] == ["failed"]
    text = devops.log_text()
    assert "notebooks" in text and "maxParallel" in text


def test_whole_run_deadline_reports_failed(flow_env, repo, devops):
    status = run(flow_env, devops, body_for(repo, ["nb/slow.ipynb"], timeoutMinutes=20))
    assert status["output"]["notebooks"][0]["state"] == "timedOut"
    assert [e["result"] for e in devops.task_completed_events()] == ["failed"]


def test_pipeline_cancelled_mid_run_stops_runs_without_a_callback(flow_env, repo, devops):
    body = body_for(repo, ["nb/a.ipynb", "nb/slow.ipynb"], timeoutMinutes=600)
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body, properties=devops.properties())
        # Let it start, then cancel the pipeline as Azure DevOps does: the record completes.
        while not devops.feed_lines() or "finished nb/a.ipynb" not in "\n".join(
            devops.feed_lines()
        ):
            host.wait_for  # noqa: B018
        devops.set_task_record(state="completed", result="canceled")
        status = host.wait_for(instance, 60)
    assert status["output"]["result"] == "canceled"
    assert devops.task_completed_events() == []
    assert devops.task_completed_attempts() == []  # truly gone: nothing is sent
    assert status["output"]["callback"]["delivered"] is False
    slow = next(n for n in status["output"]["notebooks"] if n["path"] == "nb/slow.ipynb")
    assert slow["state"] == "canceled"
    assert FakeBackend.runs[slow["runId"]]["state"] == "canceled"


def test_duplicate_delivery_calls_back_once(flow_env, repo, devops):
    body = body_for(repo, ["nb/a.ipynb"])
    with app_host(flow_env / "state") as host:
        first = deliver(host, body, properties=devops.properties(), message_id="m1")
        host.wait_for(first, 60)
        deliver(host, body, properties=devops.properties(), message_id="m2")
    assert len(devops.task_completed_events()) == 1


def test_server_errors_are_retried_until_the_callback_lands(flow_env, repo, devops):
    body = body_for(repo, ["nb/a.ipynb", "nb/slow.ipynb"], timeoutMinutes=30)
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body, properties=devops.properties())
        while "submitted" not in "\n".join(devops.feed_lines()):
            host.wait_for  # noqa: B018
        devops.fail_next("/events", statuses=[500, 500])  # TaskStarted went through already
        host.wait_for(instance, 60)
    assert [e["result"] for e in devops.task_completed_events()] == ["failed"]
    statuses = [
        r.status for r in devops.requests_to("/events", method="POST") if b"TaskCompleted" in r.body
    ]
    assert statuses[:2] == [500, 500] and statuses[2] < 300 and len(statuses) == 3


def test_404_means_no_longer_waiting_and_is_not_retried(flow_env, repo, devops, caplog):
    body = body_for(repo, ["nb/a.ipynb"])
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body, properties=devops.properties())
        while "submitted" not in "\n".join(devops.feed_lines()):
            host.wait_for  # noqa: B018
        devops.no_longer_waiting(404)
        status = host.wait_for(instance, 60)
    assert status["runtimeStatus"] == "Completed"
    completed = [
        r for r in devops.requests_to("/events", method="POST") if b"TaskCompleted" in r.body
    ]
    assert len(completed) <= 1  # one attempt at most, answered 404, never looped
    callback = status["output"]["callback"]
    assert callback["delivered"] is False and "HTTP 404" in callback["lastError"]


def test_callback_timing_out_is_retried_and_lands_once(flow_env, repo, devops, monkeypatch, caplog):
    """Each TaskCompleted is answered after 1 s but the client gives up after 0.2 s: the
    first attempt lands late, the retry meets 'already completed' (4xx) and stops."""
    monkeypatch.setenv("NOTEBOOKOPS_DEVOPS_TIMEOUT_SECONDS", "0.2")
    body = body_for(repo, ["nb/a.ipynb"])
    with caplog.at_level(logging.INFO), app_host(flow_env / "state") as host:
        instance = deliver(host, body, properties=devops.properties())
        while "submitted" not in "\n".join(devops.feed_lines()):
            host.wait_for  # noqa: B018
        devops.slow("/events", seconds=1.0, times=1)  # the TaskCompleted that times out
        status = host.wait_for(instance, 120)
    assert status["runtimeStatus"] == "Completed"
    assert [e["result"] for e in devops.task_completed_events()] == ["succeeded"]
    attempts = [
        r for r in devops.requests_to("/events", method="POST") if b"TaskCompleted" in r.body
    ]
    assert len(attempts) >= 2
    assert TOKEN not in caplog.text


def _wait_for_feed(host, devops, text="submitted"):
    while text not in "\n".join(devops.feed_lines()):
        host.wait_for  # noqa: B018


def _seen(status, caplog, host, instance):
    full = host.get_status(instance, show_history=True, show_history_output=True)
    return [json.dumps(status), json.dumps(full), caplog.text]


def test_a_callback_that_never_lands_gives_up_at_the_horizon_and_completes(flow_env, repo, caplog):
    """503 for ever: TaskCompleted is tried on durable timers (virtual clock) up to the
    horizon, history stays bounded across generations, and the run still ends Completed with
    its notebook results and a readable callback.lastError."""
    body = body_for(repo, ["nb/a.ipynb"], timeoutMinutes=30)
    sizes = []
    clock = VirtualClock()
    with (
        FakeDevOps(token=TOKEN, clock=clock.now) as devops,
        caplog.at_level(logging.INFO),
        app_host(flow_env / "state", clock=clock) as host,
    ):
        instance = deliver(host, body, properties=devops.properties())
        _wait_for_feed(host, devops)
        devops.always("/events", 503, method="POST")
        while (status := host.get_status(instance))["runtimeStatus"] not in ("Completed", "Failed"):
            sizes.append(len(host.history(instance)))
        history = host.history(instance)
        seen = _seen(status, caplog, host, instance)
    output = status["output"]
    assert status["runtimeStatus"] == "Completed"
    assert output["result"] == "succeeded"
    assert [n["state"] for n in output["notebooks"]] == ["succeeded"]
    callback = output["callback"]
    assert callback["delivered"] is False
    assert callback["attempts"] > 20  # more than one generation's worth
    assert "\n" not in callback["lastError"] and "HTTP 503" in callback["lastError"]
    assert "horizon" in callback["lastError"]
    assert devops.task_completed_events() == []
    attempts = devops.task_completed_attempts()
    assert len(attempts) == callback["attempts"]
    # Horizon: an hour after the run's own deadline (started + 30 minutes).
    span = attempts[-1].at - attempts[0].at
    assert timedelta(minutes=80) <= span <= timedelta(minutes=95)
    gaps = [b.at - a.at for a, b in itertools.pairwise(attempts)]
    assert max(gaps) <= timedelta(minutes=5, seconds=1)
    generation = next(e for e in history if e["EventType"] == EXECUTION_STARTED)["Generation"]
    assert generation >= 1  # counted from 0: delivery went on in a fresh history
    assert max(sizes) <= 150
    assert all(TOKEN not in text for text in seen)


@pytest.mark.parametrize("mode", ["503", "unreachable"])
def test_an_hour_long_outage_then_recovery_delivers_exactly_once_within_minutes(
    flow_env, repo, mode, caplog
):
    clock = VirtualClock()
    body = body_for(repo, ["nb/a.ipynb", "nb/b.ipynb"], timeoutMinutes=60)
    with (
        FakeDevOps(token=TOKEN, clock=clock.now) as devops,
        caplog.at_level(logging.INFO),
        app_host(flow_env / "state", clock=clock) as host,
    ):
        instance = deliver(host, body, properties=devops.properties())
        _wait_for_feed(host, devops)
        recovery = devops.outage(3600, mode=mode)
        status = host.wait_for(instance, 120)
        seen = _seen(status, caplog, host, instance)
    assert status["runtimeStatus"] == "Completed"
    assert [e["result"] for e in devops.task_completed_events()] == ["failed"]
    (accepted,) = [r for r in devops.task_completed_attempts() if 200 <= r.status < 300]
    assert recovery <= accepted.at <= recovery + timedelta(minutes=5)
    callback = status["output"]["callback"]
    assert callback["delivered"] is True and callback["lastError"] is None
    assert callback["attempts"] == len(devops.task_completed_attempts()) > 5
    # The notebooks were not cancelled because the feed or the record read failed.
    assert {n["path"]: n["state"] for n in status["output"]["notebooks"]} == {
        "nb/a.ipynb": "succeeded",
        "nb/b.ipynb": "failed",
    }
    assert all(TOKEN not in text for text in seen)


@pytest.mark.parametrize(
    ("path", "answer", "method"),
    [
        ("/feed", 400, None),
        ("/feed", 404, None),
        ("/logs", 400, "POST"),
        ("/logs/", 404, "POST"),
        ("/records", "signin", "PATCH"),
        ("/feed", "redirect", None),
        ("/_apis/test/", 401, None),
        ("/attachments/", "html", None),
    ],
)
def test_a_rejected_side_call_never_costs_the_verdict(
    flow_env, repo, devops, path, answer, method, caplog
):
    """A feed, log, attach, test-result or summary call answered with a 4xx or a sign-in page
    used to make every later call fail, TaskCompleted included (or read as 'gone')."""
    devops.always(path, answer, method=method)
    with caplog.at_level(logging.WARNING, logger="notebookops"):
        status = run(flow_env, devops, body_for(repo, ["nb/a.ipynb"]))
    assert status["runtimeStatus"] == "Completed"
    assert status["output"]["notebooks"][0]["state"] == "succeeded"
    assert [e["result"] for e in devops.task_completed_events()] == ["succeeded"]
    assert status["output"]["callback"] == {"delivered": True, "attempts": 1, "lastError": None}
    # Refused once, logged once, not knocked on again for the rest of the run.
    refused = devops.requests_to(path, method)  # every one of them gets the refusal
    assert len(refused) == 1
    assert sum("no more" in r.getMessage() for r in caplog.records) == 1


def test_a_sign_in_page_on_task_completed_is_retried_a_few_times_then_lands(flow_env, repo, devops):
    body = body_for(repo, ["nb/a.ipynb"])
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body, properties=devops.properties())
        _wait_for_feed(host, devops)
        devops.fail_next("/events", ["signin", "redirect"], method="POST")
        status = host.wait_for(instance, 60)
    assert [e["result"] for e in devops.task_completed_events()] == ["succeeded"]
    assert [r.status for r in devops.task_completed_attempts()] == [203, 302, 204]
    assert status["output"]["callback"]["delivered"] is True


def test_an_expired_token_ends_completed_without_a_hang_and_says_why(
    flow_env, repo, devops, caplog
):
    body = body_for(repo, ["nb/a.ipynb"])
    with caplog.at_level(logging.INFO), app_host(flow_env / "state") as host:
        instance = deliver(host, body, properties=devops.properties())
        _wait_for_feed(host, devops)
        devops.expire_token()
        status = host.wait_for(instance, 60)
        seen = _seen(status, caplog, host, instance)
    assert status["runtimeStatus"] == "Completed"
    assert status["output"]["notebooks"][0]["state"] == "succeeded"  # not read as "gone"
    callback = status["output"]["callback"]
    assert callback["delivered"] is False and callback["attempts"] == 3
    assert "authentication failed" in callback["lastError"]
    assert "HTTP 401" in callback["lastError"]
    assert len(devops.task_completed_attempts()) == 3
    assert all(r.header("X-TFS-FedAuthRedirect") == "Suppress" for r in devops.requests)
    assert all(TOKEN not in text for text in seen)


def test_a_plan_url_answering_html_is_never_retried_for_ever(flow_env, repo, devops, caplog):
    devops.always("/events", "html", method="POST")
    with caplog.at_level(logging.INFO):
        status = run(flow_env, devops, body_for(repo, ["nb/a.ipynb"]))
    assert status["runtimeStatus"] == "Completed"
    callback = status["output"]["callback"]
    assert callback["delivered"] is False and callback["attempts"] == 3
    assert "an HTML page where JSON was expected" in callback["lastError"]
    assert len(devops.task_completed_attempts()) == 3
    assert TOKEN not in caplog.text and TOKEN not in json.dumps(status)


def test_errors_are_one_line_each_and_the_run_keeps_its_results(flow_env, repo, devops):
    body = body_for(repo, ["nb/a.ipynb"])
    body["repository"]["ref"] = "no-such-branch"
    status = run(flow_env, devops, body)
    assert status["runtimeStatus"] == "Completed"
    assert status["output"]["result"] == "failed"
    assert status["output"]["errors"] and all("\n" not in e for e in status["output"]["errors"])
    assert status["output"]["callback"]["delivered"] is True


def test_the_token_is_nowhere_a_person_can_see(flow_env, repo, devops, caplog):
    body = body_for(repo, ["nb/a.ipynb", "nb/b.ipynb"])
    with caplog.at_level(logging.DEBUG), app_host(flow_env / "state") as host:
        instance = deliver(host, body, properties=devops.properties())
        status = host.wait_for(instance, 60)
        full = host.get_status(instance, show_history=True, show_history_output=True)
        run_view = http("GET", f"{host.base_url}/api/runs/{instance}")
        started = http(
            "POST",
            f"{host.base_url}/api/runs",
            raw=json.dumps(body).encode(),
            headers=devops.properties(),
        )
        unknown = http("GET", f"{host.base_url}/api/runs/no-such-run")
    assert run_view[0] == 200 and run_view[1]["result"] == "failed"
    assert run_view[1]["notebooks"][0]["portalUrl"].startswith("https://fake/")
    assert unknown[0] == 404
    assert started[0] == 202 and started[1]["duplicate"] is True
    assert started[2]["Location"].endswith(f"/api/runs/{instance}")
    seen = [
        json.dumps(status),
        json.dumps(full),
        json.dumps(run_view[1]),
        json.dumps(started[1]),
        json.dumps(dict(started[2])),
        caplog.text,
        junit_xml(status["output"]),
        "\n".join(devops.feed_lines()),
        devops.log_text(),
        json.dumps(devops.test_runs()),
    ]
    for text in seen:
        assert TOKEN not in text
    import base64

    basic = base64.b64encode(f":{TOKEN}".encode()).decode()
    assert all(basic not in text for text in seen)


def test_http_starter_refuses_an_invalid_message_without_callback_values(flow_env):
    with app_host(flow_env / "state") as host:
        code, body, _ = http("POST", f"{host.base_url}/api/runs", {"notebooks": ["a.ipynb"]})
    assert code == 400
    assert any("repository" in e for e in body["errors"])


@pytest.mark.slow
def test_run_with_properties_prints_the_delivery_attempts_through_an_outage(tmp_path):
    """`python -m notebookops run --properties` as a user runs it, against the fake in outage
    mode: the fake stops answering at the first TaskCompleted for 4 s (real clock, a real
    kernel); the command shows each attempt and ends with one accepted TaskCompleted."""
    import subprocess
    import sys

    from tests.gitrepos import file_url, notebook

    repo = make_repo(tmp_path / "repo", {"nb/ok.ipynb": notebook("x = 1 + 1")})
    body = tmp_path / "body.json"
    body.write_text(
        json.dumps(
            {
                "repository": {"url": file_url(repo), "ref": "main"},
                "notebooks": ["nb/ok.ipynb"],
                "compute": {"backend": "local"},
            }
        )
    )
    gitconfig = tmp_path / "gitconfig"
    gitconfig.write_text("")
    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "GIT_CONFIG_GLOBAL": str(gitconfig),
        "NOTEBOOKOPS_CHECKOUT_DIR": str(tmp_path / "checkouts"),
    }
    with FakeDevOps(token=TOKEN) as devops:
        devops.outage(4, mode="unreachable", trigger=b'"TaskCompleted"')
        props = tmp_path / "props.json"
        props.write_text(json.dumps(devops.properties()))
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "notebookops",
                "run",
                str(body),
                "--properties",
                str(props),
                "--out",
                str(tmp_path / "out"),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "TaskCompleted attempt 1: TaskCompleted: Azure DevOps did not answer" in done.stdout
    assert "next attempt at" in done.stdout
    assert "pipeline: TaskCompleted accepted after 2 attempt(s)" in done.stdout
    assert [e["result"] for e in devops.task_completed_events()] == ["succeeded"]
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    assert summary["callback"] == {"delivered": True, "attempts": 2, "lastError": None}
    for text in (done.stdout, done.stderr, json.dumps(summary)):
        assert TOKEN not in text
