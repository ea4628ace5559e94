"""The `azureml-v1` backend: azureml-core runs built by azureml-contrib-notebook's
`NotebookRunConfig`. Azure ML SDK v1 support ended on 2026-06-30; prefer `azureml`.

App settings: the workspace as for `azureml` (AZUREML_SUBSCRIPTION_ID, AZUREML_RESOURCE_GROUP,
AZUREML_WORKSPACE, or `compute.workspace`); a service principal from AZURE_TENANT_ID,
AZURE_CLIENT_ID and AZURE_CLIENT_SECRET, otherwise the managed identity (user-assigned when
AZURE_CLIENT_ID is set). azureml-core is imported on first use only.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from notebookops.compute import azureml_common as common
from notebookops.compute.base import (
    CANCELED,
    FAILED,
    QUEUED,
    SUCCEEDED,
    TERMINAL_STATES,
    PermanentBackendError,
    RunHandle,
    RunNotFinishedError,
    RunSpec,
    RunStatus,
    parse_iso,
)
from notebookops.notebook_errors import (
    ALLOW_ERRORS_TAG,
    ERROR_MARKER_TAG,
    error_from_file,
    first_error,
    load_notebook_json,
)

log = logging.getLogger(__name__)

# The contrib runner imports pkg_resources, which setuptools 82 removed (reference §1.3).
SETUPTOOLS_PIN = "setuptools<82"
DEFAULT_ENVIRONMENT_NAME = "notebookops-v1-notebook"
DEFAULT_PYTHON = "3.10"
# Azure ML refuses environment names starting with "AzureML" or "Microsoft" (reserved for
# curated ones), so the per-run copy gets a prefix, never a suffix.
ENV_PREFIX = "notebookops-"
_ENV_NAME_MAX = 255


class V1Service(Protocol):
    """The calls that reach Azure ML; everything else is built offline from real SDK objects."""

    def get_run(self, workspace: Any, run_id: str) -> Any | None: ...

    def submit(
        self, workspace: Any, experiment: str, config: Any, run_id: str, tags: dict[str, str]
    ) -> Any: ...

    def get_environment(
        self, workspace: Any, name: str, version: str | None, label: str | None
    ) -> Any: ...


class AzureMLCoreService:
    def get_run(self, workspace: Any, run_id: str) -> Any | None:
        from azureml._restclient.exceptions import ServiceException
        from azureml.core import Run

        try:
            return Run.get(workspace, run_id)
        except ServiceException as exc:
            if exc.status_code == 404:
                return None
            raise

    def submit(
        self, workspace: Any, experiment: str, config: Any, run_id: str, tags: dict[str, str]
    ) -> Any:
        from azureml.core import Experiment

        return Experiment(workspace, experiment).submit(config, tags=tags, run_id=run_id)

    def get_environment(
        self, workspace: Any, name: str, version: str | None, label: str | None
    ) -> Any:
        from azureml.core import Environment

        return Environment.get(workspace, name=name, version=version, label=label)


def _auth() -> Any:
    from azureml.core.authentication import MsiAuthentication, ServicePrincipalAuthentication

    tenant = os.environ.get("AZURE_TENANT_ID", "").strip()
    client = os.environ.get("AZURE_CLIENT_ID", "").strip()
    secret = os.environ.get("AZURE_CLIENT_SECRET", "")
    if secret:
        missing = [
            n for n, v in (("AZURE_TENANT_ID", tenant), ("AZURE_CLIENT_ID", client)) if not v
        ]
        if missing:
            raise PermanentBackendError(
                f"AZURE_CLIENT_SECRET is set but {', '.join(missing)} is not: set all three "
                "for a service principal, or remove the secret to use the managed identity"
            )
        return ServicePrincipalAuthentication(tenant, client, secret)
    return MsiAuthentication(identity_config={"client_id": client} if client else None)


def parse_environment(reference: str) -> tuple[str, str | None, str | None]:
    """(name, version, label) from any v1 form (`nb-env`, `azureml:nb-env:3`, `nb-env@prod`,
    a curated `AzureML-...` name, an ARM id); `@latest` and no version mean the newest."""
    try:
        ref = common.parse_environment_ref(reference, "azureml-v1")
    except ValueError as exc:
        raise PermanentBackendError(f"compute.environment {reference!r} {exc}") from None
    return ref.name, ref.version, ref.label


RUNNER_PACKAGES = ("papermill", "ipykernel")


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.lower())


def _lists(env: Any, package: str) -> bool:
    """The environment's conda or pip list names `package` itself (any version, extras)."""
    deps = env.python.conda_dependencies
    for entry in [*deps.pip_packages, *deps.conda_packages]:
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", str(entry))
        if match and _normalised(match[1]) == _normalised(package):
            return True
    return False


