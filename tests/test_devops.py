"""The Azure DevOps client against a fake Azure DevOps server over real loopback HTTP.

Azure DevOps cannot be reached from tests; tests/fake_devops.py serves the documented protocol
(reference/devops-protocol.md §2-§5 and the Test Runs/Results/Attachments REST pages) on
127.0.0.1 and records every request, so these tests check the exact bytes the pipeline receives.
Back-off delays are injected (a recording ``sleep``), so nothing here sleeps for real.
"""

from __future__ import annotations

import base64
import json
import logging
import pickle
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from notebookops.devops.client import DevOpsClient
from notebookops.devops.test_results import output_under
from notebookops.devops.transport import (
    CallbackAuthFailed,
    CallbackRejected,
    CallbackUnavailable,
)
from tests.fake_devops import FakeDevOps

TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.fake-job-token-4f9c2e"


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def devops() -> Any:
    with FakeDevOps(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def client_for(fake: FakeDevOps, sleeps: Sleeps | None = None, **options: Any) -> DevOpsClient:
    options.setdefault("timeout", 5.0)
    return DevOpsClient.from_callback(
        fake.callback(), sleep=sleeps if sleeps is not None else Sleeps(), **options
    )


def plan_path(fake: FakeDevOps) -> str:
    return f"/fabrikam/{fake.project_id}/_apis/distributedtask/hubs/build/plans/{fake.plan_id}"


# -- TaskCompleted / TaskStarted ----------------------------------------------------------------


@pytest.mark.parametrize("trailing_slash", [True, False])
def test_task_completed_is_one_exact_request(devops: FakeDevOps, trailing_slash: bool) -> None:
    plan_url = devops.url if trailing_slash else devops.url.rstrip("/")
    client = DevOpsClient.from_callback(devops.callback(plan_url=plan_url), sleep=Sleeps())

    client.task_completed("succeeded")

    (request,) = devops.requests
    assert request.method == "POST"
    assert request.path == plan_path(devops) + "/events"
    assert request.query == {"api-version": ["7.1"]}  # Events_Post in the 7.1 Swagger
    assert request.header("Content-Type").startswith("application/json")
    assert request.header("X-TFS-FedAuthRedirect") == "Suppress"
    scheme, _, encoded = request.header("Authorization").partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded).decode() == ":" + TOKEN
    assert request.json() == {
        "name": "TaskCompleted",
        "taskId": devops.task_instance_id,
        "jobId": devops.job_id,
        "result": "succeeded",
    }
    assert devops.task_record()["result"] == "succeeded"


@pytest.mark.parametrize("result", ["succeeded", "succeededWithIssues", "failed", "canceled"])
def test_every_documented_result_is_sent_verbatim(devops: FakeDevOps, result: str) -> None:
    client_for(devops).task_completed(result)
    assert [e["result"] for e in devops.task_completed_events()] == [result]


@pytest.mark.parametrize("result", ["Succeeded", "success", "skipped", "", "FAILED"])
def test_unknown_result_is_refused_before_anything_is_sent(devops: FakeDevOps, result: str) -> None:
    with pytest.raises(ValueError, match="result must be one of"):
        client_for(devops).task_completed(result)
    assert devops.requests == []


def test_task_completed_twice_on_one_client_sends_once(devops: FakeDevOps) -> None:
    client = client_for(devops)
    client.task_completed("failed")
    client.task_completed("succeeded")
    assert [e["result"] for e in devops.task_completed_events()] == ["failed"]
    assert len(devops.requests_to("/events")) == 1


def test_task_started_event(devops: FakeDevOps) -> None:
    client_for(devops).task_started()
    (request,) = devops.requests
    assert request.path == plan_path(devops) + "/events"
    assert request.json() == {
        "name": "TaskStarted",
        "taskId": devops.task_instance_id,
        "jobId": devops.job_id,
    }
    assert devops.task_completed_events() == []


