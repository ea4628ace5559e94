"""A parent that has imported ipykernel and forks one fresh kernel per notebook.

A kernel start is a fresh interpreter importing IPython, ipykernel, zmq and tornado before it
answers: about 0.4 s of CPU per notebook, which 8 notebooks on 2 CPUs pay while the notebooks
themselves wait for those CPUs (issue 17). The kernel server pays the imports once; each
kernel is forked from it and pays only its own set-up (its shell, its sockets), some 0.15 s.

Every notebook still gets its own kernel process, started from nothing the notebooks ran: the
server only imports libraries and forks. A forked kernel is set up as jupyter_client's
`launch_kernel` sets up a fresh one: the runner's environment (with `JPY_PARENT_PID`), the
notebook's folder as its working folder, the runner's stdout and stderr, the kernelspec's
arguments, its own session and process group, a freshly seeded `random`. Differences that
remain: the hash seed is the server's (as with a fixed PYTHONHASHSEED), and the modules
ipykernel imports were imported before the environment was set.

- `ForkingProvisioner` (jupyter_client's LocalProvisioner, via `provisioner_class`) asks the
  server for the kernel when the command is `<this interpreter> -m ipykernel_launcher -f ...`
  and a server is up; otherwise it launches the kernel as jupyter_client always does.
- A server serves one runs root and one build of the code and of ipykernel (the socket name is
  keyed like the fork server's, plus ipykernel's own files), answers its own uid only, and as
  root forks only for a checkout inside the cache it mounted read-only (see local_pool.py).
- It kills a kernel whose runner is gone (a fresh kernel dies with its runner, the parent it
  polls) and exits after `IDLE_SECONDS` without a request once none of its kernels is alive:
  its kernels poll it as their parent and would exit with it. When its runs root is removed,
  it stops its kernels and exits.

Started as `python -m notebookops.compute.local_kernelserver RUNS_ROOT KEY`. Standard library
only at import time (the client side runs in the function host and in runners).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from notebookops.compute import local_pool, local_socket

MODULE = "notebookops.compute.local_kernelserver"
SETTING = "NOTEBOOKOPS_LOCAL_FORK_KERNELS"  # "0": every kernel starts as jupyter_client starts it
IDLE_SECONDS = 20.0
CONNECT_TIMEOUT_SECONDS = 10.0
_LAUNCHER = ["-m", "ipykernel_launcher", "-f"]


def enabled(env: dict[str, str] | None = None) -> bool:
    return (env if env is not None else os.environ).get(SETTING, "").strip() != "0"


def key(env: dict[str, str]) -> str:
    """The fork server's key (interpreter, code, import path) and ipykernel's installed files."""
    stamps = []
    for name in ("ipykernel", "ipykernel_launcher", "IPython"):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            return ""
        stamps.append((spec.origin, os.stat(spec.origin).st_mtime_ns))
    material = json.dumps([local_socket.code_key(env), stamps])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def socket_path(runs_root: Path, server_key: str) -> Path:
    return Path(runs_root) / f".kernelserver-{server_key}.sock"


def start(runs_root: Path, env: dict[str, str], log: Path) -> None:
    """Start a server for later kernel starts, detached; does not wait for it."""
    server_key = key(env) if enabled(env) else ""
    if not server_key or socket_path(runs_root, server_key).exists():
        return
    _spawn(runs_root, env, log, server_key)


def prewarm(
    runs_root: Path,
    count: int,
    kernel_name: str = "python3",
    idle_seconds: float = local_pool.IDLE_SECONDS,
) -> local_pool.Pool:
    """local_pool.prewarm, with the kernels forked by the runs root's server (started when
    none is up); the pool processes start them where no server can."""
    pool = Path(runs_root) / local_pool.POOL_DIR
    pool.mkdir(parents=True, exist_ok=True)
    env = local_pool._kernel_env()
    log = Path(runs_root) / ".kernelserver.log"
    if (
        count > 0
        and enabled(env)
        and offer(runs_root, env, log, pool, kernel_name, count, idle_seconds)
    ):
        return local_pool.Pool(pool)
    return local_pool.prewarm(runs_root, count, kernel_name, idle_seconds)


def offer(
    runs_root: Path,
    env: dict[str, str],
    log: Path,
    pool: Path,
    kernel_name: str,
    count: int,
    idle_seconds: float,
) -> bool:
    """Have the server offer `count` kernels of `kernel_name` in the prewarm folder `pool`, as
    local_pool's own processes would (one JSON offer each, withdrawn after `idle_seconds`),
    starting the server when none is up; returns in milliseconds, before the kernels are up.
    A kernel the server cannot fork is started by local_pool's processes instead."""
    server_key = key(env)
    if not server_key:
        return False
    ask = {
        "offer": {
            "pool": str(pool),
            "kernelName": kernel_name,
            "count": count,
            "idleSeconds": idle_seconds,
        }
    }
    path = socket_path(runs_root, server_key)
    if path.exists() and _ask(path, ask) is not None:
        return True
    return _spawn(runs_root, env, log, server_key, ask)


