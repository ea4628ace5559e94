"""The backend contract, the registry, and the local backend on real notebooks and kernels."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nbformat
import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from notebookops.compute import (
    PermanentBackendError,
    PollPolicy,
    RunError,
    RunHandle,
    RunNotFinishedError,
    RunSpec,
    RunStatus,
    get_backend,
    register_backend,
    registry,
    run_key,
)
from notebookops.compute.base import parse_iso
from notebookops.compute.local import LocalBackend
from notebookops.compute.local_state import RunFiles, read_json

# -- contract --------------------------------------------------------------------------------


@given(st.text(min_size=1), st.text(min_size=1))
def test_run_key_is_a_safe_deterministic_name(instance_id, notebook):
    key = run_key(instance_id, notebook)
    assert re.fullmatch(r"[a-z][a-z0-9_-]{0,63}", key), key
    assert key == run_key(instance_id, notebook)


@given(st.text(min_size=1), st.text(min_size=1), st.text(min_size=1))
def test_run_key_differs_for_different_notebooks_or_instances(instance_id, a, b):
    if a != b:
        assert run_key(instance_id, a) != run_key(instance_id, b)
        assert run_key(a, "nb/x.ipynb") != run_key(b, "nb/x.ipynb")


def test_run_key_is_readable_and_keeps_the_file_name():
    key = run_key("abc123", "notebooks/Smoke Tests/Train Model.ipynb")
    assert key.startswith("nb-notebooks-smoke-tests-train-model-")
    long_key = run_key("i", "a/" * 80 + "final_report.ipynb")
    assert len(long_key) <= 64 and "final-report" in long_key
    with pytest.raises(ValueError, match="notebook_path"):
        run_key("i", "")


def test_contract_types_round_trip_through_json():
    spec = RunSpec(
        run_key="nb-x-1",
        instance_id="inst",
        notebook="nb/x.ipynb",
        checkout="/co",
        commit="abc",
        parameters={"alpha": 0.5},
        timeout_seconds=30,
        compute={"backend": "local"},
        tags={"k": "v"},
    )
    status = RunStatus(
        "failed",
        "Failed",
        RunError(2, "KeyError", "'id'", "tb"),
        "2026-01-01T00:00:00Z",
        None,
        "m",
    )
    handle = RunHandle("local", "nb-x-1", None, {"runDir": "/r"})
    for value in (spec, status, handle, PollPolicy(1, 2, 10)):
        assert type(value).from_dict(json.loads(json.dumps(value.to_dict()))) == value
    assert status.terminal and not RunStatus("running", "Running").terminal
    assert status.to_dict()["error"] == {
        "cellIndex": 2,
        "ename": "KeyError",
        "evalue": "'id'",
        "traceback": "tb",
    }


def test_bad_contract_input_names_the_field_and_value():
    with pytest.raises(ValueError, match=r"'notebook' has invalid value 5"):
        RunSpec.from_dict({"runKey": "k", "instanceId": "i", "notebook": 5})
    with pytest.raises(ValueError, match=r"missing field 'commit'"):
        RunSpec.from_dict({"runKey": "k", "instanceId": "i", "notebook": "n", "checkout": "/c"})
    with pytest.raises(ValueError, match=r"'state' has invalid value 'done'"):
        RunStatus("done", "done")
    # A time without an offset would shift a deadline by the host's UTC offset: refused.
    with pytest.raises(ValueError, match=r"'startedAt' has invalid value '2026-01-01T00:00:00'"):
        RunStatus("running", "Running", started_at="2026-01-01T00:00:00")
    with pytest.raises(ValueError, match=r"'endedAt' has invalid value 'yesterday'"):
        RunStatus.from_dict({"state": "failed", "rawStatus": "Failed", "endedAt": "yesterday"})


def test_status_times_parse_as_utc_whatever_the_offset_or_precision():
    from datetime import UTC, datetime

    from notebookops.compute.base import parse_iso

    expected = datetime(2026, 1, 31, 12, 0, 5, 476926, tzinfo=UTC)
    # Azure ML v1 gives 7 fractional digits, v2 an offset, the local backend milliseconds.
    assert parse_iso("2026-01-31T12:00:05.4769265Z") == expected
    assert parse_iso("2026-01-31T14:00:05.476926+02:00") == expected
    assert parse_iso("2026-01-31T12:00:05.123Z") == expected.replace(microsecond=123000)
    assert parse_iso("2026-01-31T12:00:05") is None and parse_iso("soon") is None


def test_poll_policy_backs_off_up_to_its_cap():
    policy = PollPolicy(1.0, 2.0, 10.0)
    assert [policy.interval(n) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.interval(10_000) == 10.0


# -- registry --------------------------------------------------------------------------------


@pytest.fixture
def isolated_registry(monkeypatch):
    monkeypatch.setattr(registry, "_factories", dict(registry._factories))


def test_unknown_and_unimportable_backends_are_permanent_errors_naming_the_choices(
    isolated_registry,
):
    with pytest.raises(PermanentBackendError, match=r"'nope'.*azureml, azureml-v1, local"):
        get_backend("nope")
    register_backend("ghost", "notebookops.compute.no_such_module:Ghost")
    with pytest.raises(PermanentBackendError, match=r"'ghost' is not available.*known backends"):
        get_backend("ghost")


def test_registered_factory_and_default_name(monkeypatch, isolated_registry):
    register_backend("fake-for-test", lambda: "an instance")
    assert get_backend("fake-for-test") == "an instance"
    monkeypatch.setenv("NOTEBOOKOPS_DEFAULT_BACKEND", "fake-for-test")
    assert get_backend() == "an instance"
    monkeypatch.delenv("NOTEBOOKOPS_DEFAULT_BACKEND")
    monkeypatch.delenv("NOTEBOOKOPS_ALLOW_LOCAL_BACKEND", raising=False)
    with pytest.raises(PermanentBackendError, match="NOTEBOOKOPS_ALLOW_LOCAL_BACKEND=1"):
        get_backend()  # the default is local, which is off unless enabled


def test_importing_the_registry_imports_no_azure_sdk_nor_papermill():
    code = (
        "import sys, notebookops.compute, notebookops.compute.local;"
        "heavy = ('azure', 'papermill', 'jupyter_client');"
        "heavy = [m for m in sys.modules if m.startswith(heavy)];"
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "[]"


# -- local backend ---------------------------------------------------------------------------

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def write_notebook(path: Path, *sources: str, params: str | None = None, markdown: bool = False):
    cells = [new_markdown_cell("# a notebook")] if markdown else []
    if params is not None:
        cell = new_code_cell(params)
        cell.metadata["tags"] = ["parameters"]
        cells.append(cell)
    cells += [new_code_cell(source) for source in sources]
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": KERNELSPEC}), path)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / ".git").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


@pytest.fixture
def runs_dir(tmp_path: Path, monkeypatch) -> Path:
    runs = tmp_path / "runs"
    monkeypatch.setenv("NOTEBOOKOPS_ALLOW_LOCAL_BACKEND", "1")
    monkeypatch.setenv("NOTEBOOKOPS_LOCAL_RUNS_DIR", str(runs))
    monkeypatch.setenv("NOTEBOOKOPS_LOCAL_WORKERS", "2")
    yield runs
    # A failed test must not leave detached runners and kernels behind.
    for run_dir in runs.glob("nb-*"):
        RunFiles(run_dir).kill_kernel_group()
        RunFiles(run_dir).kill_runner_group()


def make_spec(checkout: Path, notebook: str, **kw) -> RunSpec:
    instance = kw.pop("instance_id", "inst-1")
    return RunSpec(
        run_key=run_key(instance, notebook),
        instance_id=instance,
        notebook=notebook,
        checkout=str(checkout),
        commit="0123abc",
        compute={"backend": "local"},
        **kw,
    )


def finish(backend, handle, timeout: float = 90.0) -> RunStatus:
    return wait_for(
        lambda: (s := backend.status(handle)).terminal and s, timeout, f"{handle.run_id} to end"
    )


@pytest.mark.slow
def test_passing_notebook_gets_typed_parameters_and_runs_in_its_own_folder(
    checkout, runs_dir, tmp_path
):
    (checkout / "nb" / "data.csv").parent.mkdir(parents=True)
    (checkout / "nb" / "data.csv").write_text("x\n41\n")
    write_notebook(
        checkout / "nb" / "good.ipynb",
        "import json, os\nvalue = int(open('data.csv').read().split()[1]) + 1\n"
        "open('written-by-run.txt', 'w').write('scratch')\n"
        "print(json.dumps({'value': value, 'types': [type(v).__name__ for v in "
        "(count, ratio, name, items, config)], 'name': name, 'items': items, 'config': config,"
        " 'git': os.path.exists('../.git')}))",
        params="count = 0\nratio = 0.0\nname = ''\nitems = []\nconfig = {}",
        markdown=True,
    )
    before = tree_digest(checkout)
    backend = get_backend("local")
    params = {
        "count": 3,
        "ratio": 0.25,
        "name": 'it\'s "quoted"',
        "items": [1, "two", None],
        "config": {"nested": {"ok": True}},
    }
    handle = backend.submit(make_spec(checkout, "nb/good.ipynb", parameters=params))
    assert handle.backend == "local" and handle.portal_url.startswith("file://")

    status = finish(backend, handle)
    assert status.state == "succeeded", status
    assert status.error is None and status.started_at and status.ended_at
    (tmp_path / "fetched").mkdir()
    out = backend.fetch_output(handle, tmp_path / "fetched")  # into a folder: keeps the name
    assert out == tmp_path / "fetched" / "good.ipynb"
    printed = json.loads(nbformat.read(out, as_version=4).cells[-1].outputs[0].text)
    assert printed == {
        "value": 42,
        "types": ["int", "float", "str", "list", "dict"],
        "name": params["name"],
        "items": params["items"],
        "config": params["config"],
        "git": False,
    }
    assert tree_digest(checkout) == before  # the run wrote only into its own copy


@pytest.mark.slow
def test_failing_notebook_reports_the_cell_and_keeps_the_output(checkout, runs_dir, tmp_path):
    write_notebook(
        checkout / "bad.ipynb",
        "x = 1",
        "def f():\n    return 1 / 0\nf()",
        "print('never runs')",
        params="alpha = 1",
        markdown=True,
    )
    backend = get_backend("local")
    handle = backend.submit(make_spec(checkout, "bad.ipynb", parameters={"alpha": 2}))
    status = finish(backend, handle)
    assert status.state == "failed"
    # Committed cells: 0 markdown, 1 parameters, 2 `x = 1`, 3 the failing one.
    assert status.error.cell_index == 3
    assert (status.error.ename, status.error.evalue) == ("ZeroDivisionError", "division by zero")
    assert "\x1b" not in status.error.traceback
    assert "return 1 / 0" in status.error.traceback
    assert "ZeroDivisionError" in status.message
    out = backend.fetch_output(handle, tmp_path / "out.ipynb")
    executed = nbformat.read(out, as_version=4)
    assert executed.metadata.papermill.exception is True
    assert not executed.cells[-1].outputs  # stopped at the failing cell


@pytest.mark.slow
def test_timeout_kills_the_kernel_group_and_keeps_the_partial_notebook(
    checkout, runs_dir, tmp_path
):
    pids = tmp_path / "pids.txt"
    write_notebook(
        checkout / "slow.ipynb",
        "print('first cell done')",
        "import os, subprocess, time\n"
        "child = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "time.sleep(300)",
    )
    backend = get_backend("local")
    # The clock starts once the kernel is ready and the run holds a worker slot.
    handle = backend.submit(make_spec(checkout, "slow.ipynb", timeout_seconds=6))
    status = finish(backend, handle, timeout=60)
    assert status.state == "timedOut", status
    assert status.error.ename == "TimeoutError" and status.error.cell_index == 1
    assert status.message == "timeoutMinutes 0.1 reached in cell 1"
    kernel_pid, child_pid = map(int, pids.read_text().split())
    wait_for(lambda: gone(kernel_pid) and gone(child_pid), 10, "kernel and its child to die")
    out = nbformat.read(backend.fetch_output(handle, tmp_path / "o.ipynb"), as_version=4)
    assert out.cells[0].outputs[0].text == "first cell done\n"


@pytest.mark.slow
def test_cancel_stops_a_running_notebook_and_is_idempotent(checkout, runs_dir, tmp_path):
    started = tmp_path / "started"
    write_notebook(
        checkout / "long.ipynb",
        f"import os, time\nopen({str(started)!r}, 'w').write(str(os.getpid()))\ntime.sleep(300)",
    )
    backend = get_backend("local")
    handle = backend.submit(make_spec(checkout, "long.ipynb"))
    wait_for(lambda: started.exists() and started.read_text(), 60, "the notebook to start")
    kernel_pid = int(started.read_text())
    runner_pid = RunFiles(Path(handle.data["runDir"])).runner_pid()
    assert backend.status(handle).state == "running"

    backend.cancel(handle)
    status = backend.status(handle)
    assert status.state == "canceled" and status.ended_at
    # SIGKILL is delivered asynchronously; give the processes a moment to disappear.
    wait_for(lambda: gone(kernel_pid) and gone(runner_pid), 10, "runner and kernel to die")
    backend.cancel(handle)  # no-op on a finished run
    assert backend.status(handle).state == "canceled"


@pytest.mark.slow
def test_submit_is_idempotent_even_when_concurrent(checkout, runs_dir, tmp_path):
    counter = tmp_path / "executions.txt"
    write_notebook(checkout / "once.ipynb", f"open({str(counter)!r}, 'a').write('ran\\n')")
    spec = make_spec(checkout, "once.ipynb")
    backend = get_backend("local")
    handles: list[RunHandle] = []
    barrier = threading.Barrier(2)

    def submit():
        barrier.wait()
        handles.append(get_backend("local").submit(spec))

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(handles) == 2 and handles[0] == handles[1]
    assert finish(backend, handles[0]).state == "succeeded"
    assert backend.submit(spec) == handles[0]  # after the end, still the same run
    assert counter.read_text() == "ran\n"


@pytest.mark.slow
def test_worker_limit_runs_notebooks_one_at_a_time(checkout, runs_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NOTEBOOKOPS_LOCAL_WORKERS", "1")
    log = tmp_path / "times.txt"
    write_notebook(
        checkout / "timed.ipynb",
        f"import time\nstart = time.time()\ntime.sleep(0.5)\n"
        f"open({str(log)!r}, 'a').write(f'{{start}} {{time.time()}}\\n')",
    )
    backend = get_backend("local")
    handles = [
        backend.submit(make_spec(checkout, "timed.ipynb", instance_id=f"inst-{i}"))
        for i in range(2)
    ]
    assert [finish(backend, h).state for h in handles] == ["succeeded", "succeeded"]
    (_, end_first), (start_second, _) = sorted(
        tuple(map(float, line.split())) for line in log.read_text().splitlines()
    )
    assert end_first <= start_second, "two notebooks ran at once with NOTEBOOKOPS_LOCAL_WORKERS=1"


@pytest.mark.slow
def test_a_run_waiting_for_a_worker_is_queued_and_its_limit_starts_when_it_runs(
    checkout, runs_dir, tmp_path, monkeypatch
):
    """One worker, held by a notebook until the test releases it: the next one waits longer
    than its own 3-second limit, reported `queued` with no start time, then runs to a real
    verdict."""
    monkeypatch.setenv("NOTEBOOKOPS_LOCAL_WORKERS", "1")
    started, release = tmp_path / "started", tmp_path / "release"
    write_notebook(
        checkout / "ahead.ipynb",
        f"import os, time\nopen({str(started)!r}, 'w').close()\n"
        f"while not os.path.exists({str(release)!r}):\n    time.sleep(0.05)",
    )
    write_notebook(checkout / "behind.ipynb", "x = 1", "raise KeyError('real verdict')")
    backend = get_backend("local")
    ahead = backend.submit(make_spec(checkout, "ahead.ipynb"))
    wait_for(started.exists, 60, "the first notebook to start")
    behind = backend.submit(make_spec(checkout, "behind.ipynb", timeout_seconds=3))
    time.sleep(3.5)  # past the limit, still waiting for the worker
    waiting = backend.status(behind)
    assert (waiting.state, waiting.started_at) == ("queued", None)
    assert backend.status(ahead).state == "running" and backend.status(ahead).started_at
    release.touch()
    status = finish(backend, behind)
    assert status.state == "failed", status
    assert (status.error.ename, status.error.cell_index) == ("KeyError", 1)
    first = finish(backend, ahead)
    assert first.state == "succeeded"
    assert parse_iso(status.started_at) >= parse_iso(first.ended_at) - timedelta(seconds=1)


@pytest.mark.slow
def test_a_limit_reached_while_the_kernel_starts_still_leaves_the_notebook(
    checkout, runs_dir, tmp_path, monkeypatch
):
    """Both warm starts die (the run is still queued) and papermill's last try never
    answers: the limit fires while that kernel is starting; the result says so and the
    (unexecuted) notebook is still saved."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "stuck"
    spec_dir.mkdir(parents=True)
    starts = tmp_path / "starts"
    launcher = (
        "import os, sys, time\n"
        f"with open({str(starts)!r}, 'a') as f: f.write('start\\n')\n"
        f"if len(open({str(starts)!r}).readlines()) <= 2: sys.exit(1)\n"
        "time.sleep(300)\n"
    )
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-c", launcher, "-f", "{connection_file}"],
                "display_name": "stuck",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    write_notebook(checkout / "k.ipynb", "print('never')")
    spec = make_spec(checkout, "k.ipynb", timeout_seconds=3)
    spec.compute["kernel"] = "stuck"
    backend = get_backend("local")
    handle = backend.submit(spec)
    status = finish(backend, handle, timeout=60)
    assert status.state == "timedOut", status
    assert status.message == (
        "timeoutMinutes 0.05 reached before the first cell started (the kernel was starting)"
    )
    out = backend.fetch_output(handle, tmp_path / "partial.ipynb")
    assert out is not None
    assert nbformat.read(out, as_version=4).cells[-1].source == "print('never')"
    assert len(starts.read_text().splitlines()) == 3  # two warm starts, then papermill's