# -- feed ---------------------------------------------------------------------------------------


def test_feed_posts_timestamped_lines_to_the_job_record(devops: FakeDevOps) -> None:
    client = client_for(devops)
    assert client.feed(["cloning repository", "nb/a.ipynb: succeeded\nnb/b.ipynb: failed"])

    (request,) = devops.requests
    assert request.path == (
        plan_path(devops) + f"/timelines/{devops.timeline_id}/records/{devops.job_id}/feed"
    )
    assert request.query == {"api-version": ["4.1"]}
    body = request.json()
    assert body["count"] == 3 and len(body["value"]) == 3
    assert body["stepId"] == devops.task_instance_id
    texts = [line.split(" ", 1)[1] for line in devops.feed_lines()]
    assert texts == ["cloning repository", "nb/a.ipynb: succeeded", "nb/b.ipynb: failed"]
    stamp = devops.feed_lines()[0].split(" ", 1)[0]
    assert stamp.endswith("Z") and "T" in stamp


def test_feed_lines_never_exceed_1024_characters(devops: FakeDevOps) -> None:
    long_line = "x" * 5000
    assert client_for(devops).feed([long_line, "short"])
    lines = devops.feed_lines()
    assert len(lines) == 2
    assert max(len(line) for line in lines) == 1024
    assert lines[0].endswith("…")
    assert lines[1].endswith(" short")


def test_feed_is_best_effort_and_gives_up_quickly(devops: FakeDevOps, sleeps: Sleeps) -> None:
    devops.fail_next("/feed", [503, 503, 503])
    client = client_for(devops, sleeps)
    assert client.feed(["lost line"]) is False
    assert len(devops.requests_to("/feed")) == 2
    assert devops.feed_lines() == []
    # A failed feed does not stop the run being completed.
    client.task_completed("succeeded")
    assert len(devops.task_completed_events()) == 1


# -- persistent log -----------------------------------------------------------------------------


def test_log_is_created_once_attached_and_appended(devops: FakeDevOps) -> None:
    client = client_for(devops)
    log_id = client.ensure_log()
    assert client.ensure_log() == log_id
    client.append_log("first line\nsecond line")
    client.append_log("third line\n")

    creates = devops.requests_to("/logs", "POST")
    create = next(r for r in creates if r.path.endswith("/logs"))
    assert create.query == {"api-version": ["7.1"]}
    assert create.json() == {"path": f"logs\\{devops.task_instance_id}"}
    assert sum(r.path.endswith("/logs") for r in creates) == 1

    appends = [r for r in creates if r.path.endswith(f"/logs/{log_id}")]
    assert len(appends) == 2
    assert all(r.header("Content-Type") == "application/octet-stream" for r in appends)
    # Each line stamped like the lines the server's own helper writes.
    lines = devops.log_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["first line", "second line", "third line"]
    assert all(line.split(" ", 1)[0].endswith("Z") for line in lines)

    (patch,) = devops.requests_to("/records", "PATCH")
    assert patch.path == plan_path(devops) + f"/timelines/{devops.timeline_id}/records"
    assert patch.json() == {
        "value": [{"id": devops.task_instance_id, "log": {"id": log_id}}],
        "count": 1,
    }
    assert devops.task_record()["log"] == {"id": log_id}


def test_a_retried_activity_reuses_the_stored_log(devops: FakeDevOps) -> None:
    log_id = client_for(devops).ensure_log()
    client_for(devops).append_log("after a retry", log_id=log_id)
    assert sum(r.path.endswith("/logs") for r in devops.requests) == 1
    assert devops.log_text().endswith(" after a retry\n")


# -- task state (cancellation detection) --------------------------------------------------------


def test_task_state_reads_the_task_record(devops: FakeDevOps) -> None:
    client = client_for(devops)
    assert client.task_state() == "inProgress"
    (request,) = devops.requests
    assert request.method == "GET"
    assert request.path == plan_path(devops) + f"/timelines/{devops.timeline_id}/records"
    assert request.query == {"api-version": ["7.1-preview.1"]}  # TaskClient.get_records

    devops.set_task_record(state="completed", result="canceled")
    assert client.task_state() == "canceled"


