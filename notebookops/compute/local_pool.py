"""Kernels started before their notebooks are known, so the first notebooks of a run do not wait
for a kernel start after the clone and submit (issue 17).

`prewarm` starts one detached pool process per worker slot as soon as a run knows it will use
the local backend. Each starts one kernel in a scratch folder and offers it in
`<runs root>/.pool/<id>.json`. A local runner `claim`s one (an atomic rename: one kernel, one
notebook, never shared) whose kernel name matches, attaches to it with `adopted_manager`,
moves it into the notebook's folder and runs the notebook on it; afterwards the kernel is shut
down as any other. A kernel nobody claims within `IDLE_SECONDS` is shut down by its pool process.

As root, permission bits do not keep a kernel from writing through a view's links into the
shared checkout (see staging.py), so a pool process first mounts the whole checkout cache
read-only in its own mount namespace, which its kernel inherits; a runner adopts such a kernel
only for a checkout inside that cache, and otherwise starts its own.

Started as `python -m notebookops.compute.local_pool POOL_DIR KERNEL_NAME IDLE_SECONDS`.
Standard library only at import time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

POOL_DIR = ".pool"
POOL_MODULE = "notebookops.compute.local_pool"
IDLE_SECONDS = 30.0
CHECKOUT_DIR_SETTING = "NOTEBOOKOPS_CHECKOUT_DIR"  # repo.py's setting, read without importing git


def checkout_root() -> Path:
    """The checkout cache folder, as notebookops.repo resolves it."""
    configured = os.environ.get(CHECKOUT_DIR_SETTING, "").strip()
    return Path(configured or Path(tempfile.gettempdir()) / "notebookops-checkouts").resolve()


class Pool:
    """The kernels one `prewarm` offered."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started_at = time.time()

    def offers(self) -> list[Path]:
        return sorted(self.folder.glob("*.json"))

    def withdraw(self) -> None:
        """Stop the offered kernels nobody claimed (their pool processes then exit)."""
        for offer in self.offers():
            taken = offer.with_name(f".{offer.stem}.withdrawn")
            try:
                os.rename(offer, taken)
                record = json.loads(taken.read_text(encoding="utf-8"))
                taken.unlink()
            except (OSError, ValueError):
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError, KeyError, ValueError):
                os.killpg(int(record["pid"]), signal.SIGKILL)


def prewarm(
    runs_root: Path, count: int, kernel_name: str = "python3", idle_seconds: float = IDLE_SECONDS
) -> Pool:
    """Start `count` pool kernels for runs under `runs_root`, one pool process each; returns
    in milliseconds. (local_kernelserver.prewarm forks them instead, where it can.)"""
    pool = Path(runs_root) / POOL_DIR
    start_processes(pool, count, kernel_name, idle_seconds)
    return Pool(pool)


def _kernel_env() -> dict[str, str]:
    """The same environment a runner gives its kernel (local.py puts the package on the path)."""
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return env


