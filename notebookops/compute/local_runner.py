"""The detached process that executes one local run.

Started as `python -m notebookops.compute.local_runner RUN_DIR`.

It forks at once and the first process exits after recording the second one's pid, so the run is
not a child of whoever submitted it (no zombies in the host, and it survives the host's death).
The remaining process leads its own session and then, to keep the worker slots busy with notebooks
rather than with start-up:

1. waits for a standby slot (at most `workers` runs get ready at once, so 500 queued runs do not
   start 500 kernels), with nothing but the standard library loaded,
2. chooses the kernel (a missing one fails the run here), starts its kernel from the notebook's own folder and imports papermill while the kernel boots,
   and waits until the kernel answers: this happens while other runs hold the worker slots,
3. hands the warm kernel to papermill, which reads, parameterizes and first saves the notebook;
   at nbclient's `on_notebook_start` it waits for a worker slot (at most `workers` notebooks
   execute at once) and gives up its standby slot, so the next run starts warming its kernel
   while this one executes (Turn),
4. runs the notebook's cells, frees its worker slot once the last code cell has executed (or one
   failed), writes the verdict to `state.json` and only then shuts the kernel down.

A warm kernel that fails to start or dies while waiting is replaced by a fresh start (once).
Kept to the standard library at import time: papermill is imported only in the detached process.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from notebookops.compute import local_pool
from notebookops.compute.base import CANCELED, FAILED, SUCCEEDED, TIMED_OUT, RunError
from notebookops.compute.local_state import RunFiles, read_json, write_json_atomic
from notebookops.compute.staging import protect_view
from notebookops.notebook_errors import first_error, load_notebook_json, source_cell_index

# After a timeout or cancel kills the kernel, papermill needs a moment to notice and save the
# notebook; past this the runner gives up on a clean exit and kills itself.
ABORT_GRACE_SECONDS = 15.0
KERNEL_START_TIMEOUT_SECONDS = 60
SLOTS_DIR = ".slots"
STANDBY_DIR = ".standby"
# Graceful kernel shutdown after the verdict (papermill does the same), then the group is killed.
SHUTDOWN_SECONDS = 5.0


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


def _acquire_slot(
    slots_dir: Path, workers: int, abort: Abort, max_delay: float = 0.25
) -> int | None:
    """Hold one of `workers` slot files under the runs root; the kernel frees it when we exit.

    Waiters poll with a backoff capped at `max_delay`: a worker slot is awaited by warm runs
    only (at most `workers` of them), so they poll briskly and a freed slot is taken at once.
    """
    slots_dir.mkdir(exist_ok=True)
    fds = [os.open(slots_dir / f"slot-{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(workers)]
    delay = min(0.02, max_delay)
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
            delay = min(delay * 1.5, max_delay)
        return None
    finally:
        for fd in fds:
            os.close(fd)


def _kernel_manager_class(abort: Abort, config: dict[str, Any] | None = None) -> type:
    """`config`: the run's, when its kernels may be forked by the kernel server of its runs
    root (local_kernelserver.py)."""
    from jupyter_client.manager import AsyncKernelManager

    from notebookops.compute import local_kernelserver

    forking = None
    if (
        config is not None
        and config.get("runsRoot")
        and config.get("forkKernels", True)
        and local_kernelserver.enabled()
    ):
        protect = str(config["source"]) if config.get("source") else None
        forking = local_kernelserver.provisioner_class(Path(config["runsRoot"]), protect)

    class RecordingKernelManager(AsyncKernelManager):
        """Remembers the kernel's pid: kernels lead their own session, out of the runner's group.

        It also hands nbclient the client the warm-up already connected and waited for, once:
        a fresh client's wait_for_ready ends by draining IOPub until 0.2 s pass quietly, which
        was most of the per-notebook cost left after the kernel start itself.
        """

        ready_client: Any = None

        async def _async_pre_start_kernel(self, **kw: Any) -> Any:
            if forking is not None and self.provisioner is None:
                import uuid

                self.kernel_id = self.kernel_id or kw.pop("kernel_id", str(uuid.uuid4()))
                self.provisioner = forking(
                    kernel_id=self.kernel_id, kernel_spec=self.kernel_spec, parent=self
                )
            return await super()._async_pre_start_kernel(**kw)

        pre_start_kernel = _async_pre_start_kernel  # what start_kernel calls

        def client(self, **kw: Any) -> Any:
            if self.ready_client is not None:
                ready, self.ready_client = self.ready_client, None
                return ready
            return super().client(**kw)

        async def post_start_kernel(self, **kw: Any) -> None:
            pid = getattr(self.provisioner, "pid", None)
            if pid is not None:
                abort.kernel_started(pid)
            await super().post_start_kernel(**kw)

    return RecordingKernelManager


# The kernelspec written for `compute.python`: found through JUPYTER_PATH, this run's only.
PYTHON_KERNEL_NAME = "notebookops-python"
KERNEL_HINT = (
    "name an installed kernel in compute.kernel, or a Python environment that has ipykernel "
    "in compute.python (both may be set per notebook)"
)


class KernelProblem(Exception):
    """The environment the notebook asks for is not here: the run fails before it starts."""


def _kernelspec_of(notebook: Path) -> dict[str, Any]:
    """The notebook's kernelspec as papermill reads it (nbformat 3 converted); {} when absent."""
    nb = _read_committed(notebook) or {}
    spec = (nb.get("metadata") or {}).get("kernelspec")
    return spec if isinstance(spec, dict) else {}


