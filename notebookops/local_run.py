"""`python -m notebookops run` and `serve`: the whole app on this machine through devhost.

`run` delivers the message to the real ServiceBusStarter, follows the real orchestrator
through its custom status, and writes summary.json, junit.xml and the executed notebooks.
Nothing here decides a verdict: it only shows what the orchestration returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from notebookops import sealing
from notebookops.message_file import command_line_settings, read_message_file

APP_ROOT = Path(__file__).resolve().parent.parent
APP_PACKAGE = "notebookops_app"


def app_root(explicit: str | None = None) -> Path:
    """The function app folder to host: --app, else this checkout, else the installed copy.

    `pip install .` installs function_app.py, host.json and the function folders as the
    package notebookops_app (see pyproject.toml), so the command works from any folder.
    """
    if explicit:
        return Path(explicit).resolve()
    if (APP_ROOT / "function_app.py").is_file():
        return APP_ROOT
    import importlib.util

    spec = importlib.util.find_spec(APP_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"no function app found: {APP_ROOT} has no function_app.py and the package "
            f"{APP_PACKAGE} is not installed; give --app DIR"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve()


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
        # One status can carry several changes at once; they are printed in the order they
        # happened: the clone's result, then notebook states, then the phase they led to.
        phase = custom.get("phase")
        if phase != self.phase and phase == "cloning":
            lines.append("cloning...")
        if custom.get("commit") and "commit" not in self.seen:
            self.seen["commit"] = custom["commit"]
            total = (custom.get("counts") or {}).get("total", len(custom.get("notebooks") or []))
            lines.append(f"commit {custom['commit'][:12]}, {total} notebook(s)")
        for notebook in custom.get("notebooks", []):
            if self.seen.get(notebook["path"]) != notebook["state"]:
                self.seen[notebook["path"]] = notebook["state"]
                lines.append(f"{notebook['path']}: {notebook['state']}")
        if phase != self.phase and phase == "reporting":
            lines.append("reporting...")
        lines += callback_lines(custom.get("callback"), self.seen)
        self.phase = phase
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
    rerun: bool = False,
    app: str | None = None,
) -> int:
    from notebookops import render
    from notebookops.request import inspect_message

    body = read_message_file(body_path)
    state_dir = Path(state) if state else Path(tempfile.mkdtemp(prefix="notebookops-"))
    state_dir.mkdir(parents=True, exist_ok=True)
    state_dir = state_dir.resolve()
    local_environment(state_dir, workers)
    out = Path(out_dir)
    request, callback, errors = inspect_message(body, properties=properties, allow_local_repos=True)
    if errors:
        from notebookops.report import junit_xml

        for error in errors:
            print(error, file=sys.stderr)
        summary = invalid_request_summary(body, errors)
        _write_outputs(summary, out, junit_xml, state_dir if state else None)
        print(f"wrote {out / 'summary.json'} and {out / 'junit.xml'}", file=sys.stderr)
        if not state:
            shutil.rmtree(state_dir, ignore_errors=True)
        return EXIT_INVALID
    # Kernels first, then the app's imports (devhost, the durable SDK): the kernels boot
    # meanwhile.
    pool, one_wave = _prewarm(request)
    # The monitor renders every backend's finished notebook, in the render worker once it has
    # paid nbconvert's second of CPU. When every notebook runs at once, the first page is due
    # right after start-up: the worker starts now. Otherwise it starts once the first notebook
    # runs (in _follow): started now, it would take that CPU from the clone, the submits and
    # the first kernels (about 0.4 s of an 8 x 1 s run on 2 CPUs), and submit's own prewarm
    # would come just as early.
    render.hold_prewarm()
    if one_wave:
        render.prewarm(now=True)
    from devhost import Host
    from notebookops.report import junit_xml, summary_table
    from notebookops.starter import instance_id_for

    # With --state the same command finds the same instance again (resume); without it the
    # state is thrown away, so a fresh id is as good as any.
    message_id = resume_message_id(body, properties, state_dir) if state else uuid.uuid4().hex
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
        with Host(app_root(app), state_dir / "devhost", clock="real") as host:
            existing = host.get_status(instance_id, show_input=False)
            if existing and rerun:
                if existing["runtimeStatus"] not in TERMINAL:
                    print(
                        f"run {instance_id} has not finished; run the command without --rerun "
                        "to resume it, then --rerun to run it again",
                        file=sys.stderr,
                    )
                    return EXIT_INVALID
                _forget(host, instance_id, existing, state_dir)
                print("--rerun: the finished run is forgotten and runs again", flush=True)
                existing = None
            if existing is None:
                host.deliver_service_bus(
                    "ServiceBusStarter",
                    body,
                    application_properties=properties,
                    message_id=message_id,
                )
            elif existing["runtimeStatus"] in TERMINAL:
                print(
                    f"already finished ({_result_of(existing)}); shown again, not re-run "
                    "(--rerun runs it again)",
                    flush=True,
                )
            else:
                print(f"resuming (state in {state_dir})", flush=True)
            status = _follow(host, instance_id, progress)
    except KeyboardInterrupt:
        progress.close()
        if state:
            hint = f"run the same command again (same --state {state}) to resume"
        else:
            hint = f"without --state it cannot be resumed; its folder {state_dir} is kept"
        print(
            f"interrupted; notebooks already started keep going in their own processes; {hint}",
            file=sys.stderr,
        )
        return 130
    finally:
        progress.close()
        if pool is not None:
            pool.withdraw()  # kernels no runner claimed (other kernels, a failed clone...)
    summary = status.get("output") if isinstance(status.get("output"), dict) else None
    if summary is None:
        summary = _failed_summary(instance_id, status, request)
    keep_what_is_known(summary, request)
    _write_outputs(summary, out, junit_xml, state_dir if state else None)
    print(summary_table(summary))
    if summary.get("callback"):
        print(callback_outcome(summary["callback"]))
    print(f"wrote {out / 'summary.json'}, {out / 'junit.xml'} and {out / 'notebooks'}/")
    _print_rendered(summary, out)
    if not state:
        shutil.rmtree(state_dir, ignore_errors=True)
    return EXIT_OK if summary["result"] in ("succeeded", "succeededWithIssues") else EXIT_FAILED


def _prewarm(request: Any) -> tuple[Any, bool]:
    """Kernels for the first notebooks, started now, while the app starts and clones; and
    whether every notebook runs in the first wave (no more of them than workers)."""
    if request.compute.backend != "local":
        return None, False
    from notebookops.compute.local import LocalBackend

    try:
        backend = LocalBackend()
    except Exception:  # the backend reports its own problem at submit; nothing to warm
        return None, False
    has_glob = any(set("*?[") & set(entry.path) for entry in request.notebooks)
    one_wave = not has_glob and len(request.notebooks) <= backend.workers
    if request.compute.python:
        return None, one_wave
    count = backend.workers if has_glob else len(request.notebooks)
    try:
        return backend.prewarm(count, request.compute.kernel or "python3"), one_wave
    except (OSError, subprocess.SubprocessError) as exc:  # only a head start: run without it
        print(f"kernels not prewarmed: {exc}", file=sys.stderr)
        return None, one_wave


def resume_message_id(body: bytes, properties: dict[str, Any] | None, state_dir: Path) -> str:
    """The same (body, properties, state folder) always names the same run, so running the
    same command again finds it. Without callback values this is the instance's key."""
    digest = hashlib.sha256()
    for part in (
        body,
        json.dumps(properties, sort_keys=True, default=str).encode(),
        str(state_dir.resolve()).encode(),
    ):
        digest.update(len(part).to_bytes(8, "big") + part)
    return "cli-" + digest.hexdigest()[:40]