def test_task_state_is_none_for_a_record_the_timeline_does_not_have(devops: FakeDevOps) -> None:
    callback = devops.callback()
    client = DevOpsClient(
        callback.plan_url,
        callback.project_id,
        callback.hub_name,
        callback.plan_id,
        callback.job_id,
        callback.timeline_id,
        "00000000-0000-4000-8000-000000000abc",
        TOKEN,
        sleep=Sleeps(),
    )
    assert client.task_state() is None


# -- retries and rejections ---------------------------------------------------------------------


def test_server_errors_are_retried_with_exponential_backoff(
    devops: FakeDevOps, sleeps: Sleeps
) -> None:
    devops.fail_next("/events", [500, 500])
    client_for(devops, sleeps).task_completed("failed")

    attempts = devops.requests_to("/events")
    assert [r.status for r in attempts] == [500, 500, 204]
    assert len(devops.task_completed_events()) == 1
    assert sleeps == [1.0, 2.0]


def test_408_and_429_are_retried_and_retry_after_is_bounded(
    devops: FakeDevOps, sleeps: Sleeps
) -> None:
    devops.fail_next("/events", [429, 408])
    client_for(devops, sleeps, backoff_base=0.5, backoff_max=4.0).task_completed("succeeded")
    assert [r.status for r in devops.requests_to("/events")] == [429, 408, 204]
    assert sleeps == [0.5, 1.0]


def test_retries_stop_after_max_attempts(devops: FakeDevOps, sleeps: Sleeps) -> None:
    devops.fail_next("/events", [502] * 10)
    client = client_for(devops, sleeps, max_attempts=4, backoff_max=3.0)
    with pytest.raises(CallbackUnavailable, match="after 4 attempts"):
        client.task_completed("succeeded")
    assert len(devops.requests_to("/events")) == 4
    assert sleeps == [1.0, 2.0, 3.0]
    assert devops.task_completed_events() == []


@pytest.mark.parametrize("status", [400, 404, 409])
def test_other_4xx_is_rejected_never_retried(
    devops: FakeDevOps, sleeps: Sleeps, status: int
) -> None:
    devops.fail_next("/events", [status])
    client = client_for(devops, sleeps)
    with pytest.raises(CallbackRejected) as raised:
        client.task_completed("succeeded")
    assert raised.value.status == status
    assert len(devops.requests) == 1
    assert sleeps == []


def test_a_rejected_side_call_disables_only_its_own_kind(
    devops: FakeDevOps, sleeps: Sleeps, caplog: pytest.LogCaptureFixture
) -> None:
    """A 400 on the feed used to make the client refuse every later call, TaskCompleted too."""
    devops.always("/feed", 400)
    client = client_for(devops, sleeps)
    with caplog.at_level(logging.INFO, logger="notebookops"):
        assert client.feed(["one"]) is False
        assert client.feed(["two"]) is False  # not knocked on again
        assert client.append_log("still logged") is True
        outcome = client.try_task_completed("succeeded")
    assert outcome["outcome"] == "accepted"
    assert [e["result"] for e in devops.task_completed_events()] == ["succeeded"]
    assert len(devops.requests_to("/feed")) == 1
    assert set(client.disabled) == {"feed"} and client.newly_disabled == client.disabled
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "HTTP 400" in warnings[0] and "feed" in warnings[0]
    # The next activity of the run gets the mapping back and stays quiet.
    later = client_for(devops, sleeps, disabled=client.disabled)
    assert later.feed(["three"]) is False and len(devops.requests_to("/feed")) == 1


