"""The on-disk record of one local run, shared by the backend (any process) and the detached runner.

Layout of a run folder `<runs root>/<run key>/`:

- `run.json`     what to run (written once by submit)
- `state.json`   the current state, replaced atomically; terminal states are sticky
- `state.lock`   flock guarding state transitions, so cancel, timeout and completion cannot
                 overwrite each other's verdict
- `runner.json`  pid of the detached runner (its presence marks a completed submit)
- `kernel.json`  pid and start time of the kernel, so the kernel's process group can be killed
- `work/`        the isolated view of the checkout (staging.py); `output/` the executed notebook;
                 `runner.log`

Standard library plus psutil (a dependency of ipykernel, so present wherever notebooks run locally).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from notebookops.compute.base import QUEUED, RUNNING, TERMINAL_STATES

RUNNER_MODULE = "notebookops.compute.local_runner"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_json_atomic(path: Path, data: Any) -> None:
    """Readers see the old or the new file, never a half-written one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    """Exclusive lock across threads and processes; the kernel releases it if the holder dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class RunFiles:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.run_json = run_dir / "run.json"
        self.state_json = run_dir / "state.json"
        self.state_lock = run_dir / "state.lock"
        self.runner_json = run_dir / "runner.json"
        self.kernel_json = run_dir / "kernel.json"
        self.work = run_dir / "work"
        self.output_dir = run_dir / "output"
        self.log = run_dir / "runner.log"
        self.pool_kernel = run_dir / "pool-kernel.json"  # the prewarmed kernel it adopted, if any

    def output_path(self, notebook: str) -> Path:
        return self.output_dir / Path(notebook).name

    def read_state(self) -> dict[str, Any]:
        return read_json(self.state_json)

    def init_state(self) -> None:
        write_json_atomic(self.state_json, {"state": QUEUED, "submittedAt": now_iso()})

    def mark_running(self) -> bool:
        """Queued -> running; False when the run already ended (canceled while it waited)."""
        with flocked(self.state_lock):
            state = self.read_state()
            if state.get("state") in TERMINAL_STATES:
                return False
            state.update(state=RUNNING, startedAt=now_iso())
            write_json_atomic(self.state_json, state)
            return True

    def finalize(
        self, state: str, message: str | None = None, error: dict[str, Any] | None = None
    ) -> bool:
        """Record the verdict unless another one got there first; True when this call decided."""
        if state not in TERMINAL_STATES:
            raise ValueError(f"finalize: state has invalid value {state!r}")
        with flocked(self.state_lock):
            current = self.read_state()
            if current.get("state") in TERMINAL_STATES:
                return False
            current.update(state=state, endedAt=now_iso(), message=message, error=error)
            write_json_atomic(self.state_json, current)
            return True

    def record_runner(self, pid: int) -> None:
        write_json_atomic(self.runner_json, {"pid": pid, "createTime": _create_time(pid)})

    def runner_pid(self) -> int | None:
        return self._runner_record()[0]

    def _runner_record(self) -> tuple[int | None, float | None]:
        """The runner's pid and start time as submit recorded them (None when absent)."""
        try:
            record = read_json(self.runner_json)
            created = record.get("createTime")
            return int(record["pid"]), None if created is None else float(created)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None, None

    def record_kernel(self, pid: int) -> None:
        write_json_atomic(self.kernel_json, {"pid": pid, "createTime": _create_time(pid)})

    def runner_alive(self) -> bool:
        """Is the runner that submit started still running (and not a recycled pid)?"""
        pid, created = self._runner_record()
        if pid is None:
            return False
        import psutil

        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return False
            # A recycled pid has another start time. A runner forked by the fork server has the
            # server's command line; one started on its own names its run folder there.
            if created is not None:
                return abs(process.create_time() - created) < 0.05
            return str(self.run_dir) in process.cmdline()
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True

    def kill_runner_group(self) -> None:
        pid = self.runner_pid()
        if pid is not None and (self.runner_alive() or not _exists(pid)):
            _killpg(pid)

    def kill_kernel_group(self) -> None:
        try:
            record = read_json(self.kernel_json)
            pid, created = int(record["pid"]), record.get("createTime")
        except (OSError, ValueError, KeyError, TypeError):
            return
        if not _exists(pid) or _create_time(pid) == created:
            _killpg(pid)


def _exists(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def _killpg(pgid: int) -> None:
    # Kernels and runners lead their own sessions, so pid == pgid; a group whose leader is gone
    # keeps its number reserved while any member lives, so this cannot hit a stranger's group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
