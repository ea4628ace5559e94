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
    TERMINAL_STATES,
    PermanentBackendError,
    RunHandle,
    RunNotFinishedError,
    RunSpec,
    RunStatus,
    parse_iso,
)
from notebookops.notebook_errors import error_from_file

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
        if not env.python.user_managed_dependencies and not _setuptools_pinned_below_82(env):
            env.python.conda_dependencies.add_pip_package(SETUPTOOLS_PIN)
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
        # The run id is the idempotency key (reference §6.3): find before creating.
        existing = self._get_run(ref, spec.run_key)
        if existing is not None:
            self._tag(ref, existing, spec)
            return self._handle(spec.run_key, existing, ref, output)
        staged = self._work() / "source" / spec.run_key
        try:
            inner = common.stage_source(spec, staged)
            config = self.build_config(spec, staged, self._environment(spec, ref))
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
                        return self._handle(spec.run_key, run, ref, output)
                self._raise_for(exc, ref, f"submit run {spec.run_key}")
                raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        return self._handle(spec.run_key, run, ref, output)

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

    def _handle(self, run_id: str, run: Any, ref: common.WorkspaceRef, output: str) -> RunHandle:
        try:
            portal = run.get_portal_url()
        except Exception:  # the link is a convenience; the run exists either way
            portal = None
        return RunHandle(
            backend=self.name,
            run_id=run_id,
            portal_url=portal,
            data={"workspace": ref.to_dict(), "output": output},
        )

    # -- status, cancel, output ----------------------------------------------------------------

    def _run_for(self, handle: RunHandle) -> tuple[common.WorkspaceRef, Any | None]:
        ref = common.WorkspaceRef.from_dict(handle.data.get("workspace"))
        return ref, self._get_run(ref, handle.run_id)

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
        if state == FAILED:
            try:
                notebook = self._download(ref, run, handle)
            except PermanentBackendError as exc:  # the verdict stands; say why there is no cell
                notebook, message = None, f"the run failed and its output could not be read: {exc}"
            error = error_from_file(notebook) if notebook else None
            reason = ((details.get("error") or {}).get("error") or {}).get("message")
            message = common.one_line(reason) if reason else message
            if not message and not error:
                message = (
                    "the run failed before the notebook produced output; see its logs in "
                    "Azure ML studio"
                )
        elif state == CANCELED:
            message = "canceled in Azure ML (on request, by a person, or for exceeding its timeout)"
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
        try:
            found = self._download(ref, run, handle)
        except PermanentBackendError:
            return None  # status() has said why
        if found is None:
            return None
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / found.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, dest)
        return dest


def _service_message(text: str) -> str:
    """v1 raises the service's JSON answer as exception text; keep its message only."""
    try:
        data = json.loads(text)
        message = data["error_details"]["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text
    return str(message)