def _read_committed(notebook: Path) -> dict[str, Any] | None:
    """The notebook as committed, converted to nbformat 4 as papermill converts it."""
    import nbformat

    try:
        return dict(nbformat.reads(notebook.read_text(encoding="utf-8"), as_version=4))
    except Exception:  # nbformat raises many types; the raw JSON is the best left to go by
        return load_notebook_json(notebook)


def _python_executable(value: str) -> Path:
    """`compute.python` names a virtual environment's folder or a Python executable in it."""
    path = Path(value)
    candidates = (
        [path] if not path.is_dir() else [path / "bin" / "python", path / "bin" / "python3"]
    )
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise KernelProblem(
        f"compute.python {value!r} is not a Python executable or a virtual environment folder "
        "with bin/python on this host"
    )


def _select_kernel(config: dict[str, Any], files: RunFiles) -> None:
    """Decide the kernel once the run holds a standby slot (a missing one fails before any
    kernel or worker slot is taken), and record it in `config` as `kernelName` and `language` for the warm-up and papermill.

    Order: `compute.python` (a kernelspec for that interpreter is written into the run folder),
    `compute.kernel`, the notebook's own kernelspec, else python3. Raises KernelProblem.
    """
    import subprocess

    from jupyter_client.kernelspec import KernelSpecManager

    config["language"] = None
    if config.get("python"):
        python = _python_executable(str(config["python"]))
        probe = subprocess.run(
            [
                str(python),
                "-c",
                "import importlib.util as u, sys; sys.exit(u.find_spec('ipykernel') is None)",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if probe.returncode != 0:
            raise KernelProblem(
                f"compute.python {config['python']!r} cannot run notebooks: ipykernel is not "
                f"installed there (install it with: {python} -m pip install ipykernel)"
            )
        spec_dir = files.run_dir / "jupyter" / "kernels" / PYTHON_KERNEL_NAME
        spec_dir.mkdir(parents=True, exist_ok=True)
        venv = python.parent.parent
        spec = {
            "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({venv})",
            "language": "python",
            # Shell commands and subprocesses of the notebook see the same environment.
            "env": {
                "VIRTUAL_ENV": str(venv),
                "PATH": os.pathsep.join([str(python.parent), os.environ.get("PATH", "")]),
            },
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            p for p in (str(files.run_dir / "jupyter"), os.environ.get("JUPYTER_PATH", "")) if p
        )
        config["kernelName"], config["language"] = PYTHON_KERNEL_NAME, "python"
        return
    own = _kernelspec_of(files.work / config["notebook"]).get("name")
    name = config.get("kernel") or own
    if not name:
        # Notebooks written by tools without a kernelspec would make papermill give up; python3
        # is what such notebooks are in practice.
        config["kernelName"], config["language"] = "python3", "python"
        return
    specs = KernelSpecManager()
    installed = sorted(specs.find_kernel_specs())
    if name not in installed:
        whose = "compute.kernel" if config.get("kernel") else "the notebook's kernelspec"
        raise KernelProblem(
            f"No such kernel named {name!r} ({whose}) on this host; installed kernels: "
            f"{', '.join(installed) or 'none'}. Install that kernel here, or {KERNEL_HINT}"
        )
    config["kernelName"] = str(name)
    # The kernel's language, not the notebook's (which may say nothing): papermill writes the
    # injected parameters in it.
    with contextlib.suppress(Exception):
        config["language"] = specs.get_kernel_spec(str(name)).language or None


def _kernel_name(config: dict[str, Any], notebook: Path) -> str:
    return str(config["kernelName"])


def _warm_kernel_name(config: dict[str, Any], notebook: Path) -> str:
    """The kernel papermill will start (see _select_kernel)."""
    return str(config["kernelName"])


async def _launch(km: Any) -> None:
    from jupyter_core.utils import ensure_async

    # What nbclient passes when it starts a kernel itself: no history database per run.
    extra = ["--HistoryManager.hist_file=:memory:"] if getattr(km, "ipykernel", False) else []
    await ensure_async(km.start_kernel(extra_arguments=extra))


# How long one round of the readiness check waits for the kernel's IOPub status messages.
# jupyter_client waits 0.2 s: its SUB socket often subscribes just after the kernel has
# published the first reply's statuses (ZeroMQ's slow joiner), so a ready kernel cost every
# run 0.2 s before its first cell. A shorter wait only asks again sooner.
IOPUB_CHECK_SECONDS = 0.02


async def _wait_ready(km: Any, timeout: float) -> None:
    """jupyter_client's wait_for_ready (a kernel_info reply on shell, then proof that IOPub is
    connected), asking again every IOPUB_CHECK_SECONDS instead of every 0.2 s."""
    from queue import Empty

    from jupyter_core.utils import ensure_async

    client = km.client()
    await ensure_async(client.start_channels())
    try:
        deadline = time.monotonic() + timeout
        while True:
            client.kernel_info()
            try:
                reply = await client.shell_channel.get_msg(timeout=1)
            except Empty:
                reply = None
            if reply is not None and reply["msg_type"] == "kernel_info_reply":
                try:
                    await client.iopub_channel.get_msg(timeout=IOPUB_CHECK_SECONDS)
                except Empty:
                    pass
                else:
                    client._handle_kernel_info_reply(reply)  # the protocol version it speaks
                    break
            if not await ensure_async(km.is_alive()):
                raise RuntimeError("Kernel died before replying to kernel_info")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kernel didn't respond in {timeout:g} seconds")
    except BaseException:
        await ensure_async(client.stop_channels())
        raise

    # nbclient will start the channels and wait again on the client it gets; this one is
    # started and ready already (a heartbeat thread cannot even be started twice).
    async def already_ready(timeout: float | None = None) -> None:
        return None

    client.start_channels = lambda *args, **kwargs: None
    client.wait_for_ready = already_ready
    km.ready_client = client


def _warm_kernel(config: dict[str, Any], files: RunFiles, abort: Abort) -> Any | None:
    """Start this run's kernel before it holds a worker slot; papermill is imported meanwhile.

    Returns the ready kernel manager, or None when the start failed (papermill then starts a
    kernel itself: that is the one retry).
    """
    from jupyter_core.utils import run_sync

    km = None
    try:
        name = _warm_kernel_name(config, files.work / config["notebook"])
        source = Path(config["source"]) if config.get("source") else None
        offer = local_pool.claim(Path(config["runsRoot"]), name, source, files.pool_kernel)
        if offer is not None:  # started before the clone finished (local_pool.py)
            km = local_pool.adopted_manager(_kernel_manager_class(abort), offer, name)
            abort.kernel_started(int(offer["pid"]))
            _preload()
            run_sync(_wait_ready)(km, KERNEL_START_TIMEOUT_SECONDS)
            run_sync(local_pool.move_into)(km.ready_client, Path.cwd())
        else:
            km = _kernel_manager_class(abort, config)(kernel_name=name)
            run_sync(_launch)(km)
            _preload()  # the kernel boots in its own process while this imports papermill
            run_sync(_wait_ready)(km, KERNEL_START_TIMEOUT_SECONDS)
        if abort.reason is not None:
            raise RuntimeError("run stopped while its kernel was starting")
        return km
    except Exception as exc:
        config["forkKernels"] = False  # the retry starts its kernel as jupyter_client does
        if abort.reason is None:
            print(f"kernel start failed ({type(exc).__name__}: {exc}); retrying once", flush=True)
        abort.kill_kernel()
        abort.kernel_pid = None
        if km is not None:
            with contextlib.suppress(Exception):
                run_sync(_cleanup)(km)
        _preload()
        return None


async def _cleanup(km: Any) -> None:
    from jupyter_core.utils import ensure_async

    await ensure_async(km.cleanup_resources())


async def _shutdown(km: Any) -> None:
    from jupyter_core.utils import ensure_async

    if await ensure_async(km.is_alive()):
        await ensure_async(km.shutdown_kernel(now=False))
    await ensure_async(km.cleanup_resources())


class NoTurn(Exception):
    """The run ended (canceled) while it waited for a worker slot: nothing is executed."""


class Turn:
    """The run's hold on a worker slot, taken by papermill's hooks: at nbclient's
    `on_notebook_start` (papermill has read, parameterized and first saved the notebook while
    other notebooks still held the slots) and given back when the last code cell has executed
    or one failed (papermill's last saves and the verdict overlap the next notebook). Its limit
    counts from the moment it holds the slot with its kernel ready, so neither waiting for a
    slot nor starting the kernel eats into it."""

    def __init__(
        self,
        config: dict[str, Any],
        files: RunFiles,
        abort: Abort,
        standby: int,
        send_event_url: str | None,
    ) -> None:
        self.config, self.files, self.abort = config, files, abort
        self.standby: int | None = standby
        self.send_event_url = send_event_url
        self.slot: int | None = None
        self.began = False
        self.last_code_cell: int | None = None
        self.timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def begin(self, notebook: Any = None, **_: Any) -> None:
        """nbclient's on_notebook_start (again on papermill's retry: held once)."""
        if notebook is not None:
            code = [i for i, c in enumerate(notebook.cells) if c.get("cell_type") == "code"]
            self.last_code_cell = code[-1] if code else None
        if self.began:
            return
        runs_root, workers = Path(self.config["runsRoot"]), int(self.config["workers"])
        self.slot = _acquire_slot(runs_root / SLOTS_DIR, workers, self.abort, max_delay=0.01)
        if self.standby is not None:
            os.close(self.standby)  # the next queued run may warm its kernel meanwhile
            self.standby = None
        if self.slot is None or not self.files.mark_running():
            self.release()
            raise NoTurn("the run ended while it waited for a worker")
        self.began = True
        announce_start(self.files, self.send_event_url)
        timeout = self.config.get("timeoutSeconds")
        if timeout:
            limit = limit_text(float(timeout))
            self.timer = threading.Timer(float(timeout), self.abort.trigger, (TIMED_OUT, limit))
            self.timer.daemon = True
            self.timer.start()

    def cell_executed(self, cell_index: int | None = None, **_: Any) -> None:
        """nbclient's on_cell_executed: after the last code cell the notebook's own code is
        done (papermill's saves and the verdict remain)."""
        if cell_index is not None and cell_index == self.last_code_cell:
            self.release()

    def cell_failed(self, **_: Any) -> None:
        """nbclient's on_cell_error: papermill runs no further cell."""
        self.release()

    def release(self) -> None:
        with self._lock:
            slot, self.slot = self.slot, None
        if slot is not None:
            os.close(slot)

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


def _execute(
    config: dict[str, Any], files: RunFiles, abort: Abort, km: Any | None, turn: Turn
) -> BaseException | None:
    """Run the notebook on the warm kernel `km`, or on a kernel papermill starts (when `km` is
    None, the warm start already failed once), in its `turn` for a worker slot. A kernel that
    fails to start or dies before the first cell is replaced once. Returns the failure, if
    any."""
    import papermill  # already loaded by _preload
    from zmq.error import ZMQBaseError

    source = files.work / config["notebook"]
    output = files.output_path(config["notebook"])
    kernel_name = _kernel_name(config, source)
    start_failures = (RuntimeError, TimeoutError, ConnectionError, ZMQBaseError)
    for attempt in (1, 2) if km is not None else (2,):
        cell_started = threading.Event()

        def on_cell_start(cell_index: int, **_: Any) -> None:
            abort.current_cell = cell_index
            cell_started.set()  # noqa: B023 (used during this attempt only)

        kernel: dict[str, Any] = (
            {"km": km} if attempt == 1 else {"kernel_manager_class": _kernel_manager_class(abort)}
        )
        try:
            if attempt == 2:
                # papermill starts this kernel inside the turn, as before the hooks: a start
                # that hangs meets the notebook's limit.
                turn.begin()
            papermill.execute_notebook(
                str(source),
                str(output),
                parameters=config.get("parameters") or {},
                kernel_name=kernel_name,
                language=config.get("language"),
                progress_bar=False,
                log_output=False,
                start_timeout=KERNEL_START_TIMEOUT_SECONDS,
                on_notebook_start=turn.begin,
                on_cell_start=on_cell_start,
                on_cell_executed=turn.cell_executed,
                on_cell_error=turn.cell_failed,
                **kernel,
            )
            return None
        except NoTurn as exc:
            return exc
        except start_failures as exc:
            if cell_started.is_set() or abort.reason is not None or attempt == 2:
                return exc
            print(f"kernel start failed ({type(exc).__name__}: {exc}); retrying once", flush=True)
            abort.kill_kernel()
        except Exception as exc:
            return exc
    raise AssertionError("unreachable")


def _error_for(
    failure: BaseException, output: Path, abort: Abort, committed: dict[str, Any] | None
) -> RunError | None:
    """The error that fails the notebook, None when every error was allowed (raises-exception)."""
    from papermill.exceptions import PapermillExecutionError

    nb = load_notebook_json(output) or {}
    found = first_error(nb, committed)
    if isinstance(failure, PapermillExecutionError):
        # papermill blames the first error output, even one its own nbclient allowed; its
        # markers then point at that cell: point them at the cell that failed, or remove them.
        _restate_markers(output, nb, found[0] if found else None)
        return found[1] if found else None
    if found is not None:
        return found[1]
    # No error output in the notebook: the kernel died, or papermill failed around the cells.
    return RunError(
        cell_index=source_cell_index(nb, abort.current_cell, committed),
        ename=type(failure).__name__,
        evalue=str(failure),
        traceback="",
    )


def _restate_markers(output: Path, nb: dict[str, Any], failed_at: int | None) -> None:
    """papermill's two red marker cells, before the cell that failed the notebook (if any)."""
    from papermill.execute import ERROR_ANCHOR_MSG, ERROR_MARKER_TAG, ERROR_MESSAGE_TEMPLATE

    cells = nb.get("cells") or []
    if not cells:
        return
    kept, position = [], None
    for index, cell in enumerate(cells):
        if index == failed_at:
            position = len(kept)
        if ERROR_MARKER_TAG not in ((cell.get("metadata") or {}).get("tags") or []):
            kept.append(cell)
    if position is not None:
        count = kept[position].get("execution_count")

        def marker(text: str) -> dict[str, Any]:
            return {
                "cell_type": "markdown",
                "id": f"papermill-error-{len(kept)}",
                "metadata": {"tags": [ERROR_MARKER_TAG]},
                "source": text,
            }

        kept.insert(position, marker(ERROR_ANCHOR_MSG))
        kept.insert(0, marker(ERROR_MESSAGE_TEMPLATE % str(count)))
    nb["cells"] = kept
    write_json_atomic(output, nb)


def limit_text(seconds: float) -> str:
    """How the message names the limit: in the message's own unit, minutes."""
    return f"timeoutMinutes {seconds / 60:.4g} reached"


def timeout_message(limit: str, executed_index: int | None, cell: int | None) -> str:
    """`timeoutMinutes 3 reached in cell 5`: the limit, and where the notebook was stuck."""
    if cell is not None:
        return f"{limit} in cell {cell}"
    if executed_index is not None:  # a cell papermill inserted: the injected parameters
        return f"{limit} in the injected parameters cell"
    return f"{limit} before the first cell started (the kernel was starting)"


def _ensure_partial_output(source: Path, output: Path) -> None:
    """A stopped run always leaves a notebook: papermill saves one before its kernel starts
    and at every cell, but a stop that lands before papermill got that far would leave none;
    then the notebook as committed stands in, so there is always something to open."""
    if load_notebook_json(output) is not None:
        return
    with contextlib.suppress(OSError):
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(source.read_bytes())


# papermill's remote stores (Azure Blob, Data Lake, S3), each imported when its library is
# installed. azure-ai-ml brings azure-storage-blob, so every runner paid some 0.5 s of CPU for
# storage clients it never uses: the runner reads and writes local files only. Marked missing,
# papermill treats them as absent libraries (its own fallback).
_REMOTE_STORES = ("papermill.abs", "papermill.adl", "papermill.s3")


def _preload() -> None:
    """Import the heavy modules before queueing for a slot: queued runs pay for it while waiting."""
    for name in _REMOTE_STORES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    import jupyter_client.manager
    import papermill
    import zmq.error

    del jupyter_client, papermill, zmq


_ANNOUNCED: list[bool] = []


def announce_start(files: RunFiles, send_event_url: str | None) -> threading.Thread | None:
    """Tell the waiting orchestration the notebook started executing (its progress shows it
    running, as a long poll did), from a thread: the notebook does not wait for the host."""
    if not send_event_url:
        return None
    from notebookops.run_events import post_run_status

    def post() -> None:
        problem = post_run_status(send_event_url, files.run_dir.name, "running")
        if problem:  # never the URL: it holds the host's key
            print(f"run start not announced: {problem}", flush=True)

    thread = threading.Thread(target=post, name="announce-start", daemon=True)
    thread.start()
    return thread


def announce_end(files: RunFiles, send_event_url: str | None) -> None:
    """Tell the waiting orchestration this run ended (`runStatusChanged`, as Event Grid does
    for Azure ML), once, best effort: the orchestrator's safety poll stays the truth."""
    if not send_event_url or _ANNOUNCED:
        return
    from notebookops.compute.base import TERMINAL_STATES
    from notebookops.run_events import post_run_status

    state = files.read_state().get("state")
    if state not in TERMINAL_STATES:
        return
    _ANNOUNCED.append(True)
    problem = post_run_status(send_event_url, files.run_dir.name, str(state))
    if problem:  # never the URL: it holds the host's key
        print(f"run end not announced: {problem}; the orchestrator's poll will see it", flush=True)


def _read_send_event_url() -> str | None:
    """What the submit handed over on stdin (see LocalBackend._start_runner); nothing when
    stdin is not a pipe or file (a runner started by hand)."""
    import stat

    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return None
    if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode)):
        return None
    text = sys.stdin.read(4096).strip()
    return text or None


