"""The `azureml` backend: one Azure ML command job (azure-ai-ml, SDK v2) per notebook, running
papermill through a small entry script shipped with the code.

App settings: AZUREML_SUBSCRIPTION_ID, AZUREML_RESOURCE_GROUP, AZUREML_WORKSPACE (or
`compute.workspace` in the message), optional AZUREML_COMPUTE / AZUREML_ENVIRONMENT defaults for
`compute.target` / `compute.environment`. Credentials come from DefaultAzureCredential: the
managed identity in Azure, AZURE_TENANT_ID/AZURE_CLIENT_ID/AZURE_CLIENT_SECRET or `az login`
elsewhere. azure-ai-ml is imported on first use only.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from notebookops.compute import azureml_common as common
from notebookops.compute.base import (
    CANCELED,
    FAILED,
    TERMINAL_STATES,
    PermanentBackendError,
    RunHandle,
    RunNotFinishedError,
    RunSpec,
    RunStatus,
)
from notebookops.compute.papermill_entry import ENTRY_FILE_NAME, encode_job
from notebookops.notebook_errors import error_from_file

OUTPUT_NAME = "notebook"
_ENTRY_SOURCE = Path(__file__).with_name("papermill_entry.py")
# azure-core retries PUT/GET 10 times with backoff by default; fewer here, because the
# orchestrator retries the whole activity and a long stall holds an activity slot.
_SDK_RETRIES = 3

ClientFactory = Callable[[common.WorkspaceRef], Any]


def _default_client(workspace: common.WorkspaceRef) -> Any:
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    return MLClient(
        DefaultAzureCredential(exclude_interactive_browser_credential=True),
        subscription_id=workspace.subscription_id,
        resource_group_name=workspace.resource_group,
        workspace_name=workspace.name,
        show_progress=False,
        retry_total=_SDK_RETRIES,
    )


class AzureMLBackend:
    name = "azureml"
    poll_policy = common.AZUREML_POLL_POLICY

    def __init__(
        self,
        client_factory: ClientFactory | None = None,
        work_dir: Path | str | None = None,
    ) -> None:
        self._client_factory = client_factory or _default_client
        self._work_dir_arg = work_dir
        self._clients: dict[common.WorkspaceRef, Any] = {}
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------------

    def _jobs(self, workspace: common.WorkspaceRef) -> Any:
        with self._lock:
            client = self._clients.get(workspace)
            if client is None:
                client = self._clients[workspace] = self._client_factory(workspace)
        return client.jobs

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

    def build_job(self, spec: RunSpec, code_dir: Path) -> Any:
        """The command job for `spec`, with `code_dir` already staged (see `submit`)."""
        from azure.ai.ml import Output, command

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
        }
        return command(
            name=spec.run_key,
            display_name=spec.notebook,
            experiment_name=spec.compute.get("experiment") or "notebook-ci",
            code=str(code_dir),
            command=(
                f"python {ENTRY_FILE_NAME} --output-dir ${{{{outputs.{OUTPUT_NAME}}}}} "
                f"--job {encode_job(job)}"
            ),
            outputs={OUTPUT_NAME: Output(type="uri_folder", mode="rw_mount")},
            environment=common.setting_or_compute(
                spec.compute, "environment", common.ENVIRONMENT_SETTING, self.name
            ),
            compute=common.setting_or_compute(
                spec.compute, "target", common.COMPUTE_SETTING, self.name
            ),
            timeout=common.job_timeout_seconds(spec),
            tags=dict(spec.tags),
        )

    def submit(self, spec: RunSpec) -> RunHandle:
        workspace = common.workspace_for(spec.compute)
        common.check_parameters(spec)
        output = PurePosixPath(spec.notebook).name
        # The job name is the idempotency key: a retried submit finds the job instead of
        # starting a second one (reference §6.3).
        existing = self._get(workspace, spec.run_key)
        if existing is not None:
            return self._handle(spec.run_key, existing, workspace, output)
        code_dir = self._work() / "code" / spec.run_key
        try:
            common.stage_source(spec, code_dir)
            shutil.copyfile(_ENTRY_SOURCE, code_dir / ENTRY_FILE_NAME)
            job = self.build_job(spec, code_dir)
            try:
                created = self._jobs(workspace).create_or_update(job)
            except Exception as exc:
                if common.exists_error(str(exc)):
                    created = self._get(workspace, spec.run_key)
                    if created is not None:
                        return self._handle(spec.run_key, created, workspace, output)
                self._raise_for(exc, workspace, f"create job {spec.run_key}")
                raise
        finally:
            shutil.rmtree(code_dir, ignore_errors=True)
        return self._handle(spec.run_key, created, workspace, output)

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
        error = None
        if state == FAILED:
            notebook = self._download(workspace, handle)
            error = error_from_file(notebook) if notebook else None
            reason = self._service_error(workspace, handle.run_id)
            message = reason or (
                None
                if error
                else "the job failed before the notebook produced output; "
                "see the job's logs in Azure ML studio"
            )
        elif state == CANCELED:
            message = (
                "canceled in Azure ML (on request, by a person, or for exceeding the job's timeout)"
            )
        return RunStatus(state=state, raw_status=raw, error=error, message=message)

    def _service_error(self, workspace: common.WorkspaceRef, name: str) -> str | None:
        """The job's error text from run history. azure-ai-ml exposes it only through a private
        operations object, so this is best effort: the notebook's failing cell is the main report."""
        try:
            runs = self._jobs(workspace)._runs_operations
            error = runs.get_run(name).error
            text = getattr(getattr(error, "error", None), "message", None)
        except Exception:  # a missing detail must not hide the verdict
            return None
        return common.one_line(text) if text else None

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

    def _download(self, workspace: common.WorkspaceRef, handle: RunHandle) -> Path | None:
        """The executed notebook in the local cache, downloading it once per run."""
        from azure.ai.ml.exceptions import JobException

        output = handle.data.get("output")
        if not isinstance(output, str) or not output or "/" in output:
            raise PermanentBackendError(f"run handle has no valid output name: {handle.data!r}")
        cache = self._work() / "outputs" / handle.run_id
        found = cache / "named-outputs" / OUTPUT_NAME / output
        if found.is_file():
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
        downloaded = partial / "named-outputs" / OUTPUT_NAME / output
        if not downloaded.is_file():
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
        found = self._download(workspace, handle)
        if found is None:
            return None
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / found.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found, dest)
        return dest
