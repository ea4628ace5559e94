"""The local backend's fork server and long poll, on real notebooks and kernels (issue 17)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from notebookops.compute import get_backend, local_forkserver
from notebookops.compute.local import LocalBackend
from notebookops.compute.local_state import RunFiles
from tests import test_compute_local as local
from tests.test_compute_local import finish, make_spec, wait_for, write_notebook

checkout = local.checkout
runs_dir = local.runs_dir


def _server(runs: Path) -> psutil.Process | None:
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if local_forkserver.MODULE in cmdline and str(runs) in cmdline:
            return process
    return None


def _runner_env(backend) -> dict[str, str]:
    return backend._runner_env()


@pytest.mark.slow
def test_runners_after_the_first_are_forked_by_the_server_and_run_like_any_other(
    checkout, runs_dir
):
    for name in ("a", "b", "c"):
        write_notebook(
            checkout / f"{name}.ipynb", f"print('ran {name}')\nx = 1 / (ord('{name}') - 99)"
        )
    backend = get_backend("local")
    first = backend.submit(make_spec(checkout, "a.ipynb"))
    socket = local_forkserver.socket_path(runs_dir, local_forkserver.key(_runner_env(backend)))
    wait_for(socket.exists, 60, "the fork server to listen")
    server = _server(runs_dir)
    assert server is not None
    later = [backend.submit(make_spec(checkout, f"{n}.ipynb")) for n in ("b", "c")]
    for handle in later:
        pid = RunFiles(Path(handle.data["runDir"])).runner_pid()
        # Forked by the server: its child, yet alive and recognised as the run's runner.
        assert psutil.Process(pid).ppid() == server.pid
    states = {h.run_id: finish(backend, h) for h in [first, *later]}
    assert [states[h.run_id].state for h in (first, *later)] == ["succeeded", "succeeded", "failed"]
    failed = states[later[1].run_id]
    assert failed.error.ename == "ZeroDivisionError" and failed.error.cell_index == 0


def test_a_server_for_other_code_or_another_import_path_is_never_asked(tmp_path, monkeypatch):
    env = {"PYTHONPATH": "/somewhere"}
    other = {"PYTHONPATH": "/somewhere-else"}
    assert local_forkserver.key(env) != local_forkserver.key(other)
    source = Path(local_forkserver.__file__)
    before = local_forkserver.key(env)
    stat = source.stat()
    try:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert local_forkserver.key(env) != before  # edited code: a new server
    finally:
        os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # No server: the request says so, and the caller starts the runner itself.
    assert local_forkserver.request(tmp_path, tmp_path / "run", env) is False


@pytest.mark.slow
def test_a_killed_server_leaves_a_stale_socket_and_submits_still_run(checkout, runs_dir):
    write_notebook(checkout / "a.ipynb", "print(1)")
    write_notebook(checkout / "b.ipynb", "print(2)")
    backend = get_backend("local")
    first = backend.submit(make_spec(checkout, "a.ipynb"))
    socket = local_forkserver.socket_path(runs_dir, local_forkserver.key(_runner_env(backend)))
    wait_for(socket.exists, 60, "the fork server to listen")
    server = _server(runs_dir)
    server.send_signal(signal.SIGKILL)
    server.wait(10)
    assert socket.exists()  # nobody removed it
    second = backend.submit(make_spec(checkout, "b.ipynb"))
    assert finish(backend, first).state == "succeeded"
    assert finish(backend, second).state == "succeeded"
    # A new server took the killed one's place for the next notebooks.
    wait_for(lambda: _server(runs_dir) is not None, 60, "a new fork server")


@pytest.mark.slow
def test_submits_made_while_the_server_imports_wait_for_it(checkout, runs_dir):
    """The first submits of a run come while the server prewarm started is still importing:
    they wait for it rather than each paying a fresh interpreter's imports."""
    for name in ("a", "b"):
        write_notebook(checkout / f"{name}.ipynb", f"print('ran {name}')")
    backend = get_backend("local")
    runs_dir.mkdir(parents=True)
    env = _runner_env(backend)
    local_forkserver.start(runs_dir, env, runs_dir / ".forkserver.log")
    local_forkserver.start(runs_dir, env, runs_dir / ".forkserver.log")  # one server only
    socket = local_forkserver.socket_path(runs_dir, local_forkserver.key(env))
    assert not socket.exists()  # still importing
    handles = [backend.submit(make_spec(checkout, f"{n}.ipynb")) for n in ("a", "b")]
    server = _server(runs_dir)
    for handle in handles:
        pid = RunFiles(Path(handle.data["runDir"])).runner_pid()
        assert psutil.Process(pid).ppid() == server.pid  # forked, not a fresh interpreter
    assert [finish(backend, h).state for h in handles] == ["succeeded", "succeeded"]
    # One server: every process with its command line is the server or a runner it forked.
    same = [
        p
        for p in psutil.process_iter(["cmdline"])
        if local_forkserver.MODULE in (p.info["cmdline"] or [])
        and str(runs_dir) in p.info["cmdline"]
    ]
    assert {p.pid for p in same if p.ppid() != server.pid} == {server.pid}


@pytest.mark.slow
def test_the_server_exits_when_its_runs_folder_is_gone(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    env = LocalBackend._runner_env()
    local_forkserver.start(runs, env, tmp_path / "server.log")
    socket = local_forkserver.socket_path(runs, local_forkserver.key(env))
    wait_for(socket.exists, 60, "the fork server to listen")
    server = _server(runs)
    for leftover in runs.iterdir():
        leftover.unlink()
    runs.rmdir()
    server.wait(15)  # it checks once a second


@pytest.mark.slow
def test_a_long_poll_returns_at_once_for_a_run_that_changed_before_it_began(checkout, runs_dir):
    """The monitor's next round passes the states it saw: a run that ended between two rounds
    must not be seen only when the long poll times out."""
    write_notebook(checkout / "quick.ipynb", "print('done')")
    backend = get_backend("local")
    handle = backend.submit(make_spec(checkout, "quick.ipynb"))
    assert finish(backend, handle).state == "succeeded"
    started = time.monotonic()
    backend.wait_for_change([handle], 5.0, known=["running"])
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    backend.wait_for_change([handle], 0.5, known=["succeeded"])  # nothing new: the full wait
    assert time.monotonic() - started >= 0.45