def _result_of(status: dict[str, Any]) -> str:
    output = status.get("output")
    return output.get("result", "?") if isinstance(output, dict) else status["runtimeStatus"]


def _forget(host: Any, instance_id: str, status: dict[str, Any], state_dir: Path) -> None:
    """Purge a finished instance and its local runs, so the same id runs from scratch (the
    local backend would otherwise find its finished runs under the same run keys)."""
    from notebookops.activities import output_root

    output = status.get("output") if isinstance(status.get("output"), dict) else {}
    runs_root = state_dir / "runs"
    for notebook in output.get("notebooks") or []:
        run_id = notebook.get("runId")
        if isinstance(run_id, str) and run_id and "/" not in run_id and run_id[0] != ".":
            shutil.rmtree(runs_root / run_id, ignore_errors=True)
    shutil.rmtree(output_root(instance_id), ignore_errors=True)
    host.purge(instance_id)


def invalid_request_summary(body: bytes, errors: list[str]) -> dict[str, Any]:
    """summary.json for a request that never ran: the errors, and what the message named."""
    from notebookops.datacontract import decode_body

    try:
        data = json.loads(decode_body(body))
    except ValueError:
        data = None
    data = data if isinstance(data, dict) else {}
    repo = data.get("repository") if isinstance(data.get("repository"), dict) else {}
    commit = repo.get("commit")
    named: list[str] = []
    entries = data.get("notebooks") if isinstance(data.get("notebooks"), list) else []
    for entry in entries[:500]:
        path = entry.get("path") if isinstance(entry, dict) else entry
        if isinstance(path, str) and path.isprintable() and 0 < len(path) <= 1024:
            named.append(path)
    now = datetime.now(UTC).isoformat()
    return {
        "instanceId": None,
        "result": "failed",
        "commit": commit.lower() if isinstance(commit, str) and _HEX.fullmatch(commit) else None,
        "startedAt": now,
        "finishedAt": now,
        "counts": {"total": len(named), "succeeded": 0, "failed": 0, "timedOut": 0}
        | {"canceled": len(named)},
        "errors": [f"invalid request: {error}" for error in errors],
        "notebooks": [_not_run(path, "the request is invalid") for path in named],
    }