def _ask(path: Path, ask: dict[str, Any], fds: list[int] | None = None) -> dict[str, Any] | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(CONNECT_TIMEOUT_SECONDS)
            conn.connect(str(path))
            socket.send_fds(conn, [json.dumps(ask).encode() + b"\n"], fds or [])
            answer = json.loads(local_socket.read_line(conn) or b"{}")
    except (OSError, ValueError) as exc:
        print(f"kernel server not used ({type(exc).__name__}: {exc})", flush=True)
        return None
    return answer if isinstance(answer, dict) else None


def _spawn(
    runs_root: Path,
    env: dict[str, str],
    log: Path,
    server_key: str,
    first: dict[str, Any] | None = None,
) -> bool:
    argv = [sys.executable, "-m", MODULE, str(runs_root), server_key]
    with contextlib.suppress(OSError), open(log, "ab") as out:
        subprocess.Popen(
            [*argv, json.dumps(first)] if first else argv,
            env=env,
            cwd=runs_root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return True
    return False


def forkable(cmd: list[str]) -> bool:
    """Whether `cmd` starts this interpreter's ipykernel, the only kernel a server forks.
    The path is compared as given, not resolved: every virtual environment's `python` links
    to the same base interpreter, yet each imports its own packages."""
    return (
        len(cmd) >= 5
        and cmd[1:4] == _LAUNCHER
        and os.path.abspath(cmd[0]) == os.path.abspath(sys.executable)
    )


def fork_kernel(
    runs_root: Path, cmd: list[str], env: dict[str, str], cwd: str, protect: str | None
) -> dict[str, Any] | None:
    """Have the server fork the kernel `cmd` would start, in `cwd` with `env` and this process's
    stdout and stderr; its answer ({"pid", "protectedRoot"}), or None when no server can.
    `protect`: the shared checkout the kernel must not write to (root only)."""
    if not forkable(cmd):
        return None
    server_key = key({"PYTHONPATH": env.get("PYTHONPATH", "")})
    path = socket_path(runs_root, server_key) if server_key else None
    if path is None or not path.exists():
        return None
    ask = {
        "argv": cmd[3:],  # -f CONNECTION_FILE and the kernelspec's arguments
        "env": env,
        "cwd": cwd,
        "umask": _umask(),
        "owner": os.getpid(),
        "protect": protect,
    }
    answer = _ask(path, ask, [1, 2])
    if answer is not None and not answer.get("pid"):
        print(f"kernel server not used: {answer.get('refused') or 'no answer'}", flush=True)
        return None
    return answer


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def provisioner_class(runs_root: Path, protect: str | None) -> type:
    """jupyter_client's LocalProvisioner, with kernels forked by the server when one is up.
    Signals go to the kernel's process group; liveness is read from /proc, since the kernel is
    the server's child, not ours."""
    from jupyter_client.provisioning import LocalProvisioner

    _alive = local_pool._alive

    class ForkingProvisioner(LocalProvisioner):  # type: ignore[misc]
        forked = False

        async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
            env = dict(kwargs.get("env") or os.environ)
            env["JPY_PARENT_PID"] = str(os.getpid())  # as launch_kernel sets it
            cwd = str(kwargs.get("cwd") or os.getcwd())
            answer = fork_kernel(runs_root, list(cmd), env, cwd, protect)
            if answer is None:
                return await super().launch_kernel(cmd, **kwargs)
            self.forked = True
            self.pid = self.pgid = int(answer["pid"])
            return self.connection_info

        @property
        def has_process(self) -> bool:
            if self.forked:
                return _alive(int(self.pid))
            return bool(super().has_process)

        async def poll(self) -> int | None:
            if self.forked:
                return None if _alive(int(self.pid)) else 0
            return await super().poll()

        async def wait(self) -> int | None:
            if not self.forked:
                return await super().wait()
            import asyncio

            while _alive(int(self.pid)):
                await asyncio.sleep(0.05)
            return 0

        async def send_signal(self, signum: int) -> None:
            if not self.forked:
                return await super().send_signal(signum)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(self.pgid), signum)
            return None

        async def kill(self, restart: bool = False) -> None:
            if not self.forked:
                return await super().kill(restart)
            return await self.send_signal(signal.SIGKILL)

        async def terminate(self, restart: bool = False) -> None:
            if not self.forked:
                return await super().terminate(restart)
            return await self.send_signal(signal.SIGTERM)

    return ForkingProvisioner