@pytest.mark.slow
def test_runner_killed_is_reported_failed(checkout, runs_dir, tmp_path):
    started = tmp_path / "started"
    write_notebook(
        checkout / "victim.ipynb",
        f"import os, time\nopen({str(started)!r}, 'w').write(str(os.getpid()))\ntime.sleep(300)",
    )
    backend = get_backend("local")
    handle = backend.submit(make_spec(checkout, "victim.ipynb"))
    wait_for(lambda: started.exists() and started.read_text(), 60, "the notebook to start")
    files = RunFiles(Path(handle.data["runDir"]))
    os.kill(files.runner_pid(), signal.SIGKILL)
    wait_for(lambda: gone(files.runner_pid()), 10, "the runner to die")

    status = backend.status(handle)
    assert status.state == "failed"
    assert "exited without reporting a result" in status.message
    kernel_pid = int(started.read_text())
    wait_for(lambda: gone(kernel_pid), 10, "the orphaned kernel to be killed")


@pytest.mark.slow
def test_kernel_that_fails_to_start_once_is_retried(checkout, runs_dir, tmp_path, monkeypatch):
    # A kernelspec whose first start dies, like a start that lost a port race.
    spec_dir = tmp_path / "jupyter" / "kernels" / "flaky"
    spec_dir.mkdir(parents=True)
    marker = tmp_path / "first-start-happened"
    second = tmp_path / "second-start-at"
    launcher = (
        "import os, sys, time\n"
        f"if not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close(); sys.exit(1)\n"
        f"open({str(second)!r}, 'w').write(repr(time.time()))\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'ipykernel_launcher', *sys.argv[1:]])\n"
    )
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-c", launcher, "-f", "{connection_file}"],
                "display_name": "flaky",
                "language": "python",
            }
        )
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    write_notebook(checkout / "k.ipynb", "print('ok')")
    spec = make_spec(checkout, "k.ipynb")
    spec.compute["kernel"] = "flaky"
    backend = get_backend("local")
    handle = backend.submit(spec)
    status = finish(backend, handle)
    assert status.state == "succeeded"
    assert marker.exists()
    assert "retrying once" in (Path(handle.data["runDir"]) / "runner.log").read_text()
    # The retry happened while the run was queued: the limit's clock had not started.
    retried_at = datetime.fromtimestamp(float(second.read_text()), UTC)
    assert parse_iso(status.started_at) > retried_at


