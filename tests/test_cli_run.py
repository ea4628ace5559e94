"""`python -m notebookops run` as a user runs it: resume after an interrupt, --rerun, what
is written when a run fails as a whole, and local portal links. Real git repositories and
real kernels; the command runs in a subprocess so signals hit it as they hit a user's."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

import pytest

from notebookops.local_run import Progress
from tests.gitrepos import file_url, make_repo, notebook

ROOT = Path(__file__).resolve().parent.parent

MARK = "open(f'{marks}/{name}-' + str(__import__('uuid').uuid4()), 'w').close()"


def _command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "notebookops", *map(str, args)]


def _env(tmp_path: Path) -> dict[str, str]:
    gitconfig = tmp_path / "gitconfig"
    gitconfig.write_text("")
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GIT_CONFIG_GLOBAL": str(gitconfig),
        "NOTEBOOKOPS_CHECKOUT_DIR": str(tmp_path / "checkouts"),
    }


def cli(tmp_path: Path, *args: str | Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        _command(*args),
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ran(marks: Path) -> list[str]:
    return sorted(p.name.split("-")[0] for p in marks.iterdir())


@pytest.fixture
def two_notebooks(tmp_path):
    """quick.ipynb finishes at once, later.ipynb only once the test creates `release` (so the
    run is still going when the test interrupts it, however late quick's end is seen on a
    loaded machine); each execution leaves a file in marks/, so the test counts how often
    each notebook really ran."""
    marks = tmp_path / "marks"
    marks.mkdir()
    release = tmp_path / "release"
    wait = (
        "import os, time\n"
        "deadline = time.time() + 120\n"
        f"while not os.path.exists({str(release)!r}) and time.time() < deadline:\n"
        "    time.sleep(0.05)"
    )
    repo = make_repo(
        tmp_path / "repo",
        {
            "nb/quick.ipynb": notebook(MARK, parameters={"marks": "", "name": "quick"}),
            "nb/later.ipynb": notebook(wait, MARK, parameters={"marks": "", "name": "later"}),
        },
    )
    body = tmp_path / "body.json"
    body.write_text(
        json.dumps(
            {
                "repository": {"url": file_url(repo), "ref": "main"},
                "notebooks": ["nb/quick.ipynb", "nb/later.ipynb"],
                "parameters": {"marks": str(marks)},
                "compute": {"backend": "local"},
            }
        )
    )
    return body, marks


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_after_first_notebook(tmp_path: Path, args: list, sig: int) -> str:
    """Start `run`, wait until quick.ipynb has succeeded, send ``sig``; the first line."""
    proc = subprocess.Popen(
        _command(*args),
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C reaches a command a person started; a shell's background job (a CI runner's,
        # say) inherits SIGINT ignored, and Python then keeps ignoring it.
        preexec_fn=_interruptible,
    )
    try:
        first = proc.stdout.readline()
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen.append(line)
            if "nb/quick.ipynb: succeeded" in line:
                break
            assert line, "".join(seen) + proc.stderr.read()
        else:
            pytest.fail("quick.ipynb never succeeded: " + "".join(seen))
        assert not any("nb/later.ipynb: succeeded" in line for line in seen)
        proc.send_signal(sig)
        code = proc.wait(timeout=60)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        (tmp_path / "release").touch()  # later.ipynb may end now
    if sig == signal.SIGINT:
        assert code == 130, "".join(seen) + proc.stdout.read() + stderr
        assert "run the same command again (same --state" in stderr
    else:
        assert code == -signal.SIGKILL
    return first


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_run_again_resumes_the_interrupted_run_and_never_reruns_a_notebook(
    tmp_path, two_notebooks, sig
):
    body, marks = two_notebooks
    state, out = tmp_path / "state", tmp_path / "out"
    args = ["run", body, "--state", state, "--out", out]
    first = _interrupt_after_first_notebook(tmp_path, args, sig)
    assert first.startswith("run ")

    resumed = cli(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    lines = resumed.stdout.splitlines()
    assert lines[0] == first.rstrip("\n")  # the same instance, not a new one
    assert "resuming" in lines[1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["result"] == "succeeded"
    assert {n["path"]: n["state"] for n in summary["notebooks"]} == {
        "nb/later.ipynb": "succeeded",
        "nb/quick.ipynb": "succeeded",
    }
    assert _ran(marks) == ["later", "quick"]  # each notebook executed exactly once

    # Finished: shown again, not re-run.
    (out / "summary.json").unlink()
    again = cli(tmp_path, *args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == first.rstrip("\n")
    assert "already finished (succeeded); shown again, not re-run" in again.stdout
    assert json.loads((out / "summary.json").read_text())["result"] == "succeeded"
    assert _ran(marks) == ["later", "quick"]

    if sig == signal.SIGKILL:  # once is enough for --rerun: it is the same code after that
        rerun = cli(tmp_path, *args, "--rerun")
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "runs again" in rerun.stdout
        assert _ran(marks) == ["later", "later", "quick", "quick"]


@pytest.mark.slow
def test_portal_url_is_the_run_folder_under_state_and_null_without_state(tmp_path):
    repo = make_repo(tmp_path / "repo", {"a.ipynb": notebook("print('ok')")})
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"repository": {"url": file_url(repo)}, "notebooks": ["a.ipynb"]}))
    state = tmp_path / "state"
    kept = cli(tmp_path, "run", body, "--state", state, "--out", tmp_path / "kept")
    assert kept.returncode == 0, kept.stderr
    (notebook_result,) = json.loads((tmp_path / "kept" / "summary.json").read_text())["notebooks"]
    folder = Path(notebook_result["portalUrl"])
    assert folder.parent == state.resolve() / "runs" and folder.is_dir()
    assert notebook_result["runId"] == folder.name

    temporary = cli(tmp_path, "run", body, "--out", tmp_path / "temp")
    assert temporary.returncode == 0, temporary.stderr
    (notebook_result,) = json.loads((tmp_path / "temp" / "summary.json").read_text())["notebooks"]
    assert notebook_result["portalUrl"] is None


@pytest.mark.slow
def test_invalid_request_still_writes_a_summary_and_one_junit_testcase(tmp_path):
    body = tmp_path / "body.json"
    commit = "a" * 40
    body.write_text(
        json.dumps(
            {
                "repository": {"url": "https://host.example:99999/r", "commit": commit},
                "notebooks": ["nb/a.ipynb", {"path": "nb/b.ipynb", "timeoutMinutes": "5"}],
            }
        )
    )
    result = cli(tmp_path, "run", body, "--out", tmp_path / "out")
    assert result.returncode == 2
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["result"] == "failed" and summary["commit"] == commit
    assert [n["path"] for n in summary["notebooks"]] == ["nb/a.ipynb", "nb/b.ipynb"]
    assert all(n["message"] == "not run: the request is invalid" for n in summary["notebooks"])
    assert len(summary["errors"]) == 2
    suite = ET.parse(tmp_path / "out" / "junit.xml").getroot().find("testsuite")
    (request_case,) = [c for c in suite.iter("testcase") if c.find("error") is not None]
    text = request_case.find("error").text
    assert "repository.url: must have a port from 1 to 65535" in text
    assert "notebooks[1].timeoutMinutes" in text


def test_progress_prints_the_last_notebook_before_reporting():
    stream = io.StringIO()
    progress = Progress(stream, started=0.0)
    running = {
        "phase": "running",
        "commit": "abc",
        "notebooks": [{"path": "a", "state": "running"}],
    }
    progress.update(running)
    progress.update(
        {**running, "phase": "reporting", "notebooks": [{"path": "a", "state": "failed"}]}
    )
    lines = [line.split("] ", 1)[1] for line in stream.getvalue().splitlines()]
    assert lines == ["commit abc, 1 notebook(s)", "a: running", "a: failed", "reporting..."]


@pytest.mark.slow
def test_a_failed_clone_keeps_the_commit_and_the_notebooks_the_message_named(tmp_path):
    # A missing notebook fails alone now; a commit the repository lacks fails the clone.
    repo = make_repo(tmp_path / "repo", {"a.ipynb": notebook("print('ok')")})
    commit = "1" * 40
    body = tmp_path / "body.json"
    body.write_text(
        json.dumps(
            {
                "repository": {"url": file_url(repo), "commit": commit},
                "notebooks": ["a.ipynb", "missing.ipynb"],
            }
        )
    )
    result = cli(tmp_path, "run", body, "--out", tmp_path / "out")
    assert result.returncode == 1, result.stdout + result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["commit"] == commit and summary["errors"]
    assert [n["path"] for n in summary["notebooks"]] == ["a.ipynb", "missing.ipynb"]
    assert summary["counts"]["total"] == summary["counts"]["canceled"] == 2
    assert "missing.ipynb" in result.stdout and f"commit {commit[:12]}" in result.stdout


@pytest.mark.slow
def test_unknown_parameters_warn_and_fail_the_notebook_when_strict(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    repo = make_repo(
        tmp_path / "repo",
        {"p.ipynb": notebook(MARK, parameters={"marks": "", "name": "p", "alpha": 0.1})},
    )
    message = {
        "repository": {"url": file_url(repo)},
        "notebooks": [{"path": "p.ipynb", "parameters": {"alpah": 2}}],
        "parameters": {"marks": str(marks), "name": "p"},
    }
    body = tmp_path / "body.json"
    body.write_text(json.dumps(message))
    lenient = cli(tmp_path, "run", body, "--out", tmp_path / "lenient")
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    (result,) = json.loads((tmp_path / "lenient" / "summary.json").read_text())["notebooks"]
    assert result["state"] == "succeeded"
    (warning,) = result["warnings"]
    assert warning.startswith("unknown parameter alpah: not assigned in the notebook's parameters")
    assert f"warning: p.ipynb: {warning}" in lenient.stdout
    assert _ran(marks) == ["p"]

    body.write_text(json.dumps(message | {"strictParameters": True}))
    strict = cli(tmp_path, "run", body, "--out", tmp_path / "strict")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    (result,) = json.loads((tmp_path / "strict" / "summary.json").read_text())["notebooks"]
    assert result["state"] == "failed"
    assert result["error"]["ename"] == "UnknownParameter"
    assert "alpah" in result["error"]["evalue"] and "alpah" in strict.stdout
    assert _ran(marks) == ["p"]  # refused before it ran


@pytest.mark.slow
def test_one_failing_cell_has_one_number_in_every_text_a_person_reads(tmp_path):
    """Markdown and a parameters cell before the failure: its place in the committed file
    (cellIndex 3) and Jupyter's execution count (In [3] counts papermill's injected cell
    and skips markdown, so it is not 3 here) must not be mixed up."""
    from nbformat import v4

    nb = notebook("x = 1", "raise ValueError('bad')", parameters={"alpha": 1})
    nb.cells.insert(0, v4.new_markdown_cell("# intro"))
    repo = make_repo(tmp_path / "repo", {"f.ipynb": nb})
    body = tmp_path / "body.json"
    body.write_text(
        json.dumps(
            {
                "repository": {"url": file_url(repo)},
                "notebooks": [{"path": "f.ipynb", "parameters": {"alpha": 2}}],
            }
        )
    )
    result = cli(tmp_path, "run", body, "--out", tmp_path / "out")
    assert result.returncode == 1, result.stdout + result.stderr
    (failed,) = json.loads((tmp_path / "out" / "summary.json").read_text())["notebooks"]
    assert failed["error"]["cellIndex"] == 3
    assert "ValueError: bad (cell 3)" in result.stdout
    junit = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    assert junit.find("testsuite/testcase/failure").get("message") == "ValueError: bad (cell 3)"
    traceback = failed["error"]["traceback"]
    assert "In[" in traceback and "In[3]" not in traceback  # the execution count, as Jupyter's


@pytest.mark.slow
def test_every_end_of_a_burst_of_short_notebooks_is_seen_when_it_happens(tmp_path):
    """Ten one-line notebooks on two workers send twenty events within a second or two, more
    than the orchestration keeps waits open for: each end is still seen within seconds of the
    runner's verdict, not at the 15 s safety poll, and the progress says `cloning...` once."""
    files = {f"nb/t{i}.ipynb": notebook(f"x = {i}") for i in range(10)}
    repo = make_repo(tmp_path / "repo", files)
    body = tmp_path / "body.json"
    body.write_text(
        json.dumps({"repository": {"url": file_url(repo)}, "notebooks": ["nb/*.ipynb"]})
    )
    state = tmp_path / "state"
    result = cli(
        tmp_path, "run", body, "--state", state, "--out", tmp_path / "out", "--workers", "2"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["counts"]["succeeded"] == 10
    ended = max(
        datetime.fromisoformat(json.loads(p.read_text())["endedAt"].replace("Z", "+00:00"))
        for p in (state / "runs").glob("*/state.json")
    )
    finished = datetime.fromisoformat(summary["finishedAt"].replace("Z", "+00:00"))
    assert (finished - ended).total_seconds() < 10, result.stdout
    assert result.stdout.count("cloning...") == 1, result.stdout