# ---------------------------------------------------------------------------------- server


def _preload() -> None:
    """What a kernel imports before it answers, so that forks find it imported: some 0.4 s of
    CPU, 0.14 s of it the debugger (debugpy), history (sqlite3) and inspection modules that
    ipykernel imports while it sets itself up. Every module here only defines things; none
    starts a thread (a fork is refused if one did)."""
    import importlib.metadata  # noqa: F401
    import sqlite3  # noqa: F401

    import ipykernel.debugger  # noqa: F401  (debugpy)
    import tornado.platform.asyncio  # noqa: F401
    import traitlets.config.argcomplete_config  # noqa: F401
    from ipykernel import ipkernel, kernelapp, zmqshell  # noqa: F401
    from IPython.core import (  # noqa: F401
        completer,  # jedi, when installed
        completerlib,
        debugger,
        logger,
        oinspect,
    )
    from IPython.extensions import storemagic  # noqa: F401


class _Server:
    """The serving process's state: its socket, its read-only checkout cache (root), its
    kernels and the offers it made."""

    def __init__(self, runs_root: Path, listener: socket.socket, protected: str | None) -> None:
        self.runs_root = runs_root
        self.listener = listener
        self.protected = protected
        self.owners: dict[int, tuple[int, float | None]] = {}  # kernel -> its runner (pid, start)
        self.offers: dict[int, tuple[Path, float, Path]] = {}  # kernel -> (offer, until, scratch)

    def busy(self) -> bool:
        return bool(self.owners or self.offers)

    def tend(self) -> None:
        """Forget kernels that exited; kill those whose runner is gone, and offers nobody took
        in time (a fresh kernel dies with its runner; an unclaimed pool kernel expires)."""
        from notebookops.compute.local_state import _create_time

        _alive = local_pool._alive
        for pid, (owner, started) in list(self.owners.items()):
            if not _alive(pid):
                del self.owners[pid]
            elif not _alive(owner) or _create_time(owner) != started:
                _kill(pid)
        now = time.monotonic()
        for pid, (offer_file, until, scratch) in list(self.offers.items()):
            if not _alive(pid):
                del self.offers[pid]
                shutil.rmtree(scratch, ignore_errors=True)
                with contextlib.suppress(OSError):
                    Path(offer_file.parent, f"kernel-{offer_file.stem}.connection").unlink()
                continue
            if now >= until:
                expired = offer_file.with_name(f".{offer_file.stem}.expired")
                with contextlib.suppress(OSError):
                    os.rename(offer_file, expired)  # still offered: withdraw it, stop the kernel
                    expired.unlink()
                    _kill(pid)

    def kill_all(self) -> None:
        for pid in [*self.owners, *self.offers]:
            _kill(pid)

    def answer(self, conn: socket.socket) -> None:
        from notebookops.compute.local_state import _create_time

        conn.settimeout(CONNECT_TIMEOUT_SECONDS)
        fds: list[int] = []
        try:
            if local_socket.peer_uid(conn) != os.getuid():
                return
            data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 2)
            data = local_socket.read_line(conn, data=data) if data else data
            ask: Any = json.loads(data or b"{}")
            if isinstance(ask, dict) and isinstance(ask.get("offer"), dict):
                made = self.make_offers(ask["offer"])
                conn.sendall(json.dumps({"offered": made}).encode() + b"\n")
                return
            refusal = _refusal(ask, fds, self.protected)
            if refusal:
                conn.sendall(json.dumps({"refused": refusal}).encode() + b"\n")
                return
            owner = int(ask["owner"])
            pid = _fork_kernel(ask, fds, (conn, self.listener))
            self.owners[pid] = (owner, _create_time(owner))
            reply = {"pid": pid, "protectedRoot": self.protected}
            conn.sendall(json.dumps(reply).encode() + b"\n")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"kernel server: request refused: {type(exc).__name__}: {exc}", flush=True)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def make_offers(self, want: dict[str, Any]) -> int:
        """Fork `count` kernels of `kernelName` into the prewarm folder, each offered in
        `<id>.json` as local_pool's processes offer theirs; or have those processes start
        them, for a kernel this server cannot fork. Returns how many this server forked."""
        pool, name = Path(str(want["pool"])), str(want["kernelName"])
        count, idle = int(want["count"]), float(want["idleSeconds"])
        argv = _kernelspec_argv(name)
        if argv is None or (os.geteuid() == 0 and not self.protected):
            local_pool.prewarm(pool.parent, count, name, idle)
            return 0
        pool.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            from jupyter_client.connect import write_connection_file

            ident = uuid.uuid4().hex[:12]
            scratch = pool / f"scratch-{ident}"
            scratch.mkdir()
            connection = pool / f"kernel-{ident}.connection"
            write_connection_file(str(connection), ip="127.0.0.1")
            env = dict(os.environ)
            env["JPY_PARENT_PID"] = str(os.getpid())
            ask = {
                "argv": [
                    "-f",
                    str(connection),
                    *argv[argv.index("{connection_file}") + 1 :],
                    "--HistoryManager.hist_file=:memory:",  # as local_pool's kernels
                ],
                "env": env,
                "cwd": str(scratch),
                "umask": _umask(),
            }
            pid = _fork_kernel(ask, [os.dup(1), os.dup(2)], (self.listener,))
            record = {
                "pid": pid,
                "connectionFile": str(connection),
                "kernelName": name,
                "protectedRoot": self.protected,
            }
            offer_file = pool / f"{ident}.json"
            tmp = pool / f".{ident}.tmp"
            tmp.write_text(json.dumps(record), encoding="utf-8")
            os.replace(tmp, offer_file)
            self.offers[pid] = (offer_file, time.monotonic() + idle, scratch)
        return count


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _kernelspec_argv(name: str) -> list[str] | None:
    """The kernelspec's command when it is this interpreter's ipykernel with nothing else to
    set up (no env, signal interrupts), else None."""
    from jupyter_client.kernelspec import KernelSpecManager

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except Exception:  # no such kernel, or a broken kernelspec: not ours to fork
        return None
    argv = list(spec.argv)
    major, minor = sys.version_info[:2]
    if argv and argv[0] in ("python", f"python{major}", f"python{major}.{minor}"):
        argv[0] = sys.executable  # as jupyter_client does for the native kernel
    if spec.env or spec.interrupt_mode != "signal" or "{connection_file}" not in argv[4:5]:
        return None
    return argv if forkable(argv) else None