@pytest.mark.parametrize(
    ("answer", "status"),
    [("signin", 203), ("redirect", 302), ("html", 200), (401, 401), (403, 403)],
)
def test_authentication_failures_are_failures_never_success(
    devops: FakeDevOps, sleeps: Sleeps, answer: object, status: int
) -> None:
    devops.fail_next("/events", [answer])
    client = client_for(devops, sleeps)
    outcome = client.try_task_completed("succeeded")
    assert outcome["outcome"] == "auth" and outcome["status"] == status
    assert "authentication failed" in outcome["error"] and "TaskCompleted" in outcome["error"]
    assert len(devops.requests) == 1 and sleeps == []  # a sign-in page is not retried
    # The redirect was not followed to the sign-in host.
    assert all(r.path.startswith("/fabrikam/") for r in devops.requests)
    with pytest.raises(CallbackAuthFailed):
        devops.fail_next("/feed", [answer])
        client.call("feed", "POST", client.plan_base + "/feed-probe", "7.1", json_body={})


def test_an_expired_token_gets_401_because_the_client_suppresses_the_sign_in_page(
    devops: FakeDevOps,
) -> None:
    devops.expire_token()
    client = client_for(devops)
    outcome = client.try_task_completed("failed")
    assert (outcome["outcome"], outcome["status"]) == ("auth", 401)
    assert client.pipeline_state() == "unknown"  # refused read: never "gone"
    assert "record" in client.disabled
    # Without the header the same call gets the sign-in page with a 203.
    import requests

    answer = requests.get(
        client.timeline_base + "/records", params={"api-version": "7.1"}, timeout=5
    )
    assert answer.status_code == 203 and "Sign In" in answer.text


def test_one_attempt_reports_an_outage_with_its_retry_after(devops: FakeDevOps) -> None:
    devops.outage(60)
    client = client_for(devops)
    outcome = client.try_task_completed("succeeded")
    assert outcome["outcome"] == "unavailable" and outcome["retryAfter"] == 30.0
    assert len(devops.requests) == 1
    devops.outage(60, mode="unreachable")
    outcome = client.try_task_completed("succeeded")
    assert outcome["outcome"] == "unavailable" and "ConnectionError" in outcome["error"]
    assert devops.task_completed_events() == []


def test_the_fake_refuses_fields_the_swagger_does_not_declare(devops: FakeDevOps) -> None:
    client = client_for(devops)
    with pytest.raises(CallbackRejected, match="RunCreateModel declares no field startedDate"):
        client.call(
            "create test run",
            "POST",
            client.project_base + "/_apis/test/runs",
            "7.1",
            json_body={"name": "x", "startedDate": "2026-01-01T00:00:00Z"},
        )
    with pytest.raises(CallbackRejected, match="TaskCompleted declares no field message"):
        client.call(
            "TaskCompleted",
            "POST",
            client.plan_base + "/events",
            "7.1",
            json_body={"name": "TaskCompleted", "jobId": devops.job_id, "message": "hi"},
        )
    with pytest.raises(CallbackRejected, match=r"declared with '7\.1'"):
        client.call("events", "POST", client.plan_base + "/events", "2.0-preview.1", json_body={})


def test_a_cancelled_run_rejects_plan_calls(devops: FakeDevOps) -> None:
    devops.set_task_record(state="completed", result="canceled")
    devops.no_longer_waiting(404)
    client = client_for(devops)
    with pytest.raises(CallbackRejected, match="no longer waiting"):
        client.task_completed("failed")
    assert devops.task_completed_events() == []


def test_a_slow_server_times_out_into_callback_unavailable(
    devops: FakeDevOps, sleeps: Sleeps
) -> None:
    devops.slow("/events", 3.0, times=3)
    client = client_for(devops, sleeps, timeout=0.2, max_attempts=3)
    started = time.monotonic()
    with pytest.raises(CallbackUnavailable) as raised:
        client.task_completed("succeeded")
    assert time.monotonic() - started < 2.5  # three 0.2 s timeouts, back-off not slept
    assert "Timeout" in str(raised.value)
    assert len(devops.requests_to("/events")) == 3
    assert sleeps == [1.0, 2.0]