_HEX = re.compile(r"[0-9a-fA-F]{7,64}")


def _not_run(path: str, why: str) -> dict[str, Any]:
    return {
        "path": path,
        "state": "canceled",
        "allowFailure": False,
        "runId": None,
        "portalUrl": None,
        "durationSeconds": None,
        "error": None,
        "message": f"not run: {why}",
        "outputNotebook": None,
    }


def callback_lines(callback: dict[str, Any] | None, seen: dict[str, Any]) -> list[str]:
    """One line per TaskCompleted attempt the orchestration reports in its custom status."""
    if not callback or callback.get("attempts", 0) == seen.get("callback attempts", 0):
        return []
    seen["callback attempts"] = callback["attempts"]
    if callback.get("delivered"):
        return [f"TaskCompleted attempt {callback['attempts']}: accepted"]
    line = f"TaskCompleted attempt {callback['attempts']}: {callback.get('lastError')}"
    if callback.get("nextAttemptAt"):
        line += f"; next attempt at {callback['nextAttemptAt']}"
    return [line]


def callback_outcome(callback: dict[str, Any]) -> str:
    if callback.get("delivered"):
        return f"pipeline: TaskCompleted accepted after {callback['attempts']} attempt(s)"
    return (
        f"pipeline: not told after {callback['attempts']} attempt(s): {callback.get('lastError')}"
    )


def _any_started(custom: Any) -> bool:
    notebooks = custom.get("notebooks") if isinstance(custom, dict) else None
    return any(
        isinstance(n, dict) and n.get("state") not in (None, "queued", "notStarted")
        for n in notebooks or []
    )


def _follow(host: Any, instance_id: str, progress: Progress) -> dict[str, Any]:
    from notebookops import render

    while True:
        status = host.get_status(instance_id)
        if status:
            progress.update(status.get("customStatus"))
            if _any_started(status.get("customStatus")):
                render.prewarm(now=True)  # once per process: the first page is due soon
            if status["runtimeStatus"] in TERMINAL:
                return status
        # Woken by the next change (its progress line shows at once), and polled anyway: a
        # change committed between the read above and this wait is seen 0.1 s later.
        host.wait_changed(0.1)