def run(run_dir: Path, send_event_url: str | None = None) -> int:
    files = RunFiles(run_dir)
    config = read_json(files.run_json)
    abort = Abort(files)
    signal.signal(signal.SIGTERM, lambda *_: abort.trigger(CANCELED, "canceled on request"))

    runs_root, workers = Path(config["runsRoot"]), int(config["workers"])
    # Queued runs wait with the standard library only: choosing the kernel loads
    # jupyter_client and nbformat (some 0.5 s of CPU and 30 MB each), which 500 queued runs
    # would otherwise pay at once, while the first notebooks' kernels need the CPU.
    standby = _acquire_slot(runs_root / STANDBY_DIR, workers, abort)
    if standby is None:
        return 0
    try:
        _select_kernel(config, files)
    except KernelProblem as exc:
        os.close(standby)
        error = RunError(cell_index=None, ename="NoSuchKernel", evalue=str(exc))
        files.finalize(FAILED, str(exc), error.to_dict())
        return 0
    if config.get("source"):  # before any kernel exists: it inherits the protection
        protect_view(files.work, Path(config["source"]))
    # Our own process, our own cwd: the kernel, started from here, sees the notebook's folder
    # like it does in Jupyter.
    os.chdir((files.work / config["notebook"]).parent)
    km = _warm_kernel(config, files, abort)
    if km is None and abort.reason is None:
        # The one retry happens here too, while the run is still queued: a kernel start is
        # not the notebook's execution and must not eat into its limit.
        km = _warm_kernel(config, files, abort)
    turn = Turn(config, files, abort, standby, send_event_url)
    failure = _execute(config, files, abort, km, turn)
    turn.stop_timer()
    output = files.output_path(config["notebook"])
    if not turn.began:  # canceled while it waited for a worker: it never ran
        abort.kill_kernel()
        if isinstance(failure, NoTurn):
            output.unlink(missing_ok=True)  # papermill's unexecuted copy, not an output
            return 0

    committed = _read_committed(files.work / config["notebook"])
    if abort.reason is not None:
        _ensure_partial_output(files.work / config["notebook"], output)
        nb = load_notebook_json(output) or {}
        error, message = None, abort.message
        if abort.reason == TIMED_OUT:
            cell = source_cell_index(nb, abort.current_cell, committed)
            message = timeout_message(abort.message or "", abort.current_cell, cell)
            error = RunError(cell, "TimeoutError", abort.message or "", "")
        files.finalize(abort.reason, message, error.to_dict() if error else None)
    else:
        error = None if failure is None else _error_for(failure, output, abort, committed)
        if error is None:
            files.finalize(SUCCEEDED)
        else:
            files.finalize(FAILED, f"{error.ename}: {error.evalue}", error.to_dict())
    turn.release()  # if the last cell did not already
    announce_end(files, send_event_url)  # before the kernel's shutdown, which may take seconds
    if km is not None and abort.reason is None:
        # Like papermill: ask the kernel to exit (it may flush files), bounded; then kill.
        from jupyter_core.utils import run_sync

        stopper = threading.Timer(SHUTDOWN_SECONDS, abort.kill_kernel)
        stopper.daemon = True
        stopper.start()
        with contextlib.suppress(Exception):
            run_sync(_shutdown)(km)
        stopper.cancel()
    abort.kill_kernel()  # a kernel that survived the shutdown must not outlive the run
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: python -m {__spec__.name if __spec__ else 'local_runner'} RUN_DIR")
        return 2
    run_dir = Path(argv[1])
    files = RunFiles(run_dir)
    send_event_url = _read_send_event_url()
    child = os.fork()
    if child:
        files.record_runner(child)
        return 0
    os.setsid()
    with contextlib.suppress(OSError):  # the kernel inherits nothing of the submit's pipe
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
    # skip interpreter teardown: the verdict is on disk already
    os._exit(serve_forked(run_dir, send_event_url))


def serve_forked(run_dir: Path, send_event_url: str | None = None) -> int:
    """The runner's life once detached, forked by `main` or by the fork server
    (local_forkserver.py); returns the exit code. `send_event_url`: where to announce the
    run's start and end (see announce_end)."""
    files = RunFiles(run_dir)
    try:
        code = run(run_dir, send_event_url)
    except BaseException as exc:
        import traceback

        files.finalize(FAILED, f"local runner crashed: {type(exc).__name__}: {exc}")
        traceback.print_exc()
        code = 1
    announce_end(files, send_event_url)  # also the runs that ended before executing
    sys.stdout.flush()
    sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
