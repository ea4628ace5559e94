"""Recording fakes for the only parts of Azure ML that cannot be reached from here: the v2
`MLClient.jobs` operations and the v1 run service (`Experiment.submit` / `Run`).

They follow the documented status sequences (reference/azureml.md §3.1, §4.3): every read of
a live job moves it one step along its script, a cancel goes through CancelRequested to
Canceled, and output downloads are refused before a terminal status, as the SDKs do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HAPPY = ["NotStarted", "Queued", "Preparing", "Running", "Finalizing", "Completed"]
FAILING = ["NotStarted", "Queued", "Running", "Failed"]
SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"


def notebook_json(error: tuple[str, str] | None = None) -> dict[str, Any]:
    """An executed notebook as papermill writes it, failing in source cell 1 if `error`."""
    cells: list[dict[str, Any]] = [
        {"cell_type": "markdown", "metadata": {}, "source": "# title"},
        {"cell_type": "code", "metadata": {}, "source": "x = 1", "outputs": []},
    ]
    if error:
        cells[1]["outputs"] = [
            {"output_type": "error", "ename": error[0], "evalue": error[1], "traceback": ["tb"]}
        ]
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


class Script:
    """A status script: each read returns the current status, then advances one step."""

    def __init__(self, statuses: list[str]) -> None:
        self.statuses = list(statuses)
        self.position = 0
        self.cancel_requested = False

    @property
    def current(self) -> str:
        return self.statuses[self.position]

    def read(self) -> str:
        status = self.current
        if self.position < len(self.statuses) - 1:
            self.position += 1
        return status

    def cancel(self) -> None:
        if self.current in ("Completed", "Failed", "Canceled"):
            return
        self.cancel_requested = True
        self.statuses = [*self.statuses[: self.position], "CancelRequested", "Canceled"]


# -- v2 ------------------------------------------------------------------------------------


class _Poller:
    def __init__(self) -> None:
        self.waited = False

    def result(self) -> None:
        self.waited = True


class _RunsOperations:
    def __init__(self, jobs: FakeJobOperations) -> None:
        self._jobs = jobs

    def get_run(self, name: str) -> Any:
        from types import SimpleNamespace

        message = self._jobs.service_errors.get(name)
        error = SimpleNamespace(error=SimpleNamespace(message=message)) if message else None
        return SimpleNamespace(error=error)


class FakeJobOperations:
    """Stands in for `MLClient.jobs`. Records the REST body each created job would PUT (through
    the SDK's own serialiser) and serves real `Job` objects rebuilt from it."""

    def __init__(self, workspace: str = "ws") -> None:
        self.workspace = workspace
        self.bodies: dict[str, dict[str, Any]] = {}
        self.scripts: dict[str, Script] = {}
        self.calls: list[tuple[str, str]] = []
        self.next_script: list[str] = HAPPY
        self.notebooks: dict[str, dict[str, Any]] = {}  # job name -> executed notebook JSON
        self.service_errors: dict[str, str] = {}
        self.lose_next_response = False  # create the job, then fail as a dropped connection
        self.create_error: Exception | None = None
        self.code_snapshots: dict[str, dict[str, bytes]] = {}
        self._runs_operations = _RunsOperations(self)
        self._rest: dict[str, Any] = {}

    def create_or_update(self, job: Any) -> Any:
        from azure.ai.ml.entities._job.to_rest_functions import to_rest_job_object
        from azure.core.exceptions import ServiceResponseError

        self.calls.append(("create_or_update", job.name))
        if self.create_error is not None:
            raise self.create_error
        if job.name in self.scripts:
            # What the service answers to a second PUT of a running job's name.
            from azure.core.exceptions import ResourceExistsError

            raise ResourceExistsError(f"A job with this ID already exists: {job.name}")
        code = Path(job.code)
        self.code_snapshots[job.name] = {
            p.relative_to(code).as_posix(): p.read_bytes()
            for p in sorted(code.rglob("*"))
            if p.is_file()
        }
        rest = to_rest_job_object(job)
        self.bodies[job.name] = rest.as_dict()
        rest.id = (
            f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg/providers/"
            f"Microsoft.MachineLearningServices/workspaces/{self.workspace}/jobs/{job.name}"
        )
        self._rest[job.name] = rest
        self.scripts[job.name] = Script(self.next_script)
        if self.lose_next_response:
            self.lose_next_response = False
            raise ServiceResponseError("Connection aborted: the response was lost")
        return self._job(job.name, self.scripts[job.name].current)

    def _job(self, name: str, status: str) -> Any:
        from azure.ai.ml.entities import Job

        rest = self._rest[name]
        rest.properties.status = status
        return Job._from_rest_object(rest)

    def get(self, name: str) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        self.calls.append(("get", name))
        if name not in self.scripts:
            raise ResourceNotFoundError(f"Job {name} not found")
        return self._job(name, self.scripts[name].read())

    def begin_cancel(self, name: str) -> _Poller:
        from azure.core.exceptions import ResourceNotFoundError

        self.calls.append(("begin_cancel", name))
        if name not in self.scripts:
            raise ResourceNotFoundError(f"Job {name} not found")
        self.scripts[name].cancel()
        return _Poller()

    def download(self, name: str, *, download_path: str, output_name: str | None = None) -> None:
        from azure.ai.ml.exceptions import JobException

        self.calls.append(("download", name))
        status = self.scripts[name].current
        if status not in ("Completed", "Failed", "Canceled", "NotResponding", "Paused"):
            raise JobException(
                message=f"job {name} is in status {status}",
                no_personal_data_message="job not terminal",
            )
        notebook = self.notebooks.get(name)
        if notebook is None:
            return
        folder = Path(download_path) / "named-outputs" / output_name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / self.output_file(name)).write_text(json.dumps(notebook))

    def output_file(self, name: str) -> str:
        from notebookops.compute.papermill_entry import decode_job

        command = self.bodies[name]["properties"]["command"]
        return decode_job(command.split("--job ", 1)[1].split()[0])["output"]

    def count(self, operation: str) -> int:
        return sum(1 for op, _ in self.calls if op == operation)