def test_local_backend_is_refused_unless_enabled(monkeypatch, checkout):
    monkeypatch.delenv("NOTEBOOKOPS_ALLOW_LOCAL_BACKEND", raising=False)
    with pytest.raises(PermanentBackendError, match=r"NOTEBOOKOPS_ALLOW_LOCAL_BACKEND=1"):
        get_backend("local")
    monkeypatch.setenv("NOTEBOOKOPS_ALLOW_LOCAL_BACKEND", "true")
    with pytest.raises(PermanentBackendError, match=r"disabled"):
        LocalBackend()


def test_bad_specs_are_permanent_errors_naming_the_value(checkout, runs_dir):
    write_notebook(checkout / "a.ipynb", "1")
    backend = get_backend("local")
    with pytest.raises(PermanentBackendError, match=r"'missing.ipynb' does not exist"):
        backend.submit(make_spec(checkout, "missing.ipynb"))
    with pytest.raises(PermanentBackendError, match=r"'\.\./a.ipynb'"):
        backend.submit(make_spec(checkout, "../a.ipynb"))
    bad_key = make_spec(checkout, "a.ipynb")
    bad_key.run_key = "../escape"
    with pytest.raises(PermanentBackendError, match=r"run_key .*'\.\./escape'"):
        backend.submit(bad_key)
    with pytest.raises(PermanentBackendError, match=r"workers must be a positive number, got 0"):
        LocalBackend(workers=0)
    assert not list(runs_dir.glob("nb-*"))  # nothing was started