_SETUPTOOLS = re.compile(r"\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?P<spec>.*)")


def _setuptools_pinned_below_82(env: Any) -> bool:
    """True when the environment already lists setuptools itself (the exact name, not
    setuptools-scm or setuptools_rust) with a version range that keeps pkg_resources."""
    from packaging.specifiers import InvalidSpecifier, SpecifierSet

    deps = env.python.conda_dependencies
    for entry in [*deps.pip_packages, *deps.conda_packages]:
        match = _SETUPTOOLS.fullmatch(str(entry))
        if not match or re.sub(r"[-_.]+", "-", match["name"].lower()) != "setuptools":
            continue
        spec = match["spec"].split(";", 1)[0].strip()
        # conda writes "setuptools=65.5" for "65.5.*"
        spec = re.sub(r"^=(?!=)", "==", spec) if spec.startswith("=") else spec
        if spec.startswith("==") and not spec.endswith("*") and spec.count(".") < 2:
            spec += ".*"
        try:
            if spec and not SpecifierSet(spec).contains("82", prereleases=True):
                return True
        except InvalidSpecifier:
            continue
    return False


class AzureMLV1Backend:
    name = "azureml-v1"
    poll_policy = common.AZUREML_POLL_POLICY
    # Azure ML announces run ends through Event Grid (notebookops.run_events, AzureMLEvents).
    pushes_events = True

    def __init__(
        self,
        service: V1Service | None = None,
        work_dir: Path | str | None = None,
        auth: Any = None,
    ) -> None:
        self._service = service or AzureMLCoreService()
        self._work_dir_arg = work_dir
        self._auth = auth
        self._workspaces: dict[common.WorkspaceRef, Any] = {}
        self._refused: dict[str, str] = {}  # run id -> why its output cannot be downloaded
        self._lock = threading.Lock()

    def _workspace(self, ref: common.WorkspaceRef) -> Any:
        from azureml.core import Workspace

        with self._lock:
            ws = self._workspaces.get(ref)
            if ws is None:
                auth = self._auth if self._auth is not None else _auth()
                # Without the flag the constructor calls ARM on every activity; a wrong
                # workspace surfaces instead as a 404 on the first run call.
                ws = self._workspaces[ref] = Workspace(
                    ref.subscription_id,
                    ref.resource_group,
                    ref.name,
                    auth=auth,
                    _disable_service_check=True,
                )
        return ws

    def _work(self) -> Path:
        return common.work_dir(self._work_dir_arg)

    @staticmethod
    def _raise_for(exc: Exception, workspace: common.WorkspaceRef, what: str) -> None:
        """Transient failures go up unchanged (the orchestrator retries); refusals become
        PermanentBackendError with what to fix."""
        import requests
        from azureml.exceptions import AzureMLException

        if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError)):
            raise exc
        text = str(exc)
        if common.storage_refused(exc):
            raise PermanentBackendError(
                f"Azure ML's storage refused the app's identity to {what} in workspace "
                f"{workspace} ({common.one_line(_service_message(text), 300)}); "
                f"{common.STORAGE_ROLE_HINT}"
            ) from None
        if type(exc).__name__ == "AuthenticationException" and common.transient_text(text):
            raise exc  # the managed-identity endpoint or Entra ID did not answer
        code = getattr(exc, "status_code", None)
        code = code if isinstance(code, int) else common.status_code_from_text(text)
        if common.transient_status(code):
            raise exc
        if isinstance(exc, AzureMLException) or code is not None:
            raise PermanentBackendError(
                common.permanent_hint(code, _service_message(text), workspace=workspace, what=what)
            ) from None
        raise exc

    def _get_run(self, ref: common.WorkspaceRef, run_id: str) -> Any | None:
        try:
            return self._service.get_run(self._workspace(ref), run_id)
        except PermanentBackendError:
            raise
        except Exception as exc:
            self._raise_for(exc, ref, f"read run {run_id}")
            raise

    # -- submit --------------------------------------------------------------------------------

    def _environment(self, spec: RunSpec, ref: common.WorkspaceRef) -> Any:
        """A private copy of the run's environment: NotebookRunConfig appends its pip package to
        whatever it is given, and in azureml-core 1.61 `Environment.clone` still shares the conda
        dependencies with the original, so only a deep copy leaves the caller's object alone."""
        from azureml.core import Environment
        from azureml.core.conda_dependencies import CondaDependencies

        reference = (
            spec.compute.get("environment")
            or os.environ.get(common.ENVIRONMENT_SETTING, "").strip()
        )
        if not reference:
            env = Environment(DEFAULT_ENVIRONMENT_NAME)
            env.python.conda_dependencies = CondaDependencies.create(
                python_version=DEFAULT_PYTHON,
                pip_packages=["azureml-defaults", "papermill", "ipykernel", SETUPTOOLS_PIN],
            )
            return env
        if not isinstance(reference, str):
            raise PermanentBackendError(f"compute.environment must be a string, got {reference!r}")
        name, version, label = parse_environment(reference)
        try:
            registered = self._service.get_environment(self._workspace(ref), name, version, label)
        except PermanentBackendError:
            raise
        except Exception as exc:
            self._raise_for(exc, ref, f"read environment {reference!r}")
            raise
        env = copy.deepcopy(registered)
        # A changed definition under the registered name would be auto-registered on submit
        # as a new version of the user's environment; give it a name of its own.
        env.name = f"{ENV_PREFIX}{name}"[:_ENV_NAME_MAX]
        env.version = None
        if not env.python.user_managed_dependencies:
            if not _setuptools_pinned_below_82(env):
                env.python.conda_dependencies.add_pip_package(SETUPTOOLS_PIN)
            # azureml-contrib-notebook (added by NotebookRunConfig) requires both today; listed
            # by name, the image has what the runner imports whatever that package declares.
            for package in RUNNER_PACKAGES:
                if not _lists(env, package):
                    env.python.conda_dependencies.add_pip_package(package)
        return env

    def build_config(self, spec: RunSpec, source_dir: Path, environment: Any) -> Any:
        """The NotebookRunConfig for `spec` over the staged copy `source_dir` (it writes the
        runner script into that folder and edits `environment`)."""
        from azureml.contrib.notebook import AzureMLNotebookHandler, NotebookRunConfig
        from azureml.core.runconfig import RunConfiguration

        notebook = (
            PurePosixPath(spec.notebook)
            .relative_to(PurePosixPath(spec.compute.get("sourceDirectory") or "."))
            .as_posix()
        )
        run_config = RunConfiguration()
        # The default target "local" would run the notebook inside the Function App.
        run_config.target = common.setting_or_compute(
            spec.compute, "target", common.COMPUTE_SETTING, self.name
        )
        run_config.environment = environment
        run_config.max_run_duration_seconds = common.job_timeout_seconds(spec)
        options: dict[str, Any] = {"log_output": True}
        folder = PurePosixPath(notebook).parent.as_posix()
        if folder != ".":
            options["cwd"] = folder  # the notebook sees its own folder, as in Jupyter
        if spec.compute.get("kernel"):
            options["kernel_name"] = str(spec.compute["kernel"])
        return NotebookRunConfig(
            source_directory=str(source_dir),
            notebook=notebook,
            # Only ./outputs is uploaded with the run; the default output path is not.
            output_notebook=f"outputs/{PurePosixPath(notebook).name}",
            parameters=spec.parameters,
            handler=AzureMLNotebookHandler(**options),
            run_config=run_config,
        )

    def submit(self, spec: RunSpec) -> RunHandle:
        ref = common.workspace_for(spec.compute)
        common.check_parameters(spec)
        output = f"outputs/{PurePosixPath(spec.notebook).name}"
        # Named in the result when the run's log shows the runner's packages missing.
        about: dict[str, Any] = {"environment": _environment_label(spec)}
        # The run id is the idempotency key (reference §6.3): find before creating.
        existing = self._get_run(ref, spec.run_key)
        if existing is not None:
            self._tag(ref, existing, spec)
            return self._handle(spec.run_key, existing, ref, output, about)
        staged = self._work() / "source" / spec.run_key
        try:
            inner = common.stage_source(spec, staged)
            environment = self._environment(spec, ref)
            about["userManaged"] = bool(environment.python.user_managed_dependencies)
            config = self.build_config(spec, staged, environment)
            # After NotebookRunConfig wrote its runner script: the snapshot is final.
            files, size = common.apply_ignore_files(staged, keep=[inner, config.script])
            common.check_snapshot_limits(files, size, spec)
            experiment = spec.compute.get("experiment") or "notebook-ci"
            try:
                run = self._service.submit(
                    self._workspace(ref), experiment, config, spec.run_key, dict(spec.tags)
                )
            except PermanentBackendError:
                raise
            except Exception as exc:
                if common.exists_error(str(exc)):
                    run = self._get_run(ref, spec.run_key)
                    if run is not None:
                        self._tag(ref, run, spec)
                        return self._handle(spec.run_key, run, ref, output, about)
                self._raise_for(exc, ref, f"submit run {spec.run_key}")
                raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return self._handle(spec.run_key, run, ref, output, about)

    def _tag(self, ref: common.WorkspaceRef, run: Any, spec: RunSpec) -> None:
        """The v1 start-run request carries no tags: `Experiment.submit` tags the run in a
        second call, so a crash or a lost answer in between leaves it untagged. A retried
        submit that finds the run adds whatever is missing."""
        try:
            current = run.get_tags() or {}
            missing = {k: v for k, v in spec.tags.items() if current.get(k) != v}
            if missing:
                run.set_tags(missing)
        except Exception as exc:
            self._raise_for(exc, ref, f"tag run {spec.run_key}")
            raise

    def _handle(
        self,
        run_id: str,
        run: Any,
        ref: common.WorkspaceRef,
        output: str,
        about: dict[str, Any] | None = None,
    ) -> RunHandle:
        try:
            portal = run.get_portal_url()
        except Exception:  # the link is a convenience; the run exists either way
            portal = None
        return RunHandle(
            backend=self.name,
            run_id=run_id,
            portal_url=portal,
            data={"workspace": ref.to_dict(), "output": output, **(about or {})},
        )

    # -- status, cancel, output ----------------------------------------------------------------

    def _run_for(self, handle: RunHandle) -> tuple[common.WorkspaceRef, Any | None]:
        ref = common.WorkspaceRef.from_dict(handle.data.get("workspace"))
        return ref, self._get_run(ref, handle.run_id)

    def find_run(self, compute: dict[str, Any], run_key: str, notebook: str) -> RunHandle | None:
        """The run submitted under `run_key` (its run id), or None: for a submit whose answer
        was lost and whose retries all failed, so the run may exist without a handle."""
        ref = common.workspace_for(compute)
        run = self._get_run(ref, run_key)
        if run is None:
            return None
        return self._handle(run_key, run, ref, f"outputs/{PurePosixPath(notebook).name}")

    def status(self, handle: RunHandle) -> RunStatus:
        ref, run = self._run_for(handle)
        if run is None:
            return RunStatus(
                state=FAILED,
                raw_status="NotFound",
                message=f"Azure ML run {handle.run_id!r} no longer exists in workspace {ref}",
            )
        try:
            raw = common.raw_status(run.get_status())
            details = run.get_details() or {}
        except Exception as exc:
            self._raise_for(exc, ref, f"read run {handle.run_id}")
            raise
        state, message = common.normalise_status(raw)
        error = None
        if state in TERMINAL_STATES:
            notebook, refused = self._output(ref, run, handle)
            error = error_from_file(notebook) if notebook and state == FAILED else None
            if state == FAILED and error is None and notebook and only_allowed_errors(notebook):
                state, message = SUCCEEDED, ALLOWED_ERRORS_MESSAGE
            elif refused:
                message = refused
            elif state == FAILED:
                reason = ((details.get("error") or {}).get("error") or {}).get("message")
                missing = self._missing_packages(run, handle) if error is None else None
                message = missing or (common.one_line(reason) if reason else None)
                if not message and not error:
                    message = (
                        "the run failed before the notebook produced output; see its logs in "
                        "Azure ML studio"
                    )
            elif state == CANCELED:
                message = (
                    "canceled in Azure ML (on request, by a person, or for exceeding its timeout)"
                )
        # Run history sets startTimeUtc when the run leaves the queue; while it waits for a
        # node or an image build the notebook has not started, whatever the DTO says.
        started = details.get("startTimeUtc") if state != QUEUED else None
        ended = details.get("endTimeUtc") if state in TERMINAL_STATES else None
        return RunStatus(
            state=state,
            raw_status=raw,
            error=error,
            started_at=started if started and parse_iso(started) else None,
            ended_at=ended if ended and parse_iso(ended) else None,
            message=message,
        )

    def _output(
        self, ref: common.WorkspaceRef, run: Any, handle: RunHandle
    ) -> tuple[Path | None, str | None]:
        """(executed notebook, why it cannot be read) of a terminal run. A refused download
        keeps the run's verdict and says why, once, instead of failing every round; it is
        remembered, so fetch_output after status does not wait out azureml-core's retries
        (5 tries, 4.6 minutes of sleeps) a second time."""
        if handle.run_id in self._refused:
            return None, self._refused[handle.run_id]
        try:
            return self._download(ref, run, handle), None
        except PermanentBackendError as exc:
            why = f"the run ended but its output could not be downloaded: {exc}"
            self._refused[handle.run_id] = why
            return None, why

    def _missing_packages(self, run: Any, handle: RunHandle) -> str | None:
        """Why a run failed before any cell, when its log says the runner's packages are
        missing: a user-managed environment (a Docker image, a given interpreter) gets no
        packages from us, so azureml-contrib-notebook's handler dies on its imports. Best
        effort: None when the log cannot be read or says something else."""
        try:
            names = [n for n in run.get_file_names() if _LOG_FILE.search(n)]
            found: dict[str, str] = {}
            for name in names[:_LOGS_READ]:
                text = self._log_tail(run, handle, name)
                for match in _NO_MODULE.finditer(text):
                    package = _RUNNER_PACKAGES.get(match["module"].split(".")[0])
                    if package and package not in found:
                        found[package] = f'{name} says "{match[0]}"'
        except Exception as exc:  # the log is a diagnosis, never the verdict
            log.info("log of run %s unavailable: %s", handle.run_id, common.one_line(exc, 200))
            return None
        if not found:
            return None
        return missing_packages_message(
            str(handle.data.get("environment") or "the run's environment"),
            list(found),
            handle.data.get("userManaged"),
            next(iter(found.values())),
        )

    def _log_tail(self, run: Any, handle: RunHandle, name: str) -> str:
        folder = self._work() / "outputs" / handle.run_id / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / PurePosixPath(name).name
        if not path.is_file():
            run.download_file(name, output_file_path=str(path))
        with open(path, "rb") as handle_:
            handle_.seek(max(0, path.stat().st_size - _LOG_TAIL_BYTES))
            return handle_.read().decode("utf-8", errors="replace")

    def cancel(self, handle: RunHandle) -> None:
        ref, run = self._run_for(handle)
        if run is None:
            return
        try:
            if common.normalise_status(run.get_status())[0] in TERMINAL_STATES:
                return
            run.cancel()
        except Exception as exc:
            self._raise_for(exc, ref, f"cancel run {handle.run_id}")
            raise

    def _download(self, ref: common.WorkspaceRef, run: Any, handle: RunHandle) -> Path | None:
        name = handle.data.get("output")
        if not isinstance(name, str) or not name.startswith("outputs/") or ".." in name:
            raise PermanentBackendError(f"run handle has no valid output path: {handle.data!r}")
        cache = self._work() / "outputs" / handle.run_id
        found = cache / PurePosixPath(name).name
        if found.is_file():
            return found
        try:
            if name not in run.get_file_names():
                return None
            cache.mkdir(parents=True, exist_ok=True)
            partial = found.with_name(found.name + ".partial")
            run.download_file(name, output_file_path=str(partial))
        except Exception as exc:
            self._raise_for(exc, ref, f"download {name} of run {handle.run_id}")
            raise
        partial.replace(found)
        return found

    def fetch_output(self, handle: RunHandle, dest: Path) -> Path | None:
        ref, run = self._run_for(handle)
        if run is None:
            return None
        raw = common.raw_status(run.get_status())
        if common.normalise_status(raw)[0] not in TERMINAL_STATES:
            raise RunNotFinishedError(
                f"Azure ML run {handle.run_id!r} has not finished (status {raw})"
            )
        found, refused = self._output(ref, run, handle)
        if found is None or refused:
            return None  # status() has said why
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / found.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if raw == "Failed" and only_allowed_errors(found):
            # The verdict is `succeeded` (see status): drop papermill's red "An exception was
            # encountered" markers, as the v2 entry script does for the same notebook.
            nb = load_notebook_json(found) or {}
            nb["cells"] = [c for c in nb.get("cells") or [] if not _is_marker(c)]
            dest.write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding="utf-8")
            return dest
        shutil.copyfile(found, dest)
        return dest


