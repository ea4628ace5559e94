"""The `local` backend: run notebooks with papermill on this machine, each in a detached process.

It executes repository code on the host, so it is refused unless NOTEBOOKOPS_ALLOW_LOCAL_BACKEND=1.

Environment:
- NOTEBOOKOPS_LOCAL_RUNS_DIR  runs root (default `<tempdir>/notebookops-runs`), a folder per run
- NOTEBOOKOPS_LOCAL_WORKERS   notebooks executing at once across the runs root (default: CPU count)

A run's `work/` is a view of the shared checkout, not a copy (see staging.py). Its runner is
forked by the runs root's fork server when one is up (see local_forkserver.py).

The whole-notebook timeout counts from the moment a run holds a worker slot, not from submit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from notebookops.compute import local_forkserver, local_kernelserver
from notebookops.compute.base import (
    CANCELED,
    FAILED,
    TERMINAL_STATES,
    PermanentBackendError,
    PollPolicy,
    RunError,
    RunHandle,
    RunNotFinishedError,
    RunSpec,
    RunStatus,
)
from notebookops.compute.local_state import RUNNER_MODULE, RunFiles, flocked, write_json_atomic
from notebookops.compute.staging import resolve_source, stage_view
from notebookops.notebook_errors import error_from_file, load_notebook_json

ALLOW_ENV = "NOTEBOOKOPS_ALLOW_LOCAL_BACKEND"
RUNS_DIR_ENV = "NOTEBOOKOPS_LOCAL_RUNS_DIR"
WORKERS_ENV = "NOTEBOOKOPS_LOCAL_WORKERS"

# How long cancel waits for the runner to save the partial notebook before killing it outright.
CANCEL_GRACE_SECONDS = 10.0
_RUN_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _workers_from_env() -> int:
    raw = os.environ.get(WORKERS_ENV, "").strip()
    if not raw:
        return os.cpu_count() or 1
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise PermanentBackendError(
            f"{WORKERS_ENV} must be a positive whole number of notebooks, got {raw!r}"
        )
    return value


class LocalBackend:
    name = "local"
    # A run's state is a file on this machine, so the monitor can wait for it to change
    # (wait_for_change) instead of the orchestrator sleeping between polls: a finished
    # notebook is seen within ~20 ms, and an idle run costs one monitor round per
    # LONG_POLL_SECONDS. The interval fields apply only where long polling is not used.
    # The runner numbers failing cells against the committed notebook itself.
    numbers_cells_against_commit = True
    poll_policy = PollPolicy(
        first_interval_seconds=0.2, factor=1.2, max_interval_seconds=0.5, long_poll_seconds=5.0
    )
    # Given the instance's send-event URL at submit, the runner announces the run's end itself
    # (notebookops.run_events): the orchestrator then waits for that event instead of long
    # polling, and polls every safety_poll_seconds in case the runner was killed outright or
    # the host it posts to moved (a resumed `notebookops run` listens on a new port).
    pushes_events = True
    announces_own_ends = True
    safety_poll_seconds = 15.0

    def __init__(
        self,
        runs_dir: Path | str | None = None,
        workers: int | None = None,
        allowed: bool | None = None,
    ) -> None:
        if allowed is None:
            allowed = os.environ.get(ALLOW_ENV, "").strip() == "1"
        if not allowed:
            raise PermanentBackendError(
                "compute backend 'local' is disabled because it executes repository code on this "
                f"host; set {ALLOW_ENV}=1 in the app settings to enable it"
            )
        if runs_dir is None:
            runs_dir = os.environ.get(RUNS_DIR_ENV, "").strip() or (
                Path(tempfile.gettempdir()) / "notebookops-runs"
            )
        self.runs_root = Path(runs_dir).resolve()
        if workers is not None and (isinstance(workers, bool) or workers < 1):
            raise PermanentBackendError(f"workers must be a positive number, got {workers!r}")
        self.workers = workers if workers is not None else _workers_from_env()

    def prewarm(self, notebooks: int, kernel_name: str = "python3") -> Any:
        """Start a kernel per worker slot (at most one per notebook) now, before the clone, so
        the first notebooks do not wait for a kernel start; returns the local_pool.Pool."""
        # The pool's kernels come from the runs root's kernel server, started here if need be.
        count = min(self.workers, notebooks)
        pool = local_kernelserver.prewarm(self.runs_root, count, kernel_name)
        # Even one notebook's runner is then forked with its imports paid, while this clones.
        if notebooks:
            env = self._runner_env()
            local_forkserver.start(self.runs_root, env, self.runs_root / ".forkserver.log")
        return pool

    # -- submit -------------------------------------------------------------------------------

    def submit(self, spec: RunSpec, send_event_url: str | None = None) -> RunHandle:
        """`send_event_url`: where the runner announces the run's start and end (it holds the
        host's key: it goes to the runner's stdin only, see run_events)."""
        source_root, notebook = self._validate(spec)
        run_dir = self.runs_root / spec.run_key
        locks = self.runs_root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        # One submit per key at a time, across threads and processes; the loser finds the run.
        with flocked(locks / f"{spec.run_key}.lock"):
            files = RunFiles(run_dir)
            if files.runner_pid() is not None:
                return self._handle(spec.run_key, run_dir, notebook)
            if run_dir.exists():  # left over by a submit that died half-way
                shutil.rmtree(run_dir)
            run_dir.mkdir()
            stage_view(source_root, files.work, notebook)
            files.output_dir.mkdir()
            write_json_atomic(
                files.run_json,
                {
                    "runKey": spec.run_key,
                    "notebook": notebook,
                    "parameters": spec.parameters,
                    "timeoutSeconds": spec.timeout_seconds,
                    "kernel": spec.compute.get("kernel"),
                    "python": spec.compute.get("python"),
                    "workers": self.workers,
                    "runsRoot": str(self.runs_root),
                    # The shared checkout work/ links into: the runner protects it from writes.
                    "source": str(source_root.resolve()),
                },
            )
            files.init_state()
            self._start_runner(files, send_event_url)
            return self._handle(spec.run_key, run_dir, notebook)

    def _validate(self, spec: RunSpec) -> tuple[Path, str]:
        """Returns the folder to copy and the notebook's path inside it."""
        if not isinstance(spec.run_key, str) or not _RUN_KEY.match(spec.run_key):
            raise PermanentBackendError(
                f"run_key must be lowercase letters, digits, '-' or '_', start with a letter and "
                f"be at most 64 characters, got {spec.run_key!r}"
            )
        source_root, inner = resolve_source(spec)
        if spec.timeout_seconds is not None and not spec.timeout_seconds > 0:
            raise PermanentBackendError(
                f"timeout_seconds must be positive, got {spec.timeout_seconds!r}"
            )
        try:
            import json

            json.dumps(spec.parameters)
        except (TypeError, ValueError) as exc:
            raise PermanentBackendError(f"parameters must be JSON values: {exc}") from None
        return source_root, inner

    @staticmethod
    def _runner_env() -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        return env

    def _start_runner(self, files: RunFiles, send_event_url: str | None = None) -> None:
        env = self._runner_env()
        # Forked by the fork server when one serves this runs root (milliseconds, no imports to
        # pay); else a fresh interpreter, and a server is started for the notebooks after it.
        # The send-event URL holds the host's key: it goes over the server's private socket or
        # on the runner's stdin, never into run.json or an environment the kernel inherits.
        if local_forkserver.request(self.runs_root, files.run_dir, env, send_event_url):
            return
        if files.runner_pid() is not None:  # forked, but the server's answer was lost
            return
        local_forkserver.start(self.runs_root, env, self.runs_root / ".forkserver.log")
        local_kernelserver.start(self.runs_root, env, self.runs_root / ".kernelserver.log")
        with open(files.log, "ab") as log:
            # The runner forks and this first process exits at once, so this waits milliseconds.
            result = subprocess.run(
                [sys.executable, "-m", RUNNER_MODULE, str(files.run_dir)],
                cwd=files.run_dir,
                env=env,
                input=(send_event_url or "").encode(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                timeout=120,
                check=False,
            )
        if result.returncode != 0 or files.runner_pid() is None:
            raise RuntimeError(
                f"local runner for {files.run_dir.name} did not start (exit code "
                f"{result.returncode}); see {files.log}"
            )

    def _handle(self, key: str, run_dir: Path, notebook: str) -> RunHandle:
        output = RunFiles(run_dir).output_path(notebook)
        return RunHandle(
            backend=self.name,
            run_id=key,
            portal_url=output.as_uri(),
            data={"runDir": str(run_dir), "notebook": notebook},
        )

    # -- status, cancel, output ---------------------------------------------------------------

    def _files(self, handle: RunHandle) -> RunFiles:
        run_dir = handle.data.get("runDir") if isinstance(handle.data, dict) else None
        if not isinstance(run_dir, str) or not run_dir:
            raise PermanentBackendError(f"run handle has no runDir: {handle.data!r}")
        files = RunFiles(Path(run_dir))
        if not files.state_json.is_file():
            raise PermanentBackendError(
                f"local run {handle.run_id!r} not found: {run_dir!r} has no state "
                "(the runs folder was cleaned or belongs to another machine)"
            )
        return files

    def status(self, handle: RunHandle) -> RunStatus:
        files = self._files(handle)
        state = files.read_state()
        if state.get("state") not in TERMINAL_STATES and not files.runner_alive():
            pid = files.runner_pid()
            output = files.output_path(handle.data.get("notebook", ""))
            # Numbered like the runner numbers cells: against the notebook as committed.
            committed = load_notebook_json(files.work / handle.data.get("notebook", ""))
            error = error_from_file(output, committed) if output.is_file() else None
            files.finalize(
                FAILED,
                f"local runner (pid {pid}) exited without reporting a result; it was killed "
                "or crashed (see runner.log in the run folder)",
                error.to_dict() if error else None,
            )
            files.kill_kernel_group()
            state = files.read_state()  # whoever decided, report what is on disk
        return self._to_status(state)

    def wait_for_change(
        self, handles: list[RunHandle], timeout: float, known: list[str | None] | None = None
    ) -> None:
        """Return when any run's state file changes or its runner dies, or after `timeout`.

        `known` holds the state the caller last saw for each run: a run that changed before
        the wait began (between the last round's read and this call) returns at once, where
        comparing file stamps alone would sleep through the change until `timeout`."""
        files = [self._files(h) for h in handles]

        def snapshot() -> list[int]:
            stamps = []
            for f in files:
                try:
                    stamps.append(f.state_json.stat().st_mtime_ns)
                except FileNotFoundError:
                    stamps.append(-1)
            return stamps

        # Stamps first, then the states: a change written between the two is either in the
        # states read or after the stamps. The other order missed a change written between
        # them and slept the whole wait (up to 30 s) on a run that had already ended.
        start = snapshot()
        if known and any(
            seen is not None and f.read_state().get("state") != seen
            for f, seen in zip(files, known, strict=False)
        ):
            return
        deadline = time.monotonic() + max(0.0, timeout)
        checks = 0
        while time.monotonic() < deadline:
            time.sleep(0.02)
            if snapshot() != start:
                return
            checks += 1
            # A killed runner never writes again: let status() report it without waiting.
            if checks % 25 == 0 and any(
                f.read_state().get("state") not in TERMINAL_STATES and not f.runner_alive()
                for f in files
            ):
                return

    @staticmethod
    def _to_status(state: dict[str, Any]) -> RunStatus:
        error = state.get("error")
        return RunStatus(
            state=state["state"],
            raw_status=state["state"],
            error=RunError.from_dict(error) if error else None,
            started_at=state.get("startedAt"),
            ended_at=state.get("endedAt"),
            message=state.get("message"),
        )

    def cancel(self, handle: RunHandle) -> None:
        files = self._files(handle)
        if not files.finalize(CANCELED, "canceled on request"):
            return  # already over: cancel is a no-op
        pid = files.runner_pid()
        if pid is not None and files.runner_alive():
            import signal

            # The runner kills its kernel and saves the partial notebook on SIGTERM.
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + CANCEL_GRACE_SECONDS
            while files.runner_alive() and time.monotonic() < deadline:
                time.sleep(0.02)
        files.kill_kernel_group()
        files.kill_runner_group()

    def fetch_output(self, handle: RunHandle, dest: Path) -> Path | None:
        files = self._files(handle)
        if files.read_state().get("state") not in TERMINAL_STATES:
            raise RunNotFinishedError(f"local run {handle.run_id!r} has not finished yet")
        output = files.output_path(handle.data.get("notebook", ""))
        if not output.is_file():
            return None
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / output.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(output, dest)
        return dest
