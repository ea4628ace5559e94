"""A parent that has imported what a local runner needs and forks one runner per notebook.

Each runner used to be a fresh interpreter that imported papermill, nbclient, jupyter_client and
nbformat and compiled nbformat's schema validator: some 0.5 s of CPU per notebook, paid again by
every notebook of a run on a machine whose CPUs the kernels need (issue 17). The fork server
pays it once; a forked runner starts in milliseconds and shares those pages copy-on-write.

Every notebook still gets its own runner process and its own fresh kernel: the server itself
never runs a kernel or any repository code, it only imports libraries and forks.

- `request(runs_root, run_dir, env)` asks the server for the runs root to fork a runner for
  `run_dir` with the submitter's environment; False when there is none (the caller then starts
  the runner as its own interpreter and may `start` a server for the next notebooks).
- A server serves one runs root and one build of the code: its socket name is keyed by the
  interpreter, the package's folder, PYTHONPATH and the code's modification times, so edited
  code or another venv never gets a runner forked from stale modules.
- It exits after `IDLE_SECONDS` without a request, or when its runs root is gone. One server
  per key: a second one finds the lock taken and exits.

Started as `python -m notebookops.compute.local_forkserver RUNS_ROOT KEY`. Standard library only
at import time (the client side runs in the function host).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from notebookops.compute import local_pool
from notebookops.compute.local_socket import code_key, listen, peer_uid, read_line

MODULE = "notebookops.compute.local_forkserver"
IDLE_SECONDS = 20.0
CONNECT_TIMEOUT_SECONDS = 10.0
START_WAIT_SECONDS = 5.0


def key(env: dict[str, str]) -> str:
    """Which server may fork for this submitter: same interpreter, same code, same import path."""
    return code_key(env)


def socket_path(runs_root: Path, server_key: str) -> Path:
    return runs_root / f".forkserver-{server_key}.sock"


def request(
    runs_root: Path, run_dir: Path, env: dict[str, str], send_event_url: str | None = None
) -> bool:
    """Have the server fork the runner of `run_dir`; True once the server says it did.
    `send_event_url` (it holds the host's key) travels only over this private socket."""
    server_key = key(env)
    path = socket_path(runs_root, server_key)
    if not path.exists() and not _await_start(runs_root, server_key, path):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(CONNECT_TIMEOUT_SECONDS)
            conn.connect(str(path))
            ask = {"runDir": str(run_dir), "env": env, "sendEventUrl": send_event_url}
            conn.sendall(json.dumps(ask).encode() + b"\n")
            answer = read_line(conn)
        return bool(json.loads(answer or b"{}").get("pid"))
    except (OSError, ValueError):
        return False


def _await_start(runs_root: Path, server_key: str, path: Path) -> bool:
    """Wait for a server that is starting (it holds its lock while it imports) to listen, at
    most `START_WAIT_SECONDS`: a runner it forks costs a fraction of a fresh interpreter's
    CPU, and the first submits of a run come while the server prewarm started is importing."""
    import time

    deadline = time.monotonic() + START_WAIT_SECONDS
    while _starting(runs_root, server_key):
        if path.exists():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return path.exists()


def _starting(runs_root: Path, server_key: str) -> bool:
    """Whether a server for `server_key` was started and its process is still alive (it may
    still be importing). Read from the pid `start` wrote, not by probing the server's lock: a
    probe holding the lock for an instant would make a server starting then give up."""
    try:
        pid = int(_starting_file(runs_root, server_key).read_text(encoding="ascii"))
    except (OSError, ValueError):
        return False
    return local_pool._alive(pid)  # an exited server not reaped yet is not starting


def _starting_file(runs_root: Path, server_key: str) -> Path:
    return runs_root / f".forkserver-{server_key}.starting"


def start(runs_root: Path, env: dict[str, str], log: Path) -> None:
    """Start a server for later submits, detached; does not wait for it (`request` waits a
    little for one that is starting)."""
    server_key = key(env)
    if _starting(runs_root, server_key):  # (a socket may be a killed server's: not checked)
        return
    with contextlib.suppress(OSError), open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", MODULE, str(runs_root), server_key],
            env=env,
            cwd=runs_root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _starting_file(runs_root, server_key).write_text(str(process.pid), encoding="ascii")


def _preload() -> None:
    from notebookops.compute import local_runner

    local_runner._preload()
    import nbformat

    # papermill validates every notebook it reads and writes; the validator is compiled on
    # first use, so compile it here once rather than in every runner.
    nbformat.validate(nbformat.v4.new_notebook())
    # jupyter_client's kernelspec lookup imports IPython (for ~/.ipython/kernels) and
    # ipykernel.kernelspec (for the native python3 kernel): 0.1 s of CPU per runner, paid
    # here once instead.
    import ipykernel.kernelspec  # noqa: F401
    import IPython.paths  # noqa: F401


def _fork_runner(
    conn: socket.socket, run_dir: Path, env: dict[str, str], send_event_url: str | None = None
) -> int:
    from notebookops.compute import local_runner
    from notebookops.compute.local_state import RunFiles

    files = RunFiles(run_dir)
    log = os.open(files.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    # The pid is recorded once the runner leads its own process group (as the kernel server
    # does for kernels): a cancel that kills the group in between would miss it.
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the runner
        code = 1
        try:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the runner waits for its children
            conn.close()
            os.close(ready_r)
            os.setsid()
            os.write(ready_w, b"1")
            os.close(ready_w)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(log)
            os.environ.clear()
            os.environ.update(env)
            os.chdir(run_dir)
            code = local_runner.serve_forked(run_dir, send_event_url)
        finally:
            os._exit(code)
    os.close(log)
    os.close(ready_w)
    try:
        os.read(ready_r, 1)  # b"" when the child died first: its pid is still the answer
    finally:
        os.close(ready_r)
    files.record_runner(pid)
    return pid


def serve(runs_root: Path, server_key: str) -> int:
    lock = os.open(runs_root / f".forkserver-{server_key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another server for this key is starting or serving
    _preload()
    path = socket_path(runs_root, server_key)
    listener = listen(path)
    with contextlib.suppress(OSError):
        _starting_file(runs_root, server_key).unlink()  # listening now: requests need not wait
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # runners are reaped by the kernel
    idle = 0.0
    try:
        while idle < IDLE_SECONDS and runs_root.is_dir():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                idle += 1.0
                continue
            idle = 0.0
            with conn:
                _answer(conn)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        listener.close()
    return 0


def _answer(conn: socket.socket) -> None:
    conn.settimeout(CONNECT_TIMEOUT_SECONDS)
    try:
        if peer_uid(conn) != os.getuid():
            return
        ask: Any = json.loads(read_line(conn) or b"{}")
        run_dir, env = Path(ask["runDir"]), ask["env"]
        if not isinstance(env, dict) or not (run_dir / "run.json").is_file():
            return
        url = ask.get("sendEventUrl")
        env = {str(k): str(v) for k, v in env.items()}
        pid = _fork_runner(conn, run_dir, env, url if isinstance(url, str) else None)
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"fork server: request refused: {type(exc).__name__}: {exc}", flush=True)


if __name__ == "__main__":
    sys.exit(serve(Path(sys.argv[1]), sys.argv[2]))
