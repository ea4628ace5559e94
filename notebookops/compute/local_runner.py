"""The detached process that executes one local run.

Started as `python -m notebookops.compute.local_runner RUN_DIR`.

It forks at once and the first process exits after recording the second one's pid, so the run is
not a child of whoever submitted it (no zombies in the host, and it survives the host's death).
The remaining process leads its own session, waits for a worker slot, runs the notebook with
papermill from the notebook's own folder, and writes the verdict to `state.json`.

Kept to the standard library at import time: papermill is imported only in the detached process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from notebookops.compute.base import CANCELED, FAILED, SUCCEEDED, TIMED_OUT, RunError
from notebookops.compute.local_state import RunFiles, read_json
from notebookops.notebook_errors import extract_error, load_notebook_json, source_cell_index

# After a timeout or cancel kills the kernel, papermill needs a moment to notice and save the
# notebook; past this the runner gives up on a clean exit and kills itself.
ABORT_GRACE_SECONDS = 15.0
KERNEL_START_TIMEOUT_SECONDS = 60
SLOTS_DIR = ".slots"


class Abort:
    """Why the run is being stopped early (timeout or cancel), and the kernel to kill for it."""

    def __init__(self, files: RunFiles) -> None:
        self.files = files
        self.reason: str | None = None
        self.message: str | None = None
        self.kernel_pid: int | None = None
        # papermill's index of the cell being executed: after a kill, papermill marks that cell
        # "completed", so the notebook alone cannot say where the run was stuck.
        self.current_cell: int | None = None
        self._lock = threading.Lock()

    def trigger(self, reason: str, message: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason, self.message = reason, message
        # Killing the kernel makes papermill stop at the running cell and save what it has.
        self.kill_kernel()
        watchdog = threading.Timer(ABORT_GRACE_SECONDS, self._give_up)
        watchdog.daemon = True
        watchdog.start()

    def kernel_started(self, pid: int) -> None:
        self.kernel_pid = pid
        self.files.record_kernel(pid)
        if self.reason is not None:  # the abort came while the kernel was starting
            self.kill_kernel()

    def kill_kernel(self) -> None:
        if self.kernel_pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.kernel_pid, signal.SIGKILL)

    def _give_up(self) -> None:
        self.files.finalize(self.reason or FAILED, self.message)
        os.killpg(0, signal.SIGKILL)


def _acquire_slot(slots_dir: Path, workers: int, abort: Abort) -> int | None:
    """Hold one of `workers` slot files under the runs root; the kernel frees it when we exit."""
    slots_dir.mkdir(exist_ok=True)
    fds = [os.open(slots_dir / f"slot-{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(workers)]
    delay = 0.02
    try:
        while abort.reason is None:
            for fd in fds:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                fds.remove(fd)
                return fd
            # Waiting only happens when every slot is busy, i.e. notebooks are running anyway.
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        return None
    finally:
        for fd in fds:
            os.close(fd)


def _kernel_manager_class(abort: Abort) -> type:
    from jupyter_client.manager import AsyncKernelManager

    class RecordingKernelManager(AsyncKernelManager):
        """Remembers the kernel's pid: kernels lead their own session, out of the runner's group."""

        async def post_start_kernel(self, **kw: Any) -> None:
            pid = getattr(self.provisioner, "pid", None)
            if pid is not None:
                abort.kernel_started(pid)
            await super().post_start_kernel(**kw)

    return RecordingKernelManager


def _kernel_name(config: dict[str, Any], notebook: Path) -> str | None:
    if config.get("kernel"):
        return str(config["kernel"])
    nb = load_notebook_json(notebook) or {}
    has_kernelspec = bool(((nb.get("metadata") or {}).get("kernelspec") or {}).get("name"))
    # Notebooks written by tools without a kernelspec would make papermill give up; python3 is
    # what such notebooks are in practice.
    return None if has_kernelspec else "python3"


def _execute(config: dict[str, Any], files: RunFiles, abort: Abort) -> BaseException | None:
    """Run the notebook; retry once when the kernel fails to start. Returns the failure, if any."""
    import papermill  # already loaded by _preload
    from zmq.error import ZMQBaseError

    source = files.work / config["notebook"]
    output = files.output_path(config["notebook"])
    kernel_name = _kernel_name(config, source)
    start_failures = (RuntimeError, TimeoutError, ConnectionError, ZMQBaseError)
    for attempt in (1, 2):
        cell_started = threading.Event()

        def on_cell_start(cell_index: int, **_: Any) -> None:
            abort.current_cell = cell_index
            cell_started.set()  # noqa: B023 (used during this attempt only)

        try:
            papermill.execute_notebook(
                str(source),
                str(output),
                parameters=config.get("parameters") or {},
                kernel_name=kernel_name,
                progress_bar=False,
                log_output=False,
                start_timeout=KERNEL_START_TIMEOUT_SECONDS,
                kernel_manager_class=_kernel_manager_class(abort),
                on_cell_start=on_cell_start,
            )
            return None
        except start_failures as exc:
            if cell_started.is_set() or abort.reason is not None or attempt == 2:
                return exc
            print(f"kernel start failed ({type(exc).__name__}: {exc}); retrying once", flush=True)
        except Exception as exc:
            return exc
    raise AssertionError("unreachable")


def _error_for(failure: BaseException, output: Path, abort: Abort) -> RunError:
    nb = load_notebook_json(output) or {}
    found = extract_error(nb)
    if found is not None:
        return found
    # No error output in the notebook: the kernel died, or papermill failed around the cells.
    return RunError(
        cell_index=source_cell_index(nb, abort.current_cell),
        ename=type(failure).__name__,
        evalue=str(failure),
        traceback="",
    )


def _preload() -> None:
    """Import the heavy modules before queueing for a slot: queued runs pay for it while waiting."""
    import jupyter_client.manager
    import papermill
    import zmq.error

    del jupyter_client, papermill, zmq


def run(run_dir: Path) -> int:
    files = RunFiles(run_dir)
    config = read_json(files.run_json)
    abort = Abort(files)
    signal.signal(signal.SIGTERM, lambda *_: abort.trigger(CANCELED, "canceled on request"))

    _preload()
    slot = _acquire_slot(Path(config["runsRoot"]) / SLOTS_DIR, int(config["workers"]), abort)
    if slot is None or not files.mark_running():
        return 0
    # Our own process, our own cwd: the notebook sees its folder like it does in Jupyter.
    os.chdir((files.work / config["notebook"]).parent)
    timeout = config.get("timeoutSeconds")
    timer = None
    if timeout:
        message = f"notebook exceeded its timeout of {timeout:g} s"
        timer = threading.Timer(float(timeout), abort.trigger, args=(TIMED_OUT, message))
        timer.daemon = True
        timer.start()
    failure = _execute(config, files, abort)
    if timer is not None:
        timer.cancel()

    output = files.output_path(config["notebook"])
    if abort.reason is not None:
        nb = load_notebook_json(output) or {}
        error = None
        if abort.reason == TIMED_OUT:
            cell = source_cell_index(nb, abort.current_cell)
            error = RunError(cell, "TimeoutError", abort.message or "", "")
        files.finalize(abort.reason, abort.message, error.to_dict() if error else None)
    elif failure is None:
        files.finalize(SUCCEEDED)
    else:
        error = _error_for(failure, output, abort)
        files.finalize(FAILED, f"{error.ename}: {error.evalue}", error.to_dict())
    abort.kill_kernel()  # a kernel that survived papermill's shutdown must not outlive the run
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: python -m {__spec__.name if __spec__ else 'local_runner'} RUN_DIR")
        return 2
    run_dir = Path(argv[1])
    files = RunFiles(run_dir)
    child = os.fork()
    if child:
        files.record_runner(child)
        return 0
    os.setsid()
    try:
        code = run(run_dir)
    except BaseException as exc:
        files.finalize(FAILED, f"local runner crashed: {type(exc).__name__}: {exc}")
        raise
    sys.stdout.flush()
    os._exit(code)  # skip interpreter teardown: the verdict is on disk already


if __name__ == "__main__":
    sys.exit(main(sys.argv))
