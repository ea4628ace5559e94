"""End to end with real kernels: the real app on devhost, real git repositories, the local
papermill backend, and the command line a user runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

from tests.devhost_support import http
from tests.flow_support import app_host, deliver, file_url, make_repo, message, notebook

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "notebookops", *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def repo(tmp_path):
    return make_repo(
        tmp_path / "repo",
        {
            "nb/pass.ipynb": notebook("import time\ntime.sleep(0.5)", "print('passed ok')"),
            "nb/params.ipynb": notebook(
                "print(repr(alpha), repr(name), repr(items))",
                parameters={"alpha": 0.1, "name": "default", "items": []},
            ),
            "nb/fail.ipynb": notebook(
                "x = 1", "raise RuntimeError('broken on purpose')", "print('no')"
            ),
            "nb/slow.ipynb": notebook("import time\ntime.sleep(120)"),
            "nb/loop.ipynb": notebook(
                "print('before the loop')", "x = 0", "while True:\n    x += 1"
            ),
            "nb/data.csv": "a,b\n1,2\n",
            "nb/reads.ipynb": notebook("print(open('data.csv').read().splitlines()[1])"),
        },
    )


def test_cli_run_writes_summary_junit_and_executed_notebooks(tmp_path, repo):
    body = message(
        repo,
        [
            "nb/pass.ipynb",
            {"path": "nb/params.ipynb", "parameters": {"alpha": 0.5, "items": ["x", "y'z\n"]}},
            {"path": "nb/fail.ipynb", "allowFailure": True},
            "nb/reads.ipynb",
        ],
        parameters={"name": "global"},
    )
    (tmp_path / "body.json").write_text(json.dumps(body))
    out = tmp_path / "out"
    result = cli("run", str(tmp_path / "body.json"), "--out", str(out), "--workers", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nb/pass.ipynb: succeeded" in result.stdout  # live progress lines
    assert "result: succeededWithIssues" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    states = {n["path"]: n["state"] for n in summary["notebooks"]}
    assert states == {
        "nb/fail.ipynb": "failed",
        "nb/params.ipynb": "succeeded",
        "nb/pass.ipynb": "succeeded",
        "nb/reads.ipynb": "succeeded",
    }
    failed = next(n for n in summary["notebooks"] if n["path"] == "nb/fail.ipynb")
    assert failed["error"]["cellIndex"] == 1
    assert failed["error"]["ename"] == "RuntimeError"
    assert failed["error"]["evalue"] == "broken on purpose"
    assert "\x1b[" not in failed["error"]["traceback"]
    assert failed["outputNotebook"] == "notebooks/nb/fail.ipynb"
    # Executed copies: parameters injected with their types, sibling files readable.
    params_nb = nbformat.read(out / "notebooks/nb/params.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in params_nb.cells for o in c.get("outputs", []))
    assert "0.5 'global' ['x', \"y'z\\n\"]" in printed
    reads_nb = nbformat.read(out / "notebooks/nb/reads.ipynb", as_version=4)
    assert "1,2" in "".join(o.get("text", "") for c in reads_nb.cells for o in c.get("outputs", []))
    junit = ET.parse(out / "junit.xml").getroot()
    cases = {c.get("file"): c for c in junit.iter("testcase")}
    failure = cases["nb/fail.ipynb"].find("failure")
    assert failure.get("message") == "RuntimeError: broken on purpose (cell 1)"
    assert "broken on purpose" in failure.text
    assert cases["nb/pass.ipynb"].find("failure") is None


def test_cli_exit_codes_for_failure_and_invalid_request(tmp_path, repo):
    (tmp_path / "bad.json").write_text(json.dumps(message(repo, ["nb/fail.ipynb"])))
    result = cli("run", str(tmp_path / "bad.json"), "--out", str(tmp_path / "o1"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "RuntimeError: broken on purpose (cell 1)" in result.stdout
    (tmp_path / "invalid.json").write_text(json.dumps({"notebooks": ["/abs.ipynb"]}))
    result = cli("run", str(tmp_path / "invalid.json"), "--out", str(tmp_path / "o2"))
    assert result.returncode == 2
    assert "repository" in result.stderr and "notebooks[0]" in result.stderr


def test_a_loop_that_never_ends_names_the_limit_and_the_cell_and_keeps_the_notebook(tmp_path, repo):
    body = message(repo, ["nb/pass.ipynb", {"path": "nb/loop.ipynb", "timeoutMinutes": 0.1}])
    (tmp_path / "body.json").write_text(json.dumps(body))
    started = time.monotonic()
    result = cli("run", str(tmp_path / "body.json"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert time.monotonic() - started < 90  # the loop never ends by itself
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    loop = next(n for n in summary["notebooks"] if n["path"] == "nb/loop.ipynb")
    assert loop["state"] == "timedOut"
    # The runner's own limit fired (the orchestrator waits a grace longer), naming the cell.
    assert loop["message"] == "timeoutMinutes 0.1 reached in cell 2"
    assert (loop["error"]["ename"], loop["error"]["cellIndex"]) == ("TimeoutError", 2)
    assert 6 <= loop["durationSeconds"] < 30
    assert "TimeoutError: timeoutMinutes 0.1 reached (cell 2)" in result.stdout
    partial = nbformat.read(tmp_path / "out/notebooks/nb/loop.ipynb", as_version=4)
    assert partial.cells[0].outputs[0]["text"] == "before the loop\n"


def test_notebooks_queued_behind_slow_ones_run_and_get_real_verdicts(tmp_path):
    """Two workers, the default maxParallel (20), six 8-second notebooks with a 15-second
    limit each: whatever order the runs take the workers in, the last ones wait longer than
    their limit, and still run to their own verdicts instead of timing out in the queue."""
    sleep = "import time\ntime.sleep(8)"
    files = {f"nb/n{i}.ipynb": notebook(sleep, "print('done')") for i in range(5)}
    files["nb/n5.ipynb"] = notebook(sleep, "raise ValueError('a real failure')")
    repo = make_repo(tmp_path / "repo", files)
    body = message(repo, [{"path": path, "timeoutMinutes": 0.25} for path in sorted(files)])
    (tmp_path / "body.json").write_text(json.dumps(body))
    result = cli(
        "run", str(tmp_path / "body.json"), "--out", str(tmp_path / "out"), "--workers", "2"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((tmp_path / "out/summary.json").read_text())
    states = {n["path"]: n["state"] for n in summary["notebooks"]}
    assert states == {**{p: "succeeded" for p in files}, "nb/n5.ipynb": "failed"}, summary
    failed = summary["notebooks"][5]
    assert (failed["error"]["ename"], failed["error"]["cellIndex"]) == ("ValueError", 1)
    waited = [n for n in summary["notebooks"] if n["queuedSeconds"] > 15]
    assert len(waited) >= 2, summary  # the third pair waited for two pairs of 8 s each
    for nb in summary["notebooks"]:
        assert 8 <= nb["durationSeconds"] < 15, nb  # execution only, inside the limit


def test_fail_fast_cancels_a_running_notebook(tmp_path, repo, flow_env):
    body = message(
        repo, ["nb/fail.ipynb", "nb/slow.ipynb"], failFast=True, compute={"backend": "local"}
    )
    started = time.monotonic()
    with app_host(flow_env / "state", clock="real") as host:
        status = host.wait_for(deliver(host, body), 120)
    summary = status["output"]
    assert {n["path"]: n["state"] for n in summary["notebooks"]} == {
        "nb/fail.ipynb": "failed",
        "nb/slow.ipynb": "canceled",
    }
    assert time.monotonic() - started < 60


def test_host_killed_mid_run_resumes_without_rerunning_finished_notebooks(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    cell = "open(f'{marks}/{name}-' + str(__import__('uuid').uuid4()), 'w').close()"
    files = {
        "nb/quick.ipynb": notebook(cell, parameters={"marks": "", "name": "quick"}),
        "nb/later.ipynb": notebook(
            "import time\ntime.sleep(6)", cell, parameters={"marks": "", "name": "later"}
        ),
    }
    repo = make_repo(tmp_path / "repo", files)
    body = {
        "repository": {"url": file_url(repo), "ref": "main"},
        "notebooks": ["nb/quick.ipynb", "nb/later.ipynb"],
        "parameters": {"marks": str(marks)},
        "compute": {"backend": "local"},
    }
    state = tmp_path / "state"

    def serve() -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "notebookops", "serve", "--port", "0"),
                *("--state", str(state), "--allow-local-repos"),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = proc.stdout.readline()
        assert line.startswith("devhost listening on "), line
        return proc, line.split()[-1]

    proc, base = serve()
    try:
        code, _, _ = http(
            "POST",
            f"{base}/admin/functions/ServiceBusStarter",
            {"input": json.dumps(body), "messageId": "kill-test"},
        )
        assert code == 202
        instances = f"{base}/runtime/webhooks/durabletask/instances/"
        deadline = time.monotonic() + 90
        while True:  # wait until the quick notebook is recorded as succeeded
            _, listing, _ = http("GET", instances)
            custom = (listing[0].get("customStatus") or {}) if listing else {}
            states = {n["path"]: n["state"] for n in custom.get("notebooks", [])}
            if states.get("nb/quick.ipynb") == "succeeded":
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.2)
        assert states["nb/later.ipynb"] != "succeeded"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    instance_id = listing[0]["instanceId"]
    proc, base = serve()
    try:
        deadline = time.monotonic() + 120
        while True:
            code, status, _ = http(
                "GET", f"{base}/runtime/webhooks/durabletask/instances/{instance_id}"
            )
            if code == 200:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert status["output"]["result"] == "succeeded", status["output"]
    ran = sorted(p.name.split("-")[0] for p in marks.iterdir())
    assert ran == ["later", "quick"]  # each notebook executed exactly once


def test_cli_run_reports_to_a_loopback_pipeline(tmp_path, repo):
    """`run --properties` pointing at the fake Azure DevOps (the real one cannot be reached):
    the fake's record shows the feed, the job log, the test run and one TaskCompleted."""
    from tests.fake_devops import FakeDevOps

    with FakeDevOps(token="cli-token-7f3K") as devops:
        body = message(
            repo,
            ["nb/pass.ipynb", {"path": "nb/fail.ipynb", "allowFailure": True}],
            devops={"buildId": "77"},
        )
        (tmp_path / "body.json").write_text(json.dumps(body))
        (tmp_path / "props.json").write_text(json.dumps(devops.properties()))
        result = cli(
            "run",
            str(tmp_path / "body.json"),
            "--properties",
            str(tmp_path / "props.json"),
            "--out",
            str(tmp_path / "out"),
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert [e["result"] for e in devops.task_completed_events()] == ["succeededWithIssues"]
        feed = "\n".join(devops.feed_lines())
        assert "finished nb/fail.ipynb: failed" in feed and "(cell 1)" in feed
        assert "result: succeededWithIssues" in devops.log_text()
        (test_run,) = devops.test_runs()
        assert sorted(r["outcome"] for r in test_run["results"]) == ["Failed", "Passed"]
        assert all(r["attachments"] for r in test_run["results"])
    outputs = result.stdout + result.stderr + (tmp_path / "out/summary.json").read_text()
    assert "cli-token-7f3K" not in outputs


def test_whole_run_timeout_stops_real_kernels(tmp_path, repo, flow_env):
    # 30 s: both notebooks must have started by then even on a loaded machine; a notebook
    # still queued at the deadline would (rightly) end canceled, not timedOut.
    body = message(
        repo, ["nb/pass.ipynb", "nb/slow.ipynb"], timeoutMinutes=0.5, compute={"backend": "local"}
    )
    started = time.monotonic()
    with app_host(flow_env / "state", clock="real") as host:
        status = host.wait_for(deliver(host, body), 120)
    summary = status["output"]
    assert {n["path"]: n["state"] for n in summary["notebooks"]} == {
        "nb/pass.ipynb": "succeeded",
        "nb/slow.ipynb": "timedOut",
    }
    slow = summary["notebooks"][1]
    # Named from the partial notebook the stopped run left behind.
    assert slow["message"] == "the run's timeoutMinutes 0.5 reached in cell 0"
    assert slow["outputNotebook"]
    assert summary["result"] == "failed"
    assert time.monotonic() - started < 100  # not the notebook's 120 s


def test_duplicate_delivery_runs_each_notebook_once(tmp_path, flow_env):
    from tests.fake_devops import FakeDevOps

    marks = tmp_path / "marks"
    marks.mkdir()
    cell = "open(f'{marks}/' + str(__import__('uuid').uuid4()), 'w').close()"
    repo = make_repo(tmp_path / "dup", {"nb/once.ipynb": notebook(cell, parameters={"marks": ""})})
    body = message(
        repo, ["nb/once.ipynb"], parameters={"marks": str(marks)}, compute={"backend": "local"}
    )
    with FakeDevOps() as devops, app_host(flow_env / "state", clock="real") as host:
        first = deliver(host, body, properties=devops.properties(), message_id="a")
        second = deliver(host, body, properties=devops.properties(), message_id="b")
        assert first == second
        assert host.wait_for(first, 120)["output"]["result"] == "succeeded"
        assert len(devops.task_completed_events()) == 1
    assert len(list(marks.iterdir())) == 1
