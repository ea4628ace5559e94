"""`python -m notebookops run` and `serve`: the whole app on this machine through devhost.

`run` delivers the message to the real ServiceBusStarter, follows the real orchestrator
through its custom status, and writes summary.json, junit.xml and the executed notebooks.
Nothing here decides a verdict: it only shows what the orchestration returned.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from notebookops import sealing
from notebookops.message_file import command_line_settings, read_message_file

APP_ROOT = Path(__file__).resolve().parent.parent
EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
TERMINAL = {"Completed", "Failed", "Terminated", "Canceled"}


def local_environment(
    state_dir: Path, workers: int | None = None, *, allow_local_repos: bool = True
) -> None:
    """The settings the deployed app never has: local repos and the local backend allowed."""
    command_line_settings()
    if not allow_local_repos:
        # `serve` answers whoever reaches its port: file:///etc is theirs only on request.
        os.environ.pop("NOTEBOOKOPS_ALLOW_LOCAL_REPOS", None)
    os.environ["NOTEBOOKOPS_ALLOW_LOCAL_BACKEND"] = "1"
    # Runs and outputs live with the state, so a reused --state resumes the same runs and a
    # fresh one never finds old runs under the same ids.
    os.environ["NOTEBOOKOPS_LOCAL_RUNS_DIR"] = str(state_dir / "runs")
    os.environ["NOTEBOOKOPS_OUTPUT_DIR"] = str(state_dir / "outputs")
    if workers is not None:
        os.environ["NOTEBOOKOPS_LOCAL_WORKERS"] = str(workers)
    if not any(os.environ.get(k) for k in sealing.KEY_SETTINGS):
        key_file = state_dir / "secret.key"
        if not key_file.exists():
            key_file.write_text(sealing.new_key())
            key_file.chmod(0o600)
        os.environ["NOTEBOOKOPS_SECRET_KEY"] = key_file.read_text().strip()


class Progress:
    """One line per notebook state change; a redrawn bar when stdout is a terminal."""

    def __init__(self, stream: TextIO, started: float) -> None:
        self.stream = stream
        self.started = started
        self.seen: dict[str, str] = {}
        self.phase: str | None = None
        self.tty = stream.isatty()
        self.bar_shown = False

    def update(self, custom: dict[str, Any] | None) -> None:
        if not custom:
            return
        lines = []
        if custom.get("phase") != self.phase:
            self.phase = custom.get("phase")
            if self.phase in ("cloning", "reporting"):
                lines.append(f"{self.phase}...")
        if custom.get("commit") and "commit" not in self.seen:
            self.seen["commit"] = custom["commit"]
            lines.append(f"commit {custom['commit'][:12]}, {len(custom['notebooks'])} notebook(s)")
        for notebook in custom.get("notebooks", []):
            if self.seen.get(notebook["path"]) != notebook["state"]:
                self.seen[notebook["path"]] = notebook["state"]
                lines.append(f"{notebook['path']}: {notebook['state']}")
        for line in lines:
            self._clear_bar()
            self.stream.write(f"[{time.monotonic() - self.started:6.1f}s] {line}\n")
        if self.tty and custom.get("counts"):
            self._bar(custom["counts"])
        self.stream.flush()

    def _bar(self, counts: dict[str, int]) -> None:
        total = counts.get("total") or 0
        done = sum(counts.get(k, 0) for k in ("succeeded", "failed", "timedOut", "canceled"))
        if not total:
            return
        width = 30
        filled = int(width * done / total)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} finished, "
            f"{counts.get('running', 0)} running"
        )
        self.bar_shown = True

    def _clear_bar(self) -> None:
        if self.bar_shown:
            self.stream.write("\r\033[K")
            self.bar_shown = False

    def close(self) -> None:
        self._clear_bar()
        self.stream.flush()


def run(
    body_path: str,
    properties: dict[str, Any] | None,
    out_dir: str,
    state: str | None,
    workers: int | None,
    quiet: bool = False,
) -> int:
    from devhost import Host
    from notebookops.report import junit_xml, summary_table
    from notebookops.request import inspect_message
    from notebookops.starter import instance_id_for

    body = read_message_file(body_path)
    state_dir = Path(state) if state else Path(tempfile.mkdtemp(prefix="notebookops-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    local_environment(state_dir.resolve(), workers)
    request, callback, errors = inspect_message(body, properties=properties, allow_local_repos=True)
    if errors:
        for error in errors:
            print(error, file=sys.stderr)
        return EXIT_INVALID
    message_id = uuid.uuid4().hex
    instance_id = instance_id_for(callback, message_id)
    started = time.monotonic()
    progress = Progress(sys.stdout if not quiet else open(os.devnull, "w"), started)  # noqa: SIM115
    print(
        f"run {instance_id}: {len(request.notebooks)} notebook entr"
        f"{'y' if len(request.notebooks) == 1 else 'ies'} from {request.repository_url}"
        f" ({request.ref if not request.commit else request.commit[:12]}), backend "
        f"{request.compute.backend}",
        flush=True,
    )
    try:
        with Host(APP_ROOT, state_dir / "devhost", clock="real") as host:
            host.deliver_service_bus(
                "ServiceBusStarter", body, application_properties=properties, message_id=message_id
            )
            status = _follow(host, instance_id, progress)
    except KeyboardInterrupt:
        progress.close()
        print(
            "interrupted; local runs already started keep going in their own processes",
            file=sys.stderr,
        )
        return 130
    finally:
        progress.close()
    summary = status.get("output") if isinstance(status.get("output"), dict) else None
    if summary is None:
        summary = _failed_summary(instance_id, status)
    out = Path(out_dir)
    _write_outputs(summary, out, junit_xml)
    print(summary_table(summary))
    print(f"wrote {out / 'summary.json'}, {out / 'junit.xml'} and {out / 'notebooks'}/")
    if not state:
        shutil.rmtree(state_dir, ignore_errors=True)
    return EXIT_OK if summary["result"] in ("succeeded", "succeededWithIssues") else EXIT_FAILED


def _follow(host: Any, instance_id: str, progress: Progress) -> dict[str, Any]:
    while True:
        status = host.get_status(instance_id)
        if status:
            progress.update(status.get("customStatus"))
            if status["runtimeStatus"] in TERMINAL:
                return status
        time.sleep(0.1)


def _failed_summary(instance_id: str, status: dict[str, Any]) -> dict[str, Any]:
    return {
        "instanceId": instance_id,
        "result": "failed",
        "commit": None,
        "startedAt": status.get("createdTime"),
        "finishedAt": status.get("lastUpdatedTime"),
        "counts": {"total": 0, "succeeded": 0, "failed": 0, "timedOut": 0, "canceled": 0},
        "errors": [f"orchestration {status['runtimeStatus']}: {status.get('output')}"],
        "notebooks": [],
    }


def _write_outputs(summary: dict[str, Any], out: Path, junit_xml: Any) -> None:
    notebooks_dir = out / "notebooks"
    if notebooks_dir.exists():
        shutil.rmtree(notebooks_dir)
    notebooks_dir.mkdir(parents=True)
    for notebook in summary["notebooks"]:
        source = notebook.get("outputNotebook")
        if source and Path(source).is_file():
            target = notebooks_dir / PurePosixPath(notebook["path"])
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            notebook["outputNotebook"] = str(PurePosixPath("notebooks") / notebook["path"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "junit.xml").write_text(junit_xml(summary), encoding="utf-8")


def serve(args: Any) -> int:
    from devhost.__main__ import run_server

    state_dir = Path(args.state).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    local_environment(state_dir, allow_local_repos=args.allow_local_repos)
    if args.allow_local_repos:
        note = (
            "local repositories allowed (--allow-local-repos): anyone who can reach "
            f"{args.host}:{args.port} can have this machine clone and run its folders"
        )
    else:
        note = (
            "local repositories (paths, file:// URLs) refused; start with --allow-local-repos "
            "to allow them"
        )
    print(f"notebookops serve: {note}", file=sys.stderr, flush=True)
    return run_server(str(APP_ROOT), args)


def quiet_logs(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        for name in ("azure", "devhost", "notebookops", "papermill", "traitlets"):
            logging.getLogger(name).setLevel(logging.ERROR)