ALLOWED_ERRORS_MESSAGE = (
    "every error was in a cell tagged raises-exception, which is allowed; Azure ML reports "
    "the run Failed because papermill's final check (in azureml-contrib-notebook's runner) "
    "fails such notebooks"
)


def _is_marker(cell: Any) -> bool:
    tags = (cell.get("metadata") or {}).get("tags") if isinstance(cell, dict) else None
    return isinstance(tags, list) and ERROR_MARKER_TAG in tags


def only_allowed_errors(path: Path) -> bool:
    """True when papermill ran every cell of the executed notebook at `path` to its end and
    its only errors are in cells tagged `raises-exception`.

    nbclient lets such a cell fail and goes on, but papermill's final check then raises at it,
    so the v1 runner fails the run; the local backend and the v2 entry script let it pass.
    Anything else is a real failure: a notebook papermill did not finish (its end time unset),
    a cell that never started or never ended (a kill, a timeout, a dead kernel), a cell error
    not allowed, or no error at all (the run failed for another reason)."""
    nb = load_notebook_json(path)
    if nb is None or not isinstance(nb.get("cells"), list):
        return False
    meta = (nb.get("metadata") or {}).get("papermill")
    if not isinstance(meta, dict) or not meta.get("end_time"):
        return False
    allowed = False
    for cell in nb["cells"]:
        if not isinstance(cell, dict) or _is_marker(cell):
            continue
        timing = (cell.get("metadata") or {}).get("papermill") or {}
        if not (isinstance(timing, dict) and timing.get("start_time") and timing.get("end_time")):
            return False
        tags = (cell.get("metadata") or {}).get("tags") or []
        errors = [o for o in cell.get("outputs") or [] if o.get("output_type") == "error"]
        allowed = allowed or bool(errors and ALLOW_ERRORS_TAG in tags)
    return allowed and first_error(nb) is None