def test_an_unreachable_server_is_unavailable_not_rejected(sleeps: Sleeps) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with FakeDevOps(token=TOKEN) as fake:
        callback = fake.callback(plan_url=f"http://127.0.0.1:{port}/fabrikam/")
    client = DevOpsClient.from_callback(callback, sleep=sleeps, timeout=1.0, max_attempts=3)
    with pytest.raises(CallbackUnavailable, match="ConnectionError"):
        client.task_completed("succeeded")
    assert sleeps == [1.0, 2.0]


def test_errors_survive_pickling_for_the_durable_host() -> None:
    error = CallbackRejected("TaskCompleted: HTTP 404", operation="TaskCompleted", status=404)
    copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes, as the host does
    assert (type(copy), str(copy), copy.operation, copy.status) == (
        CallbackRejected,
        "TaskCompleted: HTTP 404",
        "TaskCompleted",
        404,
    )


# -- test results --------------------------------------------------------------------------------


def _summary(out: Path) -> dict[str, Any]:
    (out / "notebooks/nb").mkdir(parents=True)
    for name in ("ok", "broken", "flaky"):
        (out / f"notebooks/nb/{name}.ipynb").write_text(f'{{"cells": [], "name": "{name}"}}')
    return {
        "instanceId": "nbops-0123456789abcdef",
        "result": "failed",
        "commit": "0123456789abcdef0123456789abcdef01234567",
        "startedAt": "2026-05-01T10:00:00Z",
        "finishedAt": "2026-05-01T10:05:00Z",
        "counts": {"total": 5, "succeeded": 1, "failed": 2, "timedOut": 1, "canceled": 1},
        "notebooks": [
            {
                "path": "nb/ok.ipynb",
                "state": "succeeded",
                "runId": "run-1",
                "portalUrl": "https://ml.azure.com/runs/run-1",
                "durationSeconds": 12.3456,
                "error": None,
                "message": None,
                "outputNotebook": "notebooks/nb/ok.ipynb",
                "allowFailure": False,
            },
            {
                "path": "nb/broken.ipynb",
                "state": "failed",
                "runId": "run-2",
                "portalUrl": None,
                "durationSeconds": 3.0,
                "error": {
                    "cellIndex": 3,
                    "ename": "ValueError",
                    "evalue": "alpha must be positive",
                    "traceback": "\x1b[0;31mValueError\x1b[0m: alpha must be positive",
                },
                "message": None,
                "outputNotebook": "notebooks/nb/broken.ipynb",
                "allowFailure": False,
            },
            {
                "path": "nb/flaky.ipynb",
                "state": "failed",
                "runId": "run-3",
                "portalUrl": None,
                "durationSeconds": 1.0,
                "error": {"cellIndex": 0, "ename": "KeyError", "evalue": "'x'", "traceback": ""},
                "message": None,
                "outputNotebook": "notebooks/nb/flaky.ipynb",
                "allowFailure": True,
            },
            {
                "path": "nb/slow.ipynb",
                "state": "timedOut",
                "runId": "run-4",
                "portalUrl": None,
                "durationSeconds": 600.0,
                "error": None,
                "message": "exceeded its 10 minute timeout",
                "outputNotebook": None,
                "allowFailure": False,
            },
            {
                "path": "nb/skipped.ipynb",
                "state": "canceled",
                "runId": None,
                "portalUrl": None,
                "durationSeconds": None,
                "error": None,
                "message": "canceled after a failure (failFast)",
                "outputNotebook": None,
                "allowFailure": False,
            },
        ],
    }