def start_processes(pool: Path, count: int, kernel_name: str, idle_seconds: float) -> None:
    """One detached pool process per kernel, each starting its kernel as jupyter_client does."""
    pool.mkdir(parents=True, exist_ok=True)
    env = _kernel_env()
    starters = []
    for _ in range(max(0, count)):
        with open(pool / "pool.log", "ab") as log:
            starters.append(
                subprocess.Popen(
                    [sys.executable, "-m", POOL_MODULE, str(pool), kernel_name, str(idle_seconds)],
                    cwd=pool,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    for starter in starters:  # each forks at once and exits
        starter.wait(timeout=60)


def claim(runs_root: Path, kernel_name: str, source: Path | None, dest: Path) -> dict | None:
    """Take one offered kernel of `kernel_name` (moved to `dest`), or None. As root, only a
    kernel whose read-only mount covers `source` is taken."""
    pool = Path(runs_root) / POOL_DIR
    try:
        offers = sorted(pool.glob("*.json"))
    except OSError:
        return None
    for offer in offers:
        try:
            record = json.loads(offer.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if record.get("kernelName") != kernel_name or not _alive(int(record.get("pid", 0))):
            continue
        if os.geteuid() == 0:
            protected = record.get("protectedRoot")
            if not protected or source is None or not _inside(source, Path(protected)):
                continue
        try:
            os.rename(offer, dest)  # atomic: exactly one runner gets it
        except OSError:
            continue
        return record
    return None


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def adopted_manager(base: type, record: dict[str, Any], kernel_name: str) -> Any:
    """A kernel manager of class `base` (an AsyncKernelManager) driving the pool kernel of
    `record`: connects by its connection file, and signals and stops it by its pid, since the
    process is not its child."""
    pid = int(record["pid"])

    class AdoptedKernelManager(base):  # type: ignore[misc, valid-type]
        adopted_pid = pid

        @property
        def has_kernel(self) -> bool:
            return _alive(pid)

        async def is_alive(self) -> bool:
            return _alive(pid)

        async def interrupt_kernel(self) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)

        async def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
            import asyncio

            if not now and _alive(pid):
                with contextlib.suppress(Exception):
                    msg = self.session.msg("shutdown_request", content={"restart": False})
                    self._connect_control_socket()
                    self.session.send(self._control_socket, msg)
                deadline = time.monotonic() + float(self.shutdown_wait_time)
                while _alive(pid) and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)

    km = AdoptedKernelManager(kernel_name=kernel_name)
    km.load_connection_file(record["connectionFile"])
    return km


async def move_into(client: Any, folder: Path, timeout: float = 30.0) -> None:
    """Make the adopted kernel's working folder the notebook's, as a fresh start there would
    (silently: no execution count, no name left in the user's namespace)."""
    code = f"__import__('os').chdir({str(folder)!r})"
    msg_id = client.execute(code, silent=True, store_history=False)
    deadline = time.monotonic() + timeout
    while True:
        reply = await client.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply.get("parent_header", {}).get("msg_id") == msg_id:
            if reply["content"].get("status") != "ok":
                raise RuntimeError(f"adopted kernel could not enter {folder}: {reply['content']}")
            return


# ------------------------------------------------------------------------------ pool process


def protect_checkout_cache(who: str) -> str | None:
    """As root, the checkout cache read-only in this process's mount namespace (the kernels
    it starts or forks inherit it); the folder so protected, or None (not root, or the mount
    was refused: then, as root, no runner adopts this process's kernels)."""
    if os.geteuid() != 0:
        return None
    from notebookops.compute.staging import _mount_read_only

    root = checkout_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        _mount_read_only(root)
    except OSError as exc:
        print(f"{who} without a read-only checkout cache ({exc})", flush=True)
        return None
    return str(root)


def _serve(pool: Path, kernel_name: str, idle_seconds: float) -> int:
    protected = protect_checkout_cache("pool kernel")
    from jupyter_client.manager import KernelManager

    ident = uuid.uuid4().hex[:12]
    scratch = pool / f"scratch-{ident}"
    scratch.mkdir()
    os.chdir(scratch)
    km = KernelManager(kernel_name=kernel_name)
    km.connection_file = str(pool / f"kernel-{ident}.connection")
    extra = ["--HistoryManager.hist_file=:memory:"] if km.ipykernel else []
    km.start_kernel(extra_arguments=extra)
    pid = km.provisioner.pid  # type: ignore[union-attr]
    offer = pool / f"{ident}.json"
    tmp = pool / f".{ident}.tmp"
    tmp.write_text(
        json.dumps(
            {
                "pid": pid,
                "connectionFile": km.connection_file,
                "kernelName": kernel_name,
                "protectedRoot": protected,
            }
        ),
        encoding="utf-8",
    )
    os.replace(tmp, offer)
    deadline = time.monotonic() + idle_seconds
    try:
        while offer.exists() and time.monotonic() < deadline and km.is_alive():
            time.sleep(0.1)
        expired = pool / f".{ident}.expired"
        with contextlib.suppress(OSError):
            os.rename(offer, expired)  # nobody claimed it: withdraw the offer, stop the kernel
            expired.unlink()
            km.shutdown_kernel(now=True)
            return 0
        # Claimed: the runner drives the kernel; stay its parent until it exits (reaping it).
        while km.is_alive():
            time.sleep(0.2)
        km.cleanup_resources()
        return 0
    finally:
        with contextlib.suppress(OSError):
            for leftover in scratch.iterdir():
                leftover.unlink()
            scratch.rmdir()


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(f"usage: python -m {__spec__.name if __spec__ else 'local_pool'} POOL KERNEL IDLE")
        return 2
    if os.fork():
        return 0
    os.setsid()
    try:
        code = _serve(Path(argv[1]), argv[2], float(argv[3]))
    except BaseException as exc:
        print(f"pool kernel failed: {type(exc).__name__}: {exc}", flush=True)
        code = 1
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