def offline_client(jobs: FakeJobOperations, workspace: Any) -> Any:
    """A real MLClient (built offline, no credential use) whose `jobs` operations are the fake."""
    from azure.ai.ml import MLClient
    from azure.identity import ClientSecretCredential

    client = MLClient(
        ClientSecretCredential("tenant", "client", "not-a-real-secret"),
        subscription_id=workspace.subscription_id,
        resource_group_name=workspace.resource_group,
        workspace_name=workspace.name,
        show_progress=False,
    )
    client._jobs = jobs  # the network boundary, and nothing else, is replaced
    return client


# -- v1 ------------------------------------------------------------------------------------


class FakeRun:
    """Stands in for `azureml.core.Run` (whose constructor needs the service)."""

    def __init__(self, service: FakeV1Service, run_id: str, workspace: Any) -> None:
        self.service = service
        self.id = run_id
        self.workspace = workspace
        self.script = Script(service.next_script)
        self.files: dict[str, bytes] = {}
        self.error_message: str | None = None

    def get_status(self) -> str:
        self.service.calls.append(("get_status", self.id))
        return self.script.read()

    def get_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {"runId": self.id, "status": self.script.current}
        if self.script.position > 0:
            details["startTimeUtc"] = "2026-01-01T10:00:00.000Z"
        if self.script.current in ("Completed", "Failed", "Canceled"):
            details["endTimeUtc"] = "2026-01-01T10:05:30.000Z"
        if self.error_message:
            details["error"] = {"error": {"code": "UserError", "message": self.error_message}}
        return details

    def get_portal_url(self) -> str:
        return (
            f"https://ml.azure.com/runs/{self.id}?wsid=/subscriptions/{SUBSCRIPTION}"
            f"/resourcegroups/rg/workspaces/{self.workspace.name}"
        )

    def cancel(self) -> None:
        self.service.calls.append(("cancel", self.id))
        self.script.cancel()

    def get_file_names(self) -> list[str]:
        return sorted(self.files)

    def download_file(self, name: str, output_file_path: str | None = None) -> None:
        self.service.calls.append(("download_file", name))
        Path(output_file_path or Path(name).name).write_bytes(self.files[name])


class FakeV1Service:
    """Stands in for `Experiment(ws, name).submit(...)`, `Run.get` and `Environment.get`.
    Records what each submit hands over: the config, its snapshot folder's files, tags."""

    def __init__(self) -> None:
        self.runs: dict[str, FakeRun] = {}
        self.submissions: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str]] = []
        self.environments: dict[str, Any] = {}
        self.next_script: list[str] = HAPPY
        self.lose_next_response = False
        self.submit_error: Exception | None = None

    def get_run(self, workspace: Any, run_id: str) -> FakeRun | None:
        self.calls.append(("get_run", run_id))
        return self.runs.get(run_id)

    def submit(
        self, workspace: Any, experiment: str, config: Any, run_id: str, tags: dict[str, str]
    ) -> FakeRun:
        self.calls.append(("submit", run_id))
        if self.submit_error is not None:
            raise self.submit_error
        if run_id in self.runs:
            from azureml.exceptions import ExperimentExecutionException

            raise ExperimentExecutionException(
                f"Cannot create a run with runId={run_id} As a run with runId={run_id} "
                "already exists in the workspace"
            )
        source = Path(config.source_directory)
        self.submissions.append(
            {
                "workspace": workspace,
                "experiment": experiment,
                "config": config,
                "run_id": run_id,
                "tags": tags,
                "snapshot": {
                    p.relative_to(source).as_posix(): p.read_bytes()
                    for p in sorted(source.rglob("*"))
                    if p.is_file()
                },
                "conda": config.run_config.environment.python.conda_dependencies.serialize_to_string(),
            }
        )
        run = self.runs[run_id] = FakeRun(self, run_id, workspace)
        if self.lose_next_response:
            self.lose_next_response = False
            import requests

            raise requests.ConnectionError("Connection aborted: the response was lost")
        return run

    def get_environment(
        self, workspace: Any, name: str, version: str | None, label: str | None
    ) -> Any:
        self.calls.append(("get_environment", f"{name}:{version}@{label}"))
        if name not in self.environments:
            from azureml._restclient.exceptions import ServiceException

            raise _service_exception(ServiceException, 404, f"Environment {name} not found")
        return self.environments[name]

    def count(self, operation: str) -> int:
        return sum(1 for op, _ in self.calls if op == operation)


def _service_exception(cls: type, code: int, message: str) -> Exception:
    """A ServiceException built by its own constructor from what msrest would hand it."""
    from types import SimpleNamespace

    response = SimpleNamespace(status_code=code, headers={})
    inner = SimpleNamespace(message=message, response=response, error=SimpleNamespace(error=None))
    return cls(inner)