def test_publish_test_results_one_run_one_result_per_notebook(
    devops: FakeDevOps, tmp_path: Path
) -> None:
    summary = _summary(tmp_path)
    client = client_for(devops)

    run_id = client.publish_test_results(summary, output_under(tmp_path))

    (run,) = devops.test_runs()
    assert run["id"] == run_id
    assert run["build"] == {"id": "4242"}
    assert run["automated"] is True
    assert "nbops-0123456789abcdef" in run["name"]
    assert run["state"] == "Completed"
    assert run["completedDate"] == "2026-05-01T10:05:00Z"

    results = {r["testCaseTitle"]: r for r in run["results"]}
    assert list(results) == [n["path"] for n in summary["notebooks"]]
    assert {t: r["outcome"] for t, r in results.items()} == {
        "nb/ok.ipynb": "Passed",
        "nb/broken.ipynb": "Failed",
        "nb/flaky.ipynb": "Failed",
        "nb/slow.ipynb": "Timeout",
        "nb/skipped.ipynb": "NotExecuted",
    }
    assert results["nb/ok.ipynb"]["durationInMs"] == 12346
    assert "errorMessage" not in results["nb/ok.ipynb"]
    broken = results["nb/broken.ipynb"]
    assert broken["errorMessage"] == "ValueError: alpha must be positive (cell 3)"
    assert broken["stackTrace"] == "ValueError: alpha must be positive"  # no ANSI colours
    assert "allowFailure" in results["nb/flaky.ipynb"]["comment"]
    assert results["nb/slow.ipynb"]["errorMessage"] == "exceeded its 10 minute timeout"
    assert "run-1" in results["nb/ok.ipynb"]["comment"]

    attached = {t: [a["content"] for a in r["attachments"]] for t, r in results.items()}
    assert attached == {
        "nb/ok.ipynb": ['{"cells": [], "name": "ok"}'],
        "nb/broken.ipynb": ['{"cells": [], "name": "broken"}'],
        "nb/flaky.ipynb": ['{"cells": [], "name": "flaky"}'],
        "nb/slow.ipynb": [],
        "nb/skipped.ipynb": [],
    }
    assert results["nb/ok.ipynb"]["attachments"][0]["fileName"] == "ok.ipynb"

    versions = {
        (r.method, r.path.rsplit("/", 1)[-1].lower()): r.query["api-version"][0]
        for r in devops.requests
    }
    assert versions[("POST", "runs")] == "7.1"
    assert versions[("POST", "results")] == "7.1"
    assert versions[("POST", "attachments")] == "7.1"  # test.json declares 7.1
    assert versions[("PATCH", str(run_id))] == "7.1"
    assert all(
        r.path.startswith(f"/fabrikam/{devops.project_id}/_apis/test/") for r in devops.requests
    )


def test_no_build_id_means_no_test_run(devops: FakeDevOps, tmp_path: Path) -> None:
    client = DevOpsClient.from_callback(devops.callback(build_id=None), sleep=Sleeps())
    assert client.publish_test_results(_summary(tmp_path), output_under(tmp_path)) is None
    assert devops.requests == []


