"""Kernels forked by the runs root's kernel server (local_kernelserver.py), on real kernels:
they must look to a notebook like a fresh kernel started in its folder, and die like one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import nbformat
import psutil
import pytest
from jupyter_client.manager import KernelManager

from notebookops.compute import get_backend, local_kernelserver, local_pool
from tests import test_compute_local as local
from tests.test_compute_local import finish, gone, make_spec, wait_for, write_notebook

runs_dir = local.runs_dir

PROBE = textwrap.dedent(
    """
    import json, os, random, sys
    import helper  # a module beside the notebook, as in Jupyter
    print(json.dumps({
        "pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "path": sys.path,
        "marker": os.environ.get("PROBE_MARKER"), "parent": os.environ.get("JPY_PARENT_PID"),
        "argv": sys.argv[1:2] + sys.argv[3:], "main": __name__, "helper": helper.VALUE,
        "random": random.random(), "umask": os.umask(0o022),
    }))
    """
)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    """The checkout cache: as root, the server forks only for checkouts it mounted read-only."""
    root = tmp_path / "checkouts"
    monkeypatch.setenv("NOTEBOOKOPS_CHECKOUT_DIR", str(root))
    root.mkdir()
    # A runner's import path (local.py puts the package on it): a server forks only for
    # kernels whose import path is its own.
    monkeypatch.setenv("PYTHONPATH", get_backend("local")._runner_env()["PYTHONPATH"])
    return root


def _server(runs: Path) -> psutil.Process:
    def find() -> psutil.Process | None:
        # Forked kernels keep the server's command line: the server is the one whose parent
        # is not a server.
        found = [
            process
            for process in psutil.process_iter(["cmdline"])
            if local_kernelserver.MODULE in (process.info["cmdline"] or [])
            and str(runs) in process.info["cmdline"]
        ]
        pids = {process.pid for process in found}
        roots = [process for process in found if process.ppid() not in pids]
        return roots[0] if roots else None

    return wait_for(find, 60, "the kernel server")


def _start_server(runs: Path) -> psutil.Process:
    """A server for kernels started from this process's environment, as a runner's are."""
    runs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    local_kernelserver.start(runs, env, runs / ".kernelserver.log")
    path = local_kernelserver.socket_path(runs, local_kernelserver.key(env))
    wait_for(lambda: path.exists(), 60, "the kernel server to listen")
    return _server(runs)


def _probe(km: KernelManager, code: str) -> dict:
    client = km.blocking_client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        out = _Collect()
        reply = client.execute_interactive(code, timeout=60, output_hook=out)
        assert reply["content"]["status"] == "ok", out.text
        return json.loads(out.text)
    finally:
        client.stop_channels()


class _Collect:
    def __init__(self) -> None:
        self.text = ""

    def __call__(self, msg: dict) -> None:
        if msg["msg_type"] == "stream":
            self.text += msg["content"]["text"]
        elif msg["msg_type"] == "error":
            self.text += "\n".join(msg["content"]["traceback"])


def _manager(runs: Path, cache: Path, forking: bool) -> KernelManager:
    km = KernelManager(kernel_name="python3")
    if forking:
        km.kernel_id = str(uuid.uuid4())
        provisioner = local_kernelserver.provisioner_class(runs, str(cache))
        km.provisioner = provisioner(kernel_id=km.kernel_id, kernel_spec=km.kernel_spec, parent=km)
    return km


@pytest.mark.slow
def test_a_forked_kernel_looks_like_a_fresh_one_started_in_the_notebooks_folder(
    tmp_path, runs_dir, cache, monkeypatch
):
    server = _start_server(runs_dir)
    folder = tmp_path / "work" / "nb"
    folder.mkdir(parents=True)
    (folder / "helper.py").write_text("VALUE = 41\n")
    monkeypatch.setenv("PROBE_MARKER", "set after the server started")
    seen = {}
    for kind, forking in (("fresh", False), ("forked", True), ("forked again", True)):
        km = _manager(runs_dir, cache, forking)
        km.start_kernel(cwd=str(folder), extra_arguments=["--HistoryManager.hist_file=:memory:"])
        try:
            seen[kind] = _probe(km, PROBE)
            assert getattr(km.provisioner, "forked", False) is forking
        finally:
            km.shutdown_kernel(now=False)
        assert not km.is_alive()
    fresh, forked, again = seen["fresh"], seen["forked"], seen["forked again"]
    assert fresh["ppid"] == os.getpid() and forked["ppid"] == server.pid
    for key in ("cwd", "path", "marker", "parent", "argv", "main", "helper", "umask"):
        assert forked[key] == fresh[key], key
    assert forked["cwd"] == str(folder) and forked["marker"] == "set after the server started"
    assert forked["parent"] == str(os.getpid())  # what the kernel polls, as launch_kernel sets
    # Each kernel draws its own random numbers, not the server's sequence.
    assert len({fresh["random"], forked["random"], again["random"]}) == 3
    assert gone(forked["pid"]) and gone(again["pid"])


@pytest.mark.slow
def test_a_forked_kernel_is_interrupted_and_killed_with_its_children(tmp_path, runs_dir, cache):
    _start_server(runs_dir)
    km = _manager(runs_dir, cache, forking=True)
    km.start_kernel(cwd=str(tmp_path))
    client = km.blocking_client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=60)
        assert km.provisioner.forked
        out = _Collect()
        msg = client.execute("import time\ntime.sleep(60)")
        time.sleep(1.0)  # inside the sleep
        km.interrupt_kernel()
        reply = client.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == msg
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt", out.text
        # Still usable after the interrupt; its subprocess dies with it. (Right after an
        # error, ipykernel aborts what arrives at once, as any ipykernel does: asked again.)
        for _ in range(20):
            reply = client.execute_interactive(
                "import subprocess\nchild = subprocess.Popen(['sleep', '300'])\nprint(child.pid)",
                timeout=30,
                output_hook=out,
            )
            if reply["content"]["status"] != "aborted":
                break
            time.sleep(0.1)
        assert reply["content"]["status"] == "ok", (reply["content"], out.text)
        child = int(out.text.strip())
    finally:
        client.stop_channels()
    pid = km.provisioner.pid
    km.shutdown_kernel(now=True)
    wait_for(lambda: gone(pid) and gone(child), 10, "the kernel and its child to die")
    assert not km.is_alive()


@pytest.mark.slow
def test_a_kernel_whose_runner_died_is_killed_by_the_server(tmp_path, runs_dir, cache):
    """A fresh kernel dies with its runner (it polls its parent); a forked one's parent is
    the server, so the server kills it."""
    _start_server(runs_dir)
    script = textwrap.dedent(
        f"""
        import sys, uuid
        from jupyter_client.manager import KernelManager
        from notebookops.compute import local_kernelserver
        km = KernelManager(kernel_name="python3")
        km.kernel_id = str(uuid.uuid4())
        provisioner = local_kernelserver.provisioner_class({str(runs_dir)!r}, {str(cache)!r})
        km.provisioner = provisioner(kernel_id=km.kernel_id, kernel_spec=km.kernel_spec, parent=km)
        km.start_kernel(cwd={str(tmp_path)!r})
        assert km.provisioner.forked
        print(km.provisioner.pid, flush=True)
        """
    )
    runner = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert runner.returncode == 0, runner.stderr
    kernel = int(runner.stdout.split()[-1])
    wait_for(lambda: gone(kernel), 15, "the orphaned kernel to be killed")


@pytest.mark.slow
def test_notebooks_run_on_forked_kernels_with_their_verdicts_limits_and_pool(
    tmp_path, runs_dir, cache
):
    checkout = cache / "0123abc"
    (checkout / "nb").mkdir(parents=True)
    (checkout / "data.csv").write_text("x\n41\n")
    probe = "import os\nprint(os.getppid(), os.getpid())"
    write_notebook(checkout / "nb" / "a.ipynb", probe, "print(open('../data.csv').read())")
    write_notebook(checkout / "nb" / "b.ipynb", probe, "1 / 0")
    write_notebook(checkout / "nb" / "c.ipynb", probe, "open('../data.csv', 'w').write('x')")
    write_notebook(checkout / "nb" / "d.ipynb", probe, "import time\ntime.sleep(300)")
    backend = get_backend("local")
    pool = backend.prewarm(2)
    server = _server(runs_dir)
    offers = wait_for(lambda: len(o := pool.offers()) == 2 and o, 60, "two offered kernels")
    records = [json.loads(o.read_text()) for o in offers]
    assert {psutil.Process(r["pid"]).ppid() for r in records} == {server.pid}
    handles = {
        name: backend.submit(
            make_spec(checkout, f"nb/{name}.ipynb", timeout_seconds=8 if name == "d" else None)
        )
        for name in "abcd"
    }
    states = {name: finish(backend, h, timeout=120) for name, h in handles.items()}
    assert states["a"].state == "succeeded"
    assert states["b"].state == "failed" and states["b"].error.ename == "ZeroDivisionError"
    # The shared checkout stays read-only to a forked kernel, as to any kernel.
    assert states["c"].state == "failed" and states["c"].error.ename in (
        "OSError",
        "PermissionError",
    )
    assert states["d"].state == "timedOut"
    assert (checkout / "data.csv").read_text() == "x\n41\n"
    kernels = []
    for name, handle in handles.items():
        out = backend.fetch_output(handle, tmp_path / f"{name}.ipynb")
        cells = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"]
        ppid, pid = map(int, cells[0].outputs[0].text.split())
        assert ppid == server.pid, f"{name} ran on a kernel the server did not fork"
        kernels.append(pid)
    assert len(set(kernels)) == 4  # one kernel per notebook, never shared
    wait_for(lambda: all(gone(pid) for pid in kernels), 30, "every kernel to exit")
    # Nothing is left in the prewarm folder once its kernels are gone.
    wait_for(
        lambda: not list((runs_dir / local_pool.POOL_DIR).glob("*.connection")),
        10,
        "connection files removed",
    )


@pytest.mark.slow
def test_a_server_whose_runs_folder_is_gone_stops_its_kernels_and_exits(
    tmp_path, runs_dir, cache, monkeypatch
):
    pool = local_kernelserver.prewarm(runs_dir, 1, idle_seconds=600)
    [offer] = wait_for(lambda: pool.offers(), 60, "the offered kernel")
    offered = json.loads(offer.read_text())["pid"]
    server = psutil.Process(offered).parent()  # the one server prewarm started
    # A kernel started from the environment prewarm gave that server: forked by it too.
    monkeypatch.setenv("PYTHONPATH", local_pool._kernel_env()["PYTHONPATH"])
    km = _manager(runs_dir, cache, forking=True)
    km.start_kernel(cwd=str(tmp_path))
    try:
        assert km.provisioner.forked
        assert psutil.Process(km.provisioner.pid).ppid() == server.pid
        shutil.rmtree(runs_dir)
        wait_for(lambda: gone(server.pid), 15, "the server to exit")
        wait_for(lambda: gone(km.provisioner.pid) and gone(offered), 15, "its kernels to stop")
    finally:
        km.shutdown_kernel(now=True)


def test_a_server_counts_as_busy_while_a_kernel_it_forked_is_alive(tmp_path):
    """Its kernels poll it as their parent and would exit with it: it waits for them."""
    from notebookops.compute.local_state import _create_time

    server = local_kernelserver._Server(tmp_path, None, None)  # type: ignore[arg-type]
    assert not server.busy()
    kernel = subprocess.Popen(["sleep", "60"], start_new_session=True)  # stands in for one
    try:
        server.owners[kernel.pid] = (os.getpid(), _create_time(os.getpid()))
        server.tend()  # alive, and its runner (this process) too: kept
        assert server.busy() and kernel.poll() is None
        kernel.kill()
        kernel.wait()
        server.tend()
        assert not server.busy()
    finally:
        kernel.kill()


LAUNCH = [sys.executable, "-m", "ipykernel_launcher", "-f"]


def test_only_this_interpreters_ipykernel_is_forked(tmp_path):
    conn = str(tmp_path / "k.json")
    assert local_kernelserver.forkable([sys.executable, "-m", "ipykernel_launcher", "-f", conn])
    # Another virtual environment of the same base interpreter: its python links to the same
    # binary, but it imports its own packages.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")])
    other_python = tmp_path / "venv" / "bin" / "python"
    assert os.path.realpath(other_python) == os.path.realpath(sys.executable)
    assert not local_kernelserver.forkable([str(other_python), *LAUNCH[1:], conn])
    assert not local_kernelserver.forkable([sys.executable, "-m", "other_kernel", "-f", conn])
    assert not local_kernelserver.forkable(["R", "--slave", "-e", "IRkernel::main()", conn])
    # No server: nothing is forked, and jupyter_client starts the kernel as always.
    cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", conn]
    assert local_kernelserver.fork_kernel(tmp_path, cmd, dict(os.environ), "/", None) is None


def test_a_stale_server_socket_refuses_nothing_and_costs_nothing(tmp_path, capsys):
    env = dict(os.environ)
    path = local_kernelserver.socket_path(tmp_path, local_kernelserver.key(env))
    path.touch()  # left by a server that was SIGKILLed: nobody listens
    cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", str(tmp_path / "k.json")]
    assert local_kernelserver.fork_kernel(tmp_path, cmd, env, "/", None) is None
    assert "kernel server not used" in capsys.readouterr().out


@pytest.mark.slow
def test_with_forking_turned_off_kernels_start_as_jupyter_client_starts_them(
    tmp_path, runs_dir, cache, monkeypatch
):
    monkeypatch.setenv(local_kernelserver.SETTING, "0")
    checkout = cache / "0123abc"
    parent = "import os\nprint(open(f'/proc/{os.getppid()}/cmdline').read().replace(chr(0), ' '))"
    write_notebook(checkout / "a.ipynb", parent)
    backend = get_backend("local")
    pool = backend.prewarm(1)
    [offer] = wait_for(lambda: pool.offers(), 60, "the offered kernel")
    record = json.loads(offer.read_text())
    cmdline = psutil.Process(record["pid"]).parent().cmdline()
    assert local_pool.POOL_MODULE in cmdline  # a pool process's own kernel
    handles = [backend.submit(make_spec(checkout, "a.ipynb", instance_id=f"i{n}")) for n in "12"]
    assert [finish(backend, h).state for h in handles] == ["succeeded", "succeeded"]
    second = nbformat.read(backend.fetch_output(handles[1], tmp_path / "b.ipynb"), as_version=4)
    started_by = second.cells[0].outputs[0].text
    assert local_kernelserver.MODULE not in started_by and "python" in started_by
    assert not list(runs_dir.glob(".kernelserver-*.sock"))  # no server was started