def keep_what_is_known(summary: dict[str, Any], request: Any) -> None:
    """A run that failed before its notebooks were resolved (a bad ref, a missing notebook)
    still names the commit the message asked for and the notebooks it listed."""
    if summary.get("commit") is None and request.commit:
        summary["commit"] = request.commit
    if summary.get("errors") and not summary.get("notebooks"):
        why = "the run failed before it started (see errors)"
        summary["notebooks"] = [_not_run(entry.path, why) for entry in request.notebooks]
        counts = summary.setdefault("counts", {})
        counts["total"] = counts["canceled"] = len(summary["notebooks"])


def _failed_summary(instance_id: str, status: dict[str, Any], request: Any) -> dict[str, Any]:
    """The orchestration ended without a summary: keep what is known from its last status."""
    custom = status.get("customStatus") if isinstance(status.get("customStatus"), dict) else {}
    known = [n for n in custom.get("notebooks") or [] if isinstance(n, dict) and n.get("path")]
    why = f"the orchestration ended {status['runtimeStatus']}"
    notebooks = [_not_run(n["path"], why) for n in known] or [
        _not_run(entry.path, why) for entry in request.notebooks
    ]
    return {
        "instanceId": instance_id,
        "result": "failed",
        "commit": custom.get("commit") or request.commit,
        "startedAt": status.get("createdTime"),
        "finishedAt": status.get("lastUpdatedTime"),
        "counts": {"total": len(notebooks), "succeeded": 0, "failed": 0, "timedOut": 0}
        | {"canceled": len(notebooks)},
        "errors": [f"orchestration {status['runtimeStatus']}: {status.get('output')}"],
        "notebooks": notebooks,
    }


def _write_outputs(
    summary: dict[str, Any], out: Path, junit_xml: Any, kept_state: Path | None
) -> None:
    notebooks_dir = out / "notebooks"
    if notebooks_dir.exists():
        shutil.rmtree(notebooks_dir)
    notebooks_dir.mkdir(parents=True)
    for notebook in summary["notebooks"]:
        notebook["portalUrl"] = local_portal_url(notebook.get("portalUrl"), kept_state)
        source = notebook.get("outputNotebook")
        if source and Path(source).is_file():
            target = notebooks_dir / PurePosixPath(notebook["path"])
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            notebook["outputNotebook"] = str(PurePosixPath("notebooks") / notebook["path"])
        html = notebook.get("outputHtml")
        if html and Path(html).is_file():
            relative = (PurePosixPath("notebooks") / notebook["path"]).with_suffix(".html")
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(html, out / relative)
            notebook["outputHtml"] = str(relative)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "junit.xml").write_text(junit_xml(summary), encoding="utf-8")


def local_portal_url(url: Any, kept_state: Path | None) -> Any:
    """A local run's "portal" is its folder under --state (the copy of the checkout, the
    executed notebook, the runner's log); without --state that folder is deleted at the end,
    so there is none. Links of other backends pass unchanged."""
    if not isinstance(url, str) or not url.startswith("file://"):
        return url
    if kept_state is None:
        return None
    path = Path(unquote(urlsplit(url).path))
    runs = kept_state / "runs"
    try:
        run_folder = path.relative_to(runs).parts[0]
    except (ValueError, IndexError):
        return str(path)
    return str(runs / run_folder)


RENDERED_SHOWN = 10


def _print_rendered(summary: dict[str, Any], out: Path) -> None:
    """Where to look: the rendered notebooks open in any browser, failures first."""
    rendered = [n for n in summary["notebooks"] if n.get("outputHtml")]
    if not rendered:
        return
    rendered.sort(key=lambda n: n["state"] == "succeeded")
    print(f"rendered notebooks (open in a browser), {len(rendered)} in {out / 'notebooks'}/:")
    for notebook in rendered[:RENDERED_SHOWN]:
        print(f"  {(out / notebook['outputHtml']).resolve().as_uri()}  ({notebook['state']})")
    if len(rendered) > RENDERED_SHOWN:
        print(f"  ... and {len(rendered) - RENDERED_SHOWN} more")


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
    return run_server(str(app_root(args.app)), args)


def quiet_logs(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not verbose:
        for name in ("azure", "devhost", "notebookops", "papermill", "traitlets"):
            logging.getLogger(name).setLevel(logging.ERROR)