def test_status_of_a_vanished_run_is_permanent(tmp_path, runs_dir):
    handle = RunHandle("local", "nb-x", None, {"runDir": str(tmp_path / "gone")})
    with pytest.raises(PermanentBackendError, match="not found"):
        get_backend("local").status(handle)


def test_output_is_not_fetched_before_the_end(tmp_path, runs_dir):
    run_dir = tmp_path / "runs" / "nb-x"
    run_dir.mkdir(parents=True)
    RunFiles(run_dir).init_state()
    handle = RunHandle("local", "nb-x", None, {"runDir": str(run_dir), "notebook": "x.ipynb"})
    with pytest.raises(RunNotFinishedError):
        get_backend("local").fetch_output(handle, tmp_path / "o.ipynb")
    assert read_json(run_dir / "state.json")["state"] == "queued"


@pytest.mark.slow
def test_wait_for_change_returns_when_a_run_finishes_not_at_its_timeout(checkout, runs_dir):
    """The monitor's long poll: a finished run is seen at once, an idle one after the wait."""
    write_notebook(checkout / "short.ipynb", "import time\ntime.sleep(1)")
    write_notebook(checkout / "idle.ipynb", "import time\ntime.sleep(300)")
    backend = get_backend("local")
    assert backend.poll_policy.long_poll_seconds > 0
    short = backend.submit(make_spec(checkout, "short.ipynb"))
    idle = backend.submit(make_spec(checkout, "idle.ipynb"))
    try:
        wait_for(lambda: backend.status(idle).state == "running", 60, "the idle run to start")
        # Waiting on the idle run alone: nothing changes, so the full wait passes.
        started = time.monotonic()
        backend.wait_for_change([idle], 0.6)
        assert time.monotonic() - started >= 0.55
        # Waiting on both until the short one ends: it returns soon after that state change.
        while not backend.status(short).terminal:
            started = time.monotonic()
            backend.wait_for_change([short, idle], 60)
            assert time.monotonic() - started < 30
        assert backend.status(short).state == "succeeded"
    finally:
        backend.cancel(idle)


