"""The `azureml` backend: one Azure ML command job (azure-ai-ml, SDK v2) per notebook, running
papermill through a small entry script shipped with the code.

App settings: AZUREML_SUBSCRIPTION_ID, AZUREML_RESOURCE_GROUP, AZUREML_WORKSPACE (or
`compute.workspace` in the message), optional AZUREML_COMPUTE / AZUREML_ENVIRONMENT defaults for
`compute.target` / `compute.environment`. Credentials come from DefaultAzureCredential: the
managed identity in Azure, AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET or `az login`
elsewhere. azure-ai-ml is imported on first use only.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

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
from notebookops.compute.papermill_entry import ENTRY_FILE_NAME, RESULT_FILE, encode_job
from notebookops.notebook_errors import error_from_file

log = logging.getLogger(__name__)

OUTPUT_NAME = "notebook"
_ENTRY_SOURCE = Path(__file__).with_name("papermill_entry.py")
# azure-core retries PUT/GET 10 times with backoff by default; fewer here, because the
# orchestrator retries the whole activity and a long stall holds an activity slot.
_SDK_RETRIES = 3


ClientFactory = Callable[[common.WorkspaceRef], Any]


def build_client(workspace: common.WorkspaceRef, credential: Any = None, **kwargs: Any) -> Any:
    """The MLClient every call goes through. `credential` defaults to DefaultAzureCredential;
    `kwargs` reach azure-core (tests pass `transport=` to answer as the service)."""
    from azure.ai.ml import MLClient

    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
    return MLClient(
        credential,
        subscription_id=workspace.subscription_id,
        resource_group_name=workspace.resource_group,
        workspace_name=workspace.name,
        show_progress=False,
        retry_total=_SDK_RETRIES,
        **kwargs,
    )


_shared_clients: dict[common.WorkspaceRef, Any] = {}
_shared_lock = threading.Lock()


def shared_client(workspace: common.WorkspaceRef) -> Any:
    """One MLClient per workspace for the process: the registry makes a backend per activity,
    and a fresh client would pay the credential's token and run history's discovery (two
    more ARM reads) on every monitor round."""
    with _shared_lock:
        client = _shared_clients.get(workspace)
        if client is None:
            client = _shared_clients[workspace] = build_client(workspace)
    return client


class AzureMLBackend:
    name = "azureml"
    poll_policy = common.AZUREML_POLL_POLICY
    # Azure ML announces run ends through Event Grid (notebookops.run_events, AzureMLEvents).
    pushes_events = True

    def __init__(
        self,
        client_factory: ClientFactory | None = None,
        work_dir: Path | str | None = None,
    ) -> None:
        self._client_factory = client_factory or shared_client
        self._work_dir_arg = work_dir
        self._clients: dict[common.WorkspaceRef, Any] = {}
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------------

    def _client(self, workspace: common.WorkspaceRef) -> Any:
        with self._lock:
            client = self._clients.get(workspace)
            if client is None:
                client = self._clients[workspace] = self._client_factory(workspace)
        return client

    def _jobs(self, workspace: common.WorkspaceRef) -> Any:
        return self._client(workspace).jobs

    def _work(self) -> Path:
        return common.work_dir(self._work_dir_arg)

    @staticmethod
    def _raise_for(exc: Exception, workspace: common.WorkspaceRef, what: str) -> None:
        """Re-raise transient failures as they are; turn refusals into PermanentBackendError."""
        from azure.ai.ml.exceptions import ValidationException
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            ServiceRequestError,
            ServiceResponseError,
        )

        if isinstance(exc, (ServiceRequestError, ServiceResponseError, ConnectionError)):
            raise exc
        if common.storage_refused(exc):
            raise PermanentBackendError(
                f"Azure ML could not read the storage of workspace {workspace} to {what} "
                f"({common.one_line(exc, 300)}); {common.STORAGE_ROLE_HINT}"
            ) from None
        if isinstance(exc, ClientAuthenticationError) and _credential_hiccup(exc):
            raise exc  # the identity endpoint or Entra ID did not answer: try again later
        if isinstance(exc, ClientAuthenticationError):
            raise PermanentBackendError(
                f"cannot authenticate to Azure ML workspace {workspace} to {what} "
                f"({type(exc).__name__}: {common.one_line(exc, 300)}); configure the Function "
                "App's managed identity (or AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET) "
                f"and {common.ROLE_HINT}"
            ) from None
        if isinstance(exc, HttpResponseError):
            code = exc.status_code
            # A concurrent code upload can collide on the blob; the next attempt succeeds.
            if common.transient_status(code) or "blob already exists" in str(exc).lower():
                raise exc
            message = getattr(getattr(exc, "error", None), "message", None) or exc.message
            raise PermanentBackendError(
                common.permanent_hint(code, str(message), workspace=workspace, what=what)
            ) from None
        if isinstance(exc, ValidationException) or type(exc).__module__.startswith("azure.ai.ml"):
            raise PermanentBackendError(
                common.permanent_hint(None, str(exc), workspace=workspace, what=what)
            ) from None
        raise exc

    def _get(self, workspace: common.WorkspaceRef, name: str) -> Any | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self._jobs(workspace).get(name)
        except ResourceNotFoundError:
            return None
        except Exception as exc:
            self._raise_for(exc, workspace, f"read job {name}")
            raise

    # -- submit --------------------------------------------------------------------------------

    def build_job(self, spec: RunSpec, code: str) -> Any:
        """The command job for `spec` over the staged folder `code` (see `submit`)."""
        from azure.ai.ml import Output, command

        environment = common.environment_for(spec.compute, self.name)
        if environment is None:
            raise PermanentBackendError(
                f"compute.environment is required for backend {self.name!r} (or set the app "
                f"setting {common.ENVIRONMENT_SETTING}); use "
                f"{common.ENVIRONMENT_FORMS[self.name]}"
            )
        notebook = (
            PurePosixPath(spec.notebook)
            .relative_to(PurePosixPath(spec.compute.get("sourceDirectory") or "."))
            .as_posix()
        )
        job = {
            "notebook": notebook,
            "output": PurePosixPath(notebook).name,
            "parameters": spec.parameters,
            "kernel": spec.compute.get("kernel"),
            # Named in the entry script's report when the image lacks papermill or ipykernel.
            "environment": environment.for_v2(),
        }
        return command(
            name=spec.run_key,
            display_name=spec.notebook,
            experiment_name=spec.compute.get("experiment") or "notebook-ci",
            code=code,
            command=(
                f"python {ENTRY_FILE_NAME} --output-dir ${{{{outputs.{OUTPUT_NAME}}}}} "
                f"--job {encode_job(job)}"
            ),
            outputs={OUTPUT_NAME: Output(type="uri_folder", mode="rw_mount")},
            environment=environment.for_v2(),
            compute=common.setting_or_compute(
                spec.compute, "target", common.COMPUTE_SETTING, self.name
            ),
            timeout=common.job_timeout_seconds(spec),
            tags=dict(spec.tags),
        )

    def submit(self, spec: RunSpec) -> RunHandle:
        workspace = common.workspace_for(spec.compute)
        common.check_parameters(spec)
        common.environment_for(spec.compute, self.name)  # a bad reference fails before any call
        output = PurePosixPath(spec.notebook).name
        # The job name is the idempotency key: a retried submit finds the job instead of
        # starting a second one (reference §6.3).
        existing = self._get(workspace, spec.run_key)
        if existing is not None:
            return self._handle(spec.run_key, existing, workspace, output)
        # One folder per (commit, sourceDirectory), shared by the commit's notebooks: the SDK
        # finds the code asset by its content hash and uploads it once.
        code_dir, _ = common.shared_upload_folder(
            spec, self._work() / "code", {ENTRY_FILE_NAME: _ENTRY_SOURCE}
        )
        job = self.build_job(spec, code_dir)
        try:
            created = self._create(workspace, job, Path(code_dir))
        except Exception as exc:
            if common.exists_error(str(exc)) or _ambiguous(exc):
                # The PUT may have reached the service before the answer was lost.
                created = self._get(workspace, spec.run_key)
                if created is not None:
                    return self._handle(spec.run_key, created, workspace, output)
            self._raise_for(exc, workspace, f"create job {spec.run_key}")
            raise
        return self._handle(spec.run_key, created, workspace, output)

    def _create(self, workspace: common.WorkspaceRef, job: Any, code_dir: Path) -> Any:
        """create_or_update, the first one of a snapshot under a lock: the SDK registers the
        code asset inside it, and submits of the same commit running at once would each miss
        the others' asset by content hash and upload the same snapshot again. Later ones find
        it and go in parallel."""
        marker = code_dir.with_name(f"{code_dir.name}.registered-{_slug(str(workspace))}")
        if not marker.exists():
            with common.folder_lock(code_dir):
                if not marker.exists():
                    created = self._jobs(workspace).create_or_update(job)
                    marker.touch()
                    return created
        return self._jobs(workspace).create_or_update(job)

    def _handle(
        self, name: str, job: Any, workspace: common.WorkspaceRef, output: str
    ) -> RunHandle:
        return RunHandle(
            backend=self.name,
            run_id=name,
            portal_url=getattr(job, "studio_url", None),
            data={"workspace": workspace.to_dict(), "output": output},
        )

    # -- status, cancel, output ----------------------------------------------------------------

    def find_run(self, compute: dict[str, Any], run_key: str, notebook: str) -> RunHandle | None:
        """The job named `run_key`, or None: for a submit whose answer was lost and whose
        retries all failed, so the job may exist without a handle."""
        workspace = common.workspace_for(compute)
        job = self._get(workspace, run_key)
        if job is None:
            return None
        return self._handle(run_key, job, workspace, PurePosixPath(notebook).name)

    def status(self, handle: RunHandle) -> RunStatus:
        workspace = common.WorkspaceRef.from_dict(handle.data.get("workspace"))
        job = self._get(workspace, handle.run_id)
        if job is None:
            # The job was deleted, or the workspace setting changed under a running request.
            return RunStatus(
                state=FAILED,
                raw_status="NotFound",
                message=f"Azure ML job {handle.run_id!r} no longer exists in workspace {workspace}",
            )
        raw = common.raw_status(job.status)
        state, message = common.normalise_status(raw)
        # Queued covers NotStarted, Starting, Provisioning, Preparing and Queued: the notebook
        # does not execute yet, so no start time is asked for (run history has none either).
        run = self._run_history(workspace, handle.run_id) if state != QUEUED else None
        started, ended, reason = run or (None, None, None)
        error = None
        if state in TERMINAL_STATES:
            notebook, report, refused = self._outputs(workspace, handle)
            error = error_from_file(notebook) if notebook and state == FAILED else None
            if refused:
                message = refused
            elif report:
                message = report
            elif state == FAILED:
                message = reason or (
                    None
                    if error
                    else "the job failed before the notebook produced output; "
                    "see the job's logs in Azure ML studio"
                )
            elif state == CANCELED:
                message = (
                    "canceled in Azure ML (on request, by a person, or for exceeding the job's "
                    "timeout)"
                )
        return RunStatus(
            state=state,
            raw_status=raw,
            error=error,
            started_at=started if state != QUEUED else None,
            ended_at=ended if state in TERMINAL_STATES else None,
            message=message,
        )

    def _run_history(
        self, workspace: common.WorkspaceRef, name: str
    ) -> tuple[str | None, str | None, str | None] | None:
        """(start, end, service error) from run history: azure-ai-ml's public `Job` carries no
        times, so this goes through its RunOperations (`jobs._runs_operations`). Best effort:
        without it the orchestrator counts from the round that first saw the job running."""
        try:
            run = self._jobs(workspace)._runs_operations.get_run(name)
        except Exception as exc:  # a missing detail must not hide the verdict
            log.info("run history of %s unavailable: %s", name, common.one_line(exc, 200))
            return None
        text = getattr(getattr(getattr(run, "error", None), "error", None), "message", None)
        return (
            _iso(getattr(run, "start_time_utc", None)),
            _iso(getattr(run, "end_time_utc", None)),
            common.one_line(text) if text else None,
        )

    def cancel(self, handle: RunHandle) -> None:
        workspace = common.WorkspaceRef.from_dict(handle.data.get("workspace"))
        job = self._get(workspace, handle.run_id)
        if job is None or common.normalise_status(job.status)[0] in TERMINAL_STATES:
            return
        try:
            self._jobs(workspace).begin_cancel(handle.run_id).result()
        except Exception as exc:
            after = self._get(workspace, handle.run_id)
            if after is not None and common.normalise_status(after.status)[0] in TERMINAL_STATES:
                return  # it finished while we asked
            self._raise_for(exc, workspace, f"cancel job {handle.run_id}")
            raise

    def _outputs(
        self, workspace: common.WorkspaceRef, handle: RunHandle
    ) -> tuple[Path | None, str | None, str | None]:
        """(executed notebook, the entry script's report, why the output cannot be read) of a
        terminal job. A refused download is reported, never retried round after round: the
        job's verdict stands and the message names the storage role."""
        try:
            folder = self._download(workspace, handle)
        except PermanentBackendError as exc:
            return None, None, f"the job ended but its output could not be downloaded: {exc}"
        if folder is None:
            return None, None, None
        notebook = folder / handle.data["output"]
        return (notebook if notebook.is_file() else None), _entry_report(folder), None

    def _download(self, workspace: common.WorkspaceRef, handle: RunHandle) -> Path | None:
        """The job's named output folder in the local cache, downloading it once per run."""
        from azure.ai.ml.exceptions import JobException

        output = handle.data.get("output")
        if not isinstance(output, str) or not output or "/" in output:
            raise PermanentBackendError(f"run handle has no valid output name: {handle.data!r}")
        cache = self._work() / "outputs" / handle.run_id
        found = cache / "named-outputs" / OUTPUT_NAME
        if (found / output).is_file() or (found / RESULT_FILE).is_file():
            return found
        partial = cache.with_name(cache.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            self._jobs(workspace).download(
                handle.run_id, download_path=str(partial), output_name=OUTPUT_NAME
            )
        except JobException as exc:
            raise RunNotFinishedError(
                f"Azure ML job {handle.run_id!r} is not finished: {common.one_line(exc, 200)}"
            ) from None
        except Exception as exc:
            self._raise_for(exc, workspace, f"download the output of job {handle.run_id}")
            raise
        downloaded = partial / "named-outputs" / OUTPUT_NAME
        if not (downloaded / output).is_file() and not (downloaded / RESULT_FILE).is_file():
            shutil.rmtree(partial, ignore_errors=True)
            return None
        shutil.rmtree(cache, ignore_errors=True)
        partial.rename(cache)
        return found

    def fetch_output(self, handle: RunHandle, dest: Path) -> Path | None:
        workspace = common.WorkspaceRef.from_dict(handle.data.get("workspace"))
        job = self._get(workspace, handle.run_id)
        if job is None:
            return None
        state, _ = common.normalise_status(job.status)
        if state not in TERMINAL_STATES:
            raise RunNotFinishedError(
                f"Azure ML job {handle.run_id!r} has not finished "
                f"(status {common.raw_status(job.status)})"
            )
        notebook, _, refused = self._outputs(workspace, handle)
        if notebook is None or refused:
            return None  # status() has said why
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / notebook.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(notebook, dest)
        return dest


def _slug(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _iso(value: Any) -> str | None:
    """Run history's times as ISO 8601 UTC with `Z` (RunStatus' format)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return str(value) if parse_iso(str(value)) else None


def _ambiguous(exc: Exception) -> bool:
    """A failure after which the job may exist: the connection broke, or the answer was 5xx."""
    from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(exc, ServiceResponseError):
        return True
    if isinstance(exc, ServiceRequestError):
        return False  # the request never left
    return isinstance(exc, HttpResponseError) and (exc.status_code or 0) >= 500


def _credential_hiccup(exc: Exception) -> bool:
    """Transient credential failures: the managed-identity endpoint or Entra ID did not answer
    (no HTTP response, a 5xx or 429). A 400/401 answer (unknown client, wrong secret) or a
    401/403 from Azure ML itself is a configuration problem and stays permanent."""
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None) or getattr(exc, "status_code", None)
    if code is not None:
        return common.transient_status(code)
    return common.transient_text(str(exc))


def _entry_report(folder: Path) -> str | None:
    """The message the entry script left when it could not run the notebook (a missing package,
    a kernel the image lacks)."""
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    message = data.get("message") if isinstance(data, dict) else None
    return common.one_line(message) if isinstance(message, str) and message else None