def missing_packages_message(
    environment: str, packages: list[str], user_managed: bool | None, evidence: str
) -> str:
    names = " and ".join(packages)
    if user_managed is True:
        fix = (
            f"its dependencies are user-managed (a Docker image or a given interpreter), so "
            f"notebookops cannot add them: install {' '.join(packages)} in that image"
        )
    elif user_managed is False:
        fix = f"add {' '.join(packages)} to its pip dependencies and register a new version"
    else:
        fix = (
            f"add {' '.join(packages)} to its pip dependencies, or to its Docker image when its "
            "dependencies are user-managed"
        )
    return (
        f"the environment {environment} lacks {names}, which the azureml-v1 runner "
        f"(azureml-contrib-notebook's papermill handler) needs ({evidence}); {fix}"
    )


# What the runner imports, by the module a failed import names.
_RUNNER_PACKAGES = {
    "papermill": "papermill",
    "ipykernel": "ipykernel",
    "ipykernel_launcher": "ipykernel",  # a kernelspec pointing at a Python without ipykernel
    "azureml": "azureml-contrib-notebook",  # the handler's first import
}
_NO_MODULE = re.compile(r"No module named '?(?P<module>[A-Za-z_][\w.]*)'?")
# The driver's stdout/stderr: user_logs/std_log.txt on current images, 70_driver_log before.
_LOG_FILE = re.compile(r"(?:^|/)(?:user_logs/std_log|azureml-logs/70_driver_log)[^/]*\.txt$")
_LOGS_READ = 4
_LOG_TAIL_BYTES = 256 * 1024


def _environment_label(spec: RunSpec) -> str:
    reference = (
        spec.compute.get("environment") or os.environ.get(common.ENVIRONMENT_SETTING, "").strip()
    )
    return str(reference) if reference else f"{DEFAULT_ENVIRONMENT_NAME} (notebookops' default)"


def _service_message(text: str) -> str:
    """v1 raises the service's JSON answer as exception text; keep its message only."""
    try:
        data = json.loads(text)
        message = data["error_details"]["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text
    return str(message)