def test_wait_for_change_sees_a_run_that_ends_just_after_its_state_check(runs_dir, monkeypatch):
    """A run that ends in the instant between the wait's check of the states it was given and
    its first look at the state file is seen at once, not after the whole wait (the monitor's
    long poll is 30 s). RunFiles.read_state is wrapped to write the verdict at that instant:
    in a real run the window is microseconds wide, and a rare miss stalled a whole run."""
    run_dir = runs_dir / "nb-race"
    run_dir.mkdir(parents=True)
    files = RunFiles(run_dir)
    files.init_state()
    assert files.mark_running()
    time.sleep(0.05)  # the verdict's stamp differs from the running state's
    handle = RunHandle(
        backend="local", run_id="nb-race", portal_url=None, data={"runDir": str(run_dir)}
    )
    real_read = RunFiles.read_state
    ended: list[bool] = []

    def read_then_end(self: RunFiles) -> dict:
        state = real_read(self)
        if not ended and state.get("state") == "running":
            ended.append(True)
            assert RunFiles(self.run_dir).finalize("succeeded")
        return state

    monkeypatch.setattr(RunFiles, "read_state", read_then_end)
    started = time.monotonic()
    get_backend("local").wait_for_change([handle], 5.0, known=["running"])
    assert ended, "the wait never checked the state it was given"
    assert time.monotonic() - started < 1.0
    assert get_backend("local").status(handle).state == "succeeded"