def test_test_results_failing_never_blocks_task_completed(
    devops: FakeDevOps, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    devops.fail_next("/results", [403], method="POST")
    client = client_for(devops)
    with caplog.at_level(logging.WARNING):
        run_id = client.publish_test_results(_summary(tmp_path), output_under(tmp_path))
    assert run_id is not None
    (run,) = devops.test_runs()
    assert run["state"] == "Completed" and run["results"] == []
    assert any("HTTP 403" in r.getMessage() for r in caplog.records)

    client.task_completed("failed")
    assert [e["result"] for e in devops.task_completed_events()] == ["failed"]


def test_a_missing_executed_notebook_only_skips_its_attachment(
    devops: FakeDevOps, tmp_path: Path
) -> None:
    summary = _summary(tmp_path)
    (tmp_path / "notebooks/nb/broken.ipynb").unlink()
    client_for(devops).publish_test_results(summary, output_under(tmp_path))
    (run,) = devops.test_runs()
    counts = {r["testCaseTitle"]: len(r["attachments"]) for r in run["results"]}
    assert counts["nb/broken.ipynb"] == 0
    assert counts["nb/ok.ipynb"] == counts["nb/flaky.ipynb"] == 1


def test_a_rerun_report_finds_its_own_test_run_and_adds_nothing_twice(
    devops: FakeDevOps, tmp_path: Path
) -> None:
    summary = _summary(tmp_path)
    first = client_for(devops).publish_test_results(summary, output_under(tmp_path))
    again = client_for(devops).publish_test_results(summary, output_under(tmp_path))
    assert first == again
    (run,) = devops.test_runs()
    assert len(run["results"]) == len(summary["notebooks"])
    (listing,) = [r for r in devops.requests_to("/_apis/test/runs", "GET")][-1:]
    assert listing.query["buildUri"] == ["vstfs:///Build/Build/4242"]
    assert run["startDate"] == "2026-05-01T10:00:00Z"  # RunCreateModel's name for it


def test_a_run_left_half_published_gets_only_the_missing_results(
    devops: FakeDevOps, tmp_path: Path
) -> None:
    summary = _summary(tmp_path)
    devops.fail_next("/results", [503, 503], method="POST")  # the first report gave up here
    client_for(devops).publish_test_results(summary, output_under(tmp_path))
    (run,) = devops.test_runs()
    assert run["results"] == [] and run["state"] == "Completed"
    devops.runs[run["id"]]["state"] = "InProgress"  # as if the crash came before completing
    client_for(devops).publish_test_results(summary, output_under(tmp_path))
    (run,) = devops.test_runs()
    assert [r["automatedTestName"] for r in run["results"]] == [
        n["path"] for n in summary["notebooks"]
    ]
    assert run["state"] == "Completed"


def test_the_summary_tab_is_a_record_attachment_of_the_summary_type(devops: FakeDevOps) -> None:
    client = client_for(devops)
    assert client.attach_summary("### Notebooks\n| a | b |\n")
    (request,) = devops.requests
    assert request.method == "PUT"
    assert request.path == (
        plan_path(devops) + f"/timelines/{devops.timeline_id}/records/{devops.task_instance_id}"
        "/attachments/Distributedtask.Core.Summary/notebookops.md"
    )
    assert request.query == {"api-version": ["7.1-preview.1"]}  # TaskClient.create_attachment
    assert request.header("Content-Type") == "application/octet-stream"
    (attachment,) = devops.summary_attachments()
    assert attachment["content"] == "### Notebooks\n| a | b |\n"


def test_a_refused_summary_never_blocks_task_completed(devops: FakeDevOps) -> None:
    devops.always("/attachments/", 404)
    client = client_for(devops)
    assert client.attach_summary("x") is False
    assert client.try_task_completed("succeeded")["outcome"] == "accepted"
    assert set(client.disabled) == {"summary"}


# -- the token never leaks -----------------------------------------------------------------------


def test_the_token_appears_in_no_log_exception_repr_or_output(
    devops: FakeDevOps, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    basic = base64.b64encode(f":{TOKEN}".encode()).decode()
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        client = client_for(devops, max_attempts=2)
        seen.append(repr(client))
        client.feed([f"the token is {TOKEN}"])
        client.append_log(f"log line with {TOKEN}")
        summary = _summary(tmp_path)
        summary["notebooks"][1]["error"]["evalue"] = f"bad token {TOKEN}"
        client.publish_test_results(summary, output_under(tmp_path))
        devops.fail_next("/events", [500, 500])
        assert client.task_started() is False  # a side call: logged, never raised
        devops.fail_next("/events", [503])
        seen.append(json.dumps(client.try_task_completed("succeeded")))
        devops.fail_next("/events", [404])
        with pytest.raises(CallbackRejected) as rejected:
            client.task_completed("succeeded")
        seen += [str(rejected.value), repr(rejected.value)]
        stale = devops.callback().model_copy(
            update={"auth_token": "another-token-the-server-refuses"}
        )
        wrong = DevOpsClient.from_callback(stale, sleep=Sleeps())
        with pytest.raises(CallbackRejected) as unauthorized:
            wrong.task_state()
        seen += [str(unauthorized.value), repr(unauthorized.value)]

    assert unauthorized.value.status == 401
    outputs = [caplog.text, *seen, *devops.feed_lines(), devops.log_text()]
    (run,) = devops.test_runs()
    outputs.append(str(run))
    for text in outputs:
        assert TOKEN not in text
        assert basic not in text
    assert "***" in devops.log_text() and any("***" in line for line in devops.feed_lines())


# -- the summary tab -----------------------------------------------------------------------------


def test_summary_markdown_lists_every_notebook_and_links_the_status_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from notebookops.devops.summary import summary_markdown

    monkeypatch.setenv("NOTEBOOKOPS_PUBLIC_URL", "https://nbops.example.net/")
    summary = _summary(tmp_path)
    summary["notebooks"][1]["error"]["evalue"] = "<script>alert(1)</script> | [x](javascript:y)"
    text = summary_markdown(summary)
    lines = text.splitlines()
    assert lines[0] == "### Notebooks: ❌ failed"
    rows = [line for line in lines if line.startswith("| nb/")]
    assert len(rows) == len(summary["notebooks"])
    broken = next(r for r in rows if r.startswith("| nb/broken.ipynb"))
    assert "| failed | 3.0 s | 3 |" in broken
    # Notebook text cannot open a tag, a link or a new table cell.
    assert "<script>" not in text and "\\<script\\>" in broken
    assert "\\|" in broken and "\\[x\\]\\(javascript:y\\)" in broken
    assert broken.count(" | ") == 4
    assert "| nb/flaky.ipynb | failed (allowed) |" in text
    assert text.rstrip().endswith(
        "[Status page with every notebook](https://nbops.example.net/api/runs/nbops-0123456789abcdef)"
    )


def test_summary_link_falls_back_to_the_function_app_host_name_or_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from notebookops.devops.summary import summary_markdown

    monkeypatch.delenv("NOTEBOOKOPS_PUBLIC_URL", raising=False)
    monkeypatch.setenv("WEBSITE_HOSTNAME", "nb-app.azurewebsites.net")
    assert "(https://nb-app.azurewebsites.net/api/runs/nbops-0123456789abcdef)" in (
        summary_markdown(_summary(tmp_path))
    )
    monkeypatch.delenv("WEBSITE_HOSTNAME")
    assert "Status page" not in summary_markdown(_summary(tmp_path / "again"))


# -- ActivityReport, run twice -------------------------------------------------------------------


def test_a_rerun_report_activity_posts_the_final_table_and_the_test_run_once(
    devops: FakeDevOps, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host runs activities at least once: the same publish payload twice (as after a crash
    before its completion was recorded) gives one table in the feed and log, one test run."""
    from notebookops import activities, sealing

    monkeypatch.setenv("NOTEBOOKOPS_SECRET_KEY", "test-key-material-for-sealing")
    monkeypatch.setenv("NOTEBOOKOPS_DEVOPS_RETRY_SECONDS", "0.01")
    callback = devops.callback()
    log_id = client_for(devops).ensure_log()
    payload = {
        "phase": "publish",
        "summary": _summary(tmp_path),
        "devops": callback.to_dict(mask_secrets=True),
        "auth": sealing.seal(TOKEN),
        "logId": log_id,
    }
    assert activities.report(payload) == {"published": True}
    assert activities.report(payload) == {"published": True}
    result_lines = [line for line in devops.feed_lines() if "result: failed" in line]
    assert len(result_lines) == 1
    assert devops.log_text().count("result: failed") == 1
    (run,) = devops.test_runs()
    assert len(run["results"]) == len(payload["summary"]["notebooks"])
    assert len(devops.summary_attachments()) == 1  # PUT replaces, never adds