def serve(runs_root: Path, server_key: str, first: dict[str, Any] | None = None) -> int:
    lock = os.open(runs_root / f".kernelserver-{server_key}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    path = socket_path(runs_root, server_key)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        # Another server for this key is starting or serving: hand it this one's offer.
        deadline = time.monotonic() + CONNECT_TIMEOUT_SECONDS
        while first and time.monotonic() < deadline:
            if path.exists() and _ask(path, first) is not None:
                break
            time.sleep(0.05)
        return 0
    # As ipykernel_launcher does: the working folder is not on the path while it imports.
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
    protected = local_pool.protect_checkout_cache("kernel server")
    _preload()
    listener = local_socket.listen(path)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # kernels are reaped by the OS
    server = _Server(runs_root, listener, protected)
    if first and isinstance(first.get("offer"), dict):
        server.make_offers(first["offer"])
    idle = 0.0
    try:
        while True:
            server.tend()
            if not runs_root.is_dir():
                server.kill_all()  # its runs are gone: nothing is left to read their results
                break
            if not server.busy() and idle >= IDLE_SECONDS:
                break
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                idle += 1.0
                continue
            idle = 0.0
            with conn:
                server.answer(conn)
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        listener.close()
    return 0


def _refusal(ask: Any, fds: list[int], protected: str | None) -> str | None:
    if not isinstance(ask, dict) or len(fds) != 2:
        return "malformed request"
    if not isinstance(ask.get("env"), dict) or not isinstance(ask.get("argv"), list):
        return "malformed request"
    if not os.path.isdir(str(ask.get("cwd"))):
        return f"no such folder {ask.get('cwd')!r}"
    if os.geteuid() == 0:
        want = ask.get("protect")
        if not protected or not want or not local_pool._inside(Path(str(want)), Path(protected)):
            return "the checkout is not read-only here"
    import threading

    if threading.active_count() != 1:  # forking a threaded process copies locks mid-use
        return "the server has threads"
    return None


def _kernel_app_class() -> Any:
    """ipykernel's app, with the two settings it reads from the environment when imported (in
    the server, not in this kernel's environment) read when the app is made instead."""
    from ipykernel import kernelapp
    from traitlets import default

    class IPKernelApp(kernelapp.IPKernelApp):  # the same name: config sections and log lines
        @default("parent_handle")
        def _parent_handle_default(self) -> int:
            return int(os.environ.get("JPY_PARENT_PID") or 0)

        @default("interrupt")
        def _interrupt_default(self) -> int:
            return int(os.environ.get("JPY_INTERRUPT_EVENT") or 0)

    return IPKernelApp


def _fork_kernel(ask: dict[str, Any], fds: list[int], inherited: tuple) -> int:
    """Fork the kernel; returns its pid once it leads its own process group, so that whoever
    is told the pid can signal the group at once (a withdrawn offer, an abort)."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        _become_kernel(ask, fds, (*inherited, ready_w))  # never returns
    os.close(ready_w)
    try:
        os.read(ready_r, 1)  # b"" when the child died first: its pid is still the answer
    finally:
        os.close(ready_r)
    return pid


def _become_kernel(ask: dict[str, Any], fds: list[int], inherited: tuple) -> None:
    """In the forked child: set up as launch_kernel would, then run ipykernel; exits."""
    import atexit
    import random

    code: Any = 1
    try:
        *sockets, ready = inherited
        for sock in sockets:
            sock.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.setsid()
        os.write(ready, b"1")
        os.close(ready)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in fds:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.chdir(str(ask["cwd"]))
        os.umask(int(ask.get("umask", 0o022)))
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in ask["env"].items()})
        random.seed()  # else every kernel would draw the server's sequence
        atexit._clear()  # the server's exit handlers are not the kernel's
        spec = importlib.util.find_spec("ipykernel_launcher")
        sys.argv = [str(spec.origin if spec else "ipykernel_launcher"), *map(str, ask["argv"])]
        _kernel_app_class().launch_instance()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    first_request = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    sys.exit(serve(Path(sys.argv[1]), sys.argv[2], first_request))