@pytest.mark.slow
def test_a_run_canceled_while_its_warm_kernel_waits_for_a_worker_never_runs(
    checkout, runs_dir, tmp_path, monkeypatch
):
    """One worker, held by a notebook until the test releases it. The next run warms its
    kernel and waits for the worker inside papermill (which has already saved an unexecuted
    copy); canceled there, it ends canceled without an output notebook, its runner and kernel
    gone and its code never run, and the first notebook finishes normally."""
    monkeypatch.setenv("NOTEBOOKOPS_LOCAL_WORKERS", "1")
    started, release, ran = tmp_path / "started", tmp_path / "release", tmp_path / "ran"
    write_notebook(
        checkout / "ahead.ipynb",
        f"import os, time\nopen({str(started)!r}, 'w').close()\n"
        f"while not os.path.exists({str(release)!r}):\n    time.sleep(0.05)",
    )
    write_notebook(checkout / "behind.ipynb", f"open({str(ran)!r}, 'w').close()")
    backend = get_backend("local")
    ahead = backend.submit(make_spec(checkout, "ahead.ipynb"))
    wait_for(started.exists, 60, "the first notebook to start")
    behind = backend.submit(make_spec(checkout, "behind.ipynb"))
    files = RunFiles(Path(behind.data["runDir"]))
    wait_for(lambda: files.kernel_json.exists(), 60, "the second run's kernel")
    time.sleep(2.0)  # its kernel is ready: papermill waits for the worker
    assert backend.status(behind).state == "queued"
    kernel_pid = read_json(files.kernel_json)["pid"]
    runner_pid = files.runner_pid()
    backend.cancel(behind)
    wait_for(lambda: gone(kernel_pid) and gone(runner_pid), 10, "runner and kernel to die")
    status = backend.status(behind)
    assert (status.state, status.started_at) == ("canceled", None)
    assert backend.fetch_output(behind, tmp_path / "behind.ipynb") is None
    release.touch()
    assert finish(backend, ahead).state == "succeeded"
    assert not ran.exists()
