"""The `azureml` backend (azure-ai-ml v2) against Azure ML at the wire.

Every test builds the real `MLClient` (through the backend's own `build_client`) with a fake
credential and tests.azureml_fakes.FakeAzureML's azure-core transport: ARM, run history and
blob storage requests all reach that fake, which answers with the service's routes, status
codes, bodies and long-running-operation headers, and records every request. No azure-ai-ml
method is replaced except `BlobStorageClient.upload`, the code snapshot's upload to blob
storage (many PUT Blob calls on worker threads), which is recorded instead (names, sizes).
Downloads go through the wire: the storage SDK's default transport is the same fake.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import azure.ai.ml  # noqa: F401 - pay the import once per module
import nbformat
import pytest
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

from notebookops.compute import (
    PermanentBackendError,
    RunNotFinishedError,
    RunSpec,
    get_backend,
    run_key,
)
from notebookops.compute.azureml import AzureMLBackend, build_client
from notebookops.compute.azureml_common import WorkspaceRef
from notebookops.compute.papermill_entry import ENTRY_FILE_NAME, RESULT_FILE, decode_job
from tests import azureml_fakes as fakes

ROOT = Path(__file__).resolve().parent.parent
WS = fakes._ws_prefix()
ENV_ID = f"{WS}/environments/nb-env/versions/3"
HOSTILE = {
    "quotes": 'it\'s "quoted" `back`',
    "newlines": "line1\nline2\r\n\ttab",
    "shell": "a b; $(rm -rf /) && echo ${HOME} | cat > x ${{outputs.notebook}} \\ '",
    "unicode": "naïve café 東京 🚀 \u202e",
    "tiny": 1e-05,
    "big": 12345678901234567890,
    "octalish": "010",
    "flag": True,
    "nothing": None,
    "nested": {"list": [1, 2.5, "x"], "empty": {}},
}


def _notebook(cells: list[tuple[str, str, list[str]]], kernelspec: object = None) -> dict:
    return {
        "cells": [
            {
                "cell_type": kind,
                "metadata": {"tags": tags},
                "source": src,
                "outputs": [],
                "execution_count": None,
            }
            if kind == "code"
            else {"cell_type": kind, "metadata": {}, "source": src}
            for kind, src, tags in cells
        ],
        "metadata": {
            "kernelspec": kernelspec
            or {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "nb" / "smoke").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "README.md").write_text("repo\n")
    (root / "nb" / "smoke" / "train.ipynb").write_text(
        json.dumps(_notebook([("code", "alpha = 0", ["parameters"])]))
    )
    (root / "nb" / "smoke" / "eval.ipynb").write_text(json.dumps(_notebook([])))
    (root / "nb" / "data.csv").write_text("a,b\n1,2\n")
    for path in root.rglob("*"):
        path.chmod(0o555 if path.is_dir() else 0o444)
    yield root
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        h.update(str(path.relative_to(root)).encode())
        if path.is_file():
            h.update(path.read_bytes())
        h.update(oct(path.stat().st_mode).encode())
    return h.hexdigest()


def _spec(checkout: Path, notebook: str = "nb/smoke/train.ipynb", **compute) -> RunSpec:
    return RunSpec(
        run_key=run_key("inst-1", notebook),
        instance_id="inst-1",
        notebook=notebook,
        checkout=str(checkout),
        commit="c0ffee",
        parameters=dict(HOSTILE),
        timeout_seconds=1800,
        compute={
            "backend": "azureml",
            "target": "cpu-cluster",
            "environment": "azureml:nb-env@latest",
            "experiment": "notebook-ci",
            "workspace": {
                "subscriptionId": fakes.SUBSCRIPTION,
                "resourceGroup": fakes.RESOURCE_GROUP,
                "name": fakes.WORKSPACE,
            },
            **compute,
        },
        tags={
            "notebookops.instance": "inst-1",
            "notebookops.notebook": notebook,
            "notebookops.commit": "c0ffee",
            "devops.planId": "plan-9",
        },
    )


@pytest.fixture
def service(monkeypatch) -> fakes.FakeAzureML:
    svc = fakes.FakeAzureML()
    svc.register_environment("nb-env", "2")
    svc.register_environment("nb-env", "3")
    svc.curated.add("AzureML-sklearn-1.5")
    svc.registry_environments[("azureml", "sklearn-1.5")] = {"latest": "7"}
    fakes.record_uploads(svc, monkeypatch)
    fakes.route_storage_through(svc, monkeypatch)
    return svc


@pytest.fixture
def credential() -> fakes.FakeCredential:
    return fakes.FakeCredential()


@pytest.fixture
def backend(service, credential, tmp_path) -> AzureMLBackend:
    made: list[WorkspaceRef] = []

    def factory(workspace: WorkspaceRef):
        made.append(workspace)
        return build_client(workspace, credential=credential, transport=service.transport)

    b = AzureMLBackend(client_factory=factory, work_dir=tmp_path / "work")
    b.clients_made = made
    return b


def _put_job(service: fakes.FakeAzureML) -> fakes.Recorded:
    [put] = [r for r in service.requests if r.route.startswith("PUT ws:/jobs/") and r.status]
    return put


def _entry_job(body: dict) -> dict:
    command = body["properties"]["command"]
    return decode_job(command.split("--job ", 1)[1].split()[0])


def _finish(backend, handle, limit: int = 12):
    seen = []
    while not (status := backend.status(handle)).terminal:
        seen.append(status)
        assert len(seen) < limit
    return status, seen


# -- submit, request by request -------------------------------------------------------------


def test_a_submit_request_by_request(backend, service, credential, checkout):
    spec = _spec(checkout)
    handle = backend.submit(spec)

    routes = [(r.route, r.status) for r in service.requests]
    code = service.uploads[0]["name"]
    assert routes == [
        (f"GET ws:/jobs/{spec.run_key}", 404),  # not submitted before
        (f"GET ws:/codes/{code}/versions", 200),  # no code asset with this content hash yet
        (f"POST ws:/codes/{code}/versions/1/startPendingUpload", 200),
        (f"PUT ws:/codes/{code}/versions/1", 201),
        ("GET ws:/environments/nb-env/versions", 200),  # resolve @latest
        (f"PUT ws:/jobs/{spec.run_key}", 201),
    ]
    assert service.unrouted == []
    latest = service.requests[4]
    assert latest.query["$orderBy"] == ["createdtime desc"] and latest.query["$top"] == ["1"]
    for request in service.requests:
        assert request.headers["Authorization"] == f"Bearer {fakes.FakeCredential.TOKEN}"
    assert credential.scopes[0] == ("https://management.azure.com/.default",)

    body = _put_job(service).json()
    props = body["properties"]
    assert props["jobType"] == "Command"
    assert props["displayName"] == "nb/smoke/train.ipynb"
    assert props["experimentName"] == "notebook-ci"
    assert props["computeId"] == f"{WS}/computes/cpu-cluster"
    assert props["environmentId"] == ENV_ID  # the newest version, resolved by the SDK
    assert props["codeId"] == f"{WS}/codes/{code}/versions/1"
    assert props["limits"]["timeout"] == "PT30M"
    assert props["outputs"] == {
        "notebook": {"mode": "ReadWriteMount", "jobOutputType": "uri_folder"}
    }
    assert props["tags"] == spec.tags
    assert props["command"].startswith(
        f"python {ENTRY_FILE_NAME} --output-dir ${{{{outputs.notebook}}}} --job "
    )
    tail = props["command"].split("--job ", 1)[1]
    assert all(c.isalnum() or c in "+/=" for c in tail), tail
    assert _entry_job(body) == {
        "notebook": "nb/smoke/train.ipynb",
        "output": "train.ipynb",
        "parameters": HOSTILE,
        "kernel": None,
        "environment": "nb-env@latest",
    }
    # The uploaded snapshot: the checkout without .git, plus the entry script.
    [upload] = service.uploads
    assert set(upload["files"]) == {
        ENTRY_FILE_NAME,
        ".amlignore",
        "README.md",
        "nb/data.csv",
        "nb/smoke/train.ipynb",
        "nb/smoke/eval.ipynb",
    }
    assert upload["files"]["README.md"] == 5
    assert (
        upload["files"][ENTRY_FILE_NAME]
        == (ROOT / "notebookops/compute/papermill_entry.py").stat().st_size
    )
    assert handle.run_id == spec.run_key
    assert handle.portal_url.startswith(f"https://ml.azure.com/runs/{spec.run_key}?wsid=")


@pytest.mark.parametrize(
    ("form", "environment_id", "environment_requests"),
    [
        ("azureml:nb-env@latest", ENV_ID, ["GET ws:/environments/nb-env/versions"]),
        ("azureml:nb-env:2", f"{WS}/environments/nb-env/versions/2", []),
        ("nb-env@latest", ENV_ID, ["GET ws:/environments/nb-env/versions"]),
        ("nb-env", ENV_ID, ["GET ws:/environments/nb-env/versions"]),
        ("nb-env:2", f"{WS}/environments/nb-env/versions/2", []),
        (ENV_ID, ENV_ID, []),
        (
            "azureml://registries/azureml/environments/sklearn-1.5/labels/latest",
            "azureml://registries/azureml/environments/sklearn-1.5/labels/latest",
            [],
        ),
        (
            "azureml://registries/azureml/environments/sklearn-1.5/versions/7",
            "azureml://registries/azureml/environments/sklearn-1.5/versions/7",
            [],
        ),
        ("AzureML-sklearn-1.5@latest", "azureml:AzureML-sklearn-1.5@latest", []),
        ("azureml:AzureML-sklearn-1.5:7", "azureml:AzureML-sklearn-1.5:7", []),
    ],
)
def test_every_environment_form_resolves_through_the_sdk(
    backend, service, checkout, form, environment_id, environment_requests
):
    backend.submit(_spec(checkout, environment=form))
    assert _put_job(service).json()["properties"]["environmentId"] == environment_id
    assert [r.route for r in service.requests if "/environments/" in r.route] == (
        environment_requests
    )
    assert all(r.status < 400 for r in service.requests[1:]), service.routes()


@pytest.mark.parametrize(
    "form",
    ["azureml:nb-env@prod", "azureml:", "nb env", "azureml://x/y", "nb-env:", "a/b@latest"],
)
def test_an_environment_the_service_cannot_resolve_is_refused_before_any_request(
    backend, service, checkout, form
):
    with pytest.raises(PermanentBackendError) as caught:
        backend.submit(_spec(checkout, environment=form))
    assert f"compute.environment {form!r}" in str(caught.value)
    assert "name@latest" in str(caught.value)
    assert service.requests == []


@pytest.mark.parametrize(
    ("backend_name", "form", "ok"),
    [
        ("azureml", "azureml:nb-env@latest", True),
        ("azureml", "azureml://registries/azureml/environments/sklearn-1.5/labels/latest", True),
        ("azureml", "nb-env@prod", False),
        ("azureml-v1", "nb-env@prod", True),
        ("azureml-v1", "azureml://registries/azureml/environments/x/versions/1", False),
        ("azureml", "nb env", False),
        ("local", "anything goes", True),
    ],
)
def test_validation_refuses_unresolvable_environment_forms(backend_name, form, ok):
    from notebookops.request import RequestError, parse_request

    body = {
        "repository": {"url": "https://dev.azure.com/o/p/_git/r"},
        "notebooks": ["a.ipynb"],
        "compute": {"backend": backend_name, "environment": form},
    }
    if ok:
        assert parse_request(body).compute.environment == form
        return
    with pytest.raises(RequestError) as caught:
        parse_request(body)
    text = str(caught.value)
    assert "compute.environment" in text and form in text and "name:version" in text


def test_notebooks_of_one_commit_upload_one_snapshot(backend, service, checkout):
    """The code asset is found by its content hash, so the second job reuses the first upload."""
    first = backend.submit(_spec(checkout))
    second = backend.submit(_spec(checkout, notebook="nb/smoke/eval.ipynb"))
    assert len(service.uploads) == 1
    assert service.count(r"^POST ws:/codes/.*/startPendingUpload$") == 1
    code_ids = {
        r.json()["properties"]["codeId"]
        for r in service.requests
        if r.route.startswith("PUT ws:/jobs/")
    }
    assert len(code_ids) == 1 and first.run_id != second.run_id


def test_ignore_files_are_honoured_but_never_drop_the_notebook_or_the_entry_script(
    backend, service, checkout
):
    for path in checkout.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    (checkout / ".amlignore").write_text("*.py\n*.ipynb\nnb/\n!nb/data.csv\nREADME.md\n")
    (checkout / "big.bin").write_bytes(b"x" * 1000)
    spec = _spec(checkout)
    backend.submit(spec)
    files = service.uploads[0]["files"]
    assert "README.md" not in files and "nb/data.csv" in files  # negation honoured
    # One folder serves every notebook of the commit: no pattern removes one of them.
    assert {ENTRY_FILE_NAME, "nb/smoke/train.ipynb", "nb/smoke/eval.ipynb"} <= set(files)
    assert files["big.bin"] == 1000
    assert (checkout / "README.md").is_file()  # pruning the hard-linked folder left it alone


def test_source_directory_limits_the_upload_and_the_checkout_is_untouched(
    backend, service, checkout
):
    before = _digest(checkout)
    spec = _spec(checkout, sourceDirectory="nb")
    backend.submit(spec)
    assert set(service.uploads[0]["files"]) == {
        ENTRY_FILE_NAME,
        ".amlignore",
        "data.csv",
        "smoke/train.ipynb",
        "smoke/eval.ipynb",
    }
    assert _entry_job(_put_job(service).json())["notebook"] == "smoke/train.ipynb"
    assert _digest(checkout) == before


def test_parameters_keep_values_and_types_through_the_command_line(backend, service, checkout):
    backend.submit(_spec(checkout))
    decoded = _entry_job(_put_job(service).json())["parameters"]
    assert decoded == HOSTILE
    assert type(decoded["tiny"]) is float and type(decoded["big"]) is int


def test_a_lost_response_is_retried_by_the_sdk_and_finds_the_job(backend, service, checkout):
    """The service creates the job, then the connection drops before the answer arrives. The
    SDK repeats the PUT, the service answers 409 (the name exists), and the backend reads the
    job it created: one job."""
    spec = _spec(checkout)
    service.lose_response(r"^PUT ws:/jobs/")
    handle = backend.submit(spec)
    jobs = [(r.route, r.status) for r in service.requests if "/jobs/" in r.route]
    assert jobs == [
        (f"GET ws:/jobs/{spec.run_key}", 404),
        (f"PUT ws:/jobs/{spec.run_key}", 201),  # done, answer lost
        (f"PUT ws:/jobs/{spec.run_key}", 409),
        (f"GET ws:/jobs/{spec.run_key}", 200),
    ]
    assert list(service.jobs) == [spec.run_key] and handle.run_id == spec.run_key
    again = backend.submit(spec)  # the activity retried: found, nothing created
    assert again == handle and service.count(r"^PUT ws:/jobs/") == 2


def test_a_lost_response_on_every_try_is_transient_and_the_next_submit_finds_the_job(
    backend, service, checkout
):
    from azure.core.exceptions import ServiceResponseError

    spec = _spec(checkout)
    service.lose_response(r"^(PUT|GET) ws:/jobs/", times=20)
    with pytest.raises(ServiceResponseError):
        backend.submit(spec)
    service._faults.clear()
    handle = backend.submit(spec)
    assert list(service.jobs) == [spec.run_key] and handle.run_id == spec.run_key


def test_a_429_storm_is_retried_with_retry_after_then_left_to_the_orchestrator(
    backend, service, checkout
):
    spec = _spec(checkout)
    service.fail_next(r"^PUT ws:/jobs/", 429, times=50, headers={"Retry-After": "7"})
    with pytest.raises(HttpResponseError) as caught:
        backend.submit(spec)
    assert caught.value.status_code == 429
    assert not isinstance(caught.value, PermanentBackendError)
    puts = [r.status for r in service.requests if r.route.startswith("PUT ws:/jobs/")]
    assert puts == [429, 429, 429, 429]  # the first try and the backend's 3 SDK retries
    assert service.sleeps == [7.0, 7.0, 7.0]  # Retry-After honoured, through the transport
    assert service.jobs == {}
    service._faults.clear()
    handle = backend.submit(spec)  # the storm is over: the activity's next attempt
    assert list(service.jobs) == [spec.run_key] and handle.run_id == spec.run_key


# -- status, times, download, cancel --------------------------------------------------------


def test_a_run_walks_the_documented_sequence_with_real_start_and_end_times(
    backend, service, checkout, tmp_path
):
    handle = backend.submit(_spec(checkout))
    service.jobs[handle.run_id].outputs["train.ipynb"] = json.dumps(fakes.notebook_json()).encode()
    with pytest.raises(RunNotFinishedError):
        backend.fetch_output(handle, tmp_path / "early.ipynb")
    status, seen = _finish(backend, handle)
    queued = [s for s in seen if s.state == "queued"]
    running = [s for s in seen if s.state == "running"]
    # (fetch_output's read saw NotStarted)
    assert [s.raw_status for s in queued] == ["Queued", "Preparing"]
    assert all(s.started_at is None for s in queued)  # queue and image build do not count
    job = service.jobs[handle.run_id]
    assert running and all(s.started_at == job.started for s in running)
    assert (status.state, status.started_at, status.ended_at) == (
        "succeeded",
        job.started,
        job.ended,
    )
    assert status.error is None and status.message is None
    history = [r for r in service.requests if "/history/v1.0/" in r.path]
    assert history and all(r.status == 200 for r in history)
    dest = tmp_path / "out" / "nb" / "smoke" / "train.ipynb"
    assert backend.fetch_output(handle, dest) == dest
    assert json.loads(dest.read_text()) == fakes.notebook_json()


def test_download_request_by_request_and_cached(backend, service, checkout, tmp_path):
    service.next_script = ["Completed"]
    handle = backend.submit(_spec(checkout))
    service.jobs[handle.run_id].outputs["train.ipynb"] = b'{"cells": []}'
    start = len(service.requests)
    dest = backend.fetch_output(handle, tmp_path / "x.ipynb")
    assert dest.read_bytes() == b'{"cells": []}'
    blob = f"/{fakes.BLOB_CONTAINER}/azureml/{handle.run_id}/notebook"
    assert [(r.route, r.status) for r in service.requests[start:]] == [
        (f"GET ws:/jobs/{handle.run_id}", 200),
        (f"GET ws:/jobs/{handle.run_id}", 200),  # download() reads the job again
        ("GET ws:", 200),  # the workspace's discovery URL, for run history
        ("GET /discovery", 200),
        ("POST /history/v1.0ws:/rundata", 200),  # where are the outputs?
        ("GET ws:/datastores", 200),  # the default datastore, to search azureml/<job>/<output>
        ("GET ws:/datastores/workspaceblobstore", 200),
        ("POST ws:/datastores/workspaceblobstore/listSecrets", 200),
        (f"HEAD {blob}/", 404),
        (f"GET /{fakes.BLOB_CONTAINER}", 200),  # list: the folder exists
        ("GET ws:/datastores/workspaceblobstore", 200),
        ("POST ws:/datastores/workspaceblobstore/listSecrets", 200),
        (f"GET /{fakes.BLOB_CONTAINER}", 200),  # list the files
        (f"GET {blob}/train.ipynb", 206),
    ]
    start = len(service.requests)
    backend.fetch_output(handle, tmp_path / "again.ipynb")
    assert [r.route for r in service.requests[start:]] == [f"GET ws:/jobs/{handle.run_id}"]


def test_a_failed_job_reports_the_failing_cell_the_service_reason_and_times(
    backend, service, checkout
):
    service.next_script = list(fakes.FAILING)
    handle = backend.submit(_spec(checkout))
    job = service.jobs[handle.run_id]
    job.outputs["train.ipynb"] = json.dumps(fakes.notebook_json(("KeyError", "'id'"))).encode()
    job.error = "Execution failed.\nUser program exited with code 1"
    status, _ = _finish(backend, handle)
    assert status.state == "failed"
    assert (status.error.cell_index, status.error.ename, status.error.evalue) == (
        1,
        "KeyError",
        "'id'",
    )
    assert status.message == "Execution failed. User program exited with code 1"
    assert status.started_at == job.started and status.ended_at == job.ended


def test_an_environment_without_papermill_names_the_environment_and_the_packages(
    backend, service, checkout
):
    """What the entry script leaves in the outputs when it stops before running (its own test
    below runs it in a Python without papermill)."""
    service.next_script = ["Failed"]
    handle = backend.submit(_spec(checkout))
    report = {
        "ok": False,
        "reason": "missingPackages",
        "message": "the environment nb-env@latest lacks papermill and ipykernel, which "
        "notebookops needs to run notebooks; add papermill ipykernel to its pip dependencies",
        "packages": ["papermill", "ipykernel"],
    }
    service.jobs[handle.run_id].outputs[RESULT_FILE] = json.dumps(report).encode()
    service.jobs[handle.run_id].error = "User program exited with code 3"
    status = backend.status(handle)
    assert status.state == "failed" and status.error is None
    assert "nb-env@latest" in status.message and "papermill and ipykernel" in status.message


def test_a_job_that_failed_before_papermill_says_where_to_look(
    backend, service, checkout, tmp_path
):
    service.next_script = ["Failed"]
    handle = backend.submit(_spec(checkout))
    status = backend.status(handle)
    assert status.state == "failed" and status.error is None
    assert "before the notebook produced output" in status.message
    assert backend.fetch_output(handle, tmp_path / "x.ipynb") is None


def test_a_finished_job_whose_output_storage_refuses_the_identity_keeps_its_verdict(
    backend, service, checkout, tmp_path
):
    """Identity-based datastore, identity without a data role: storage answers 403."""
    service.identity_based_storage = True
    service.blob_read_forbidden = True
    service.next_script = ["Completed"]
    handle = backend.submit(_spec(checkout))
    service.jobs[handle.run_id].outputs["train.ipynb"] = b"{}"
    status = backend.status(handle)
    assert (status.state, status.raw_status) == ("succeeded", "Completed")
    assert "Storage Blob Data Reader" in status.message
    assert "could not be downloaded" in status.message
    assert backend.fetch_output(handle, tmp_path / "x.ipynb") is None  # no exception, no retry
    refused = [r for r in service.requests if r.status == 403]
    assert refused and all(".blob.core.windows.net" in r.url for r in refused)
    assert any(s == ("https://storage.azure.com/.default",) for s in backend_scopes(backend))


def backend_scopes(backend):
    client = backend._clients[next(iter(backend._clients))]
    return client._credential.scopes


def test_cancel_request_by_request_and_a_no_op_once_over(backend, service, checkout):
    service.next_script = ["Running"]
    handle = backend.submit(_spec(checkout))
    start = len(service.requests)
    backend.cancel(handle)
    calls = service.requests[start:]
    assert [(r.route, r.status) for r in calls][:2] == [
        (f"GET ws:/jobs/{handle.run_id}", 200),
        (f"POST ws:/jobs/{handle.run_id}/cancel", 202),
    ]
    location = [r for r in service.requests if r.route.startswith("POST")][-1]
    assert calls[2].route.startswith("GET ws:/operationResults/")  # the LRO's Location
    assert location.status == 202
    requested = backend.status(handle)
    assert (requested.state, requested.raw_status) == ("running", "CancelRequested")
    final = backend.status(handle)
    assert final.state == "canceled" and "canceled in Azure ML" in final.message
    backend.cancel(handle)
    assert service.count(r"/cancel$") == 1


V2_DOCUMENTED = {  # reference §4.3 / §8.3
    "NotStarted": "queued",
    "Starting": "queued",
    "Provisioning": "queued",
    "Preparing": "queued",
    "Queued": "queued",
    "Running": "running",
    "Finalizing": "running",
    "CancelRequested": "running",
    "NotResponding": "running",
    "Paused": "running",
    "Unknown": "running",
    "Completed": "succeeded",
    "Failed": "failed",
    "Canceled": "canceled",
}


@pytest.mark.parametrize(("raw", "state"), sorted(V2_DOCUMENTED.items()))
def test_every_documented_job_status_maps_to_a_contract_state(
    backend, service, checkout, raw, state
):
    service.next_script = [raw]
    handle = backend.submit(_spec(checkout))
    status = backend.status(handle)
    assert (status.state, status.raw_status) == (state, raw)
    assert status.terminal == (raw in ("Completed", "Failed", "Canceled"))
    if state == "queued":
        assert status.started_at is None
        assert not any("/history/" in r.path for r in service.requests)


# -- errors and configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "words"),
    [
        (403, "AuthorizationFailed: no write on jobs", "AzureML Data Scientist"),
        (400, "QuotaExceeded for Standard_DS3_v2", "quota"),
    ],
)
def test_refusals_become_permanent_errors_that_say_what_to_fix(
    backend, service, checkout, monkeypatch, status, message, words
):
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "s3cr3t-value")
    service.fail_next(r"^PUT ws:/jobs/", status, message=message)
    with pytest.raises(PermanentBackendError) as caught:
        backend.submit(_spec(checkout))
    text = str(caught.value)
    assert words in text and fakes.WORKSPACE in text and "\n" not in text
    assert "s3cr3t-value" not in text and fakes.FakeCredential.TOKEN not in text


def test_an_unknown_compute_is_refused_by_the_service_and_named(backend, service, checkout):
    with pytest.raises(PermanentBackendError) as caught:
        backend.submit(_spec(checkout, target="gpu-nowhere"))
    assert "gpu-nowhere" in str(caught.value) and "compute.target" in str(caught.value)


def test_a_transient_credential_failure_is_retried_not_fatal(
    backend, service, credential, checkout
):
    credential.failures = [
        ClientAuthenticationError(
            "ManagedIdentityCredential authentication unavailable: no response from the IMDS "
            "endpoint (connection timed out)"
        )
    ]
    with pytest.raises(ClientAuthenticationError):
        backend.submit(_spec(checkout))
    assert service.requests == []  # the token never came, nothing was sent
    handle = backend.submit(_spec(checkout))
    assert list(service.jobs) == [handle.run_id]


def test_a_refused_credential_is_permanent_and_says_what_to_configure(
    backend, service, credential, checkout
):
    credential.failures = [
        ClientAuthenticationError("AADSTS7000215: Invalid client secret provided.")
    ]
    with pytest.raises(PermanentBackendError, match="managed identity"):
        backend.submit(_spec(checkout))


def test_a_401_from_azure_ml_is_permanent(backend, service, checkout):
    service.fail_next(r"^GET ws:/jobs/", 401)
    with pytest.raises(PermanentBackendError, match="AzureML Data Scientist"):
        backend.submit(_spec(checkout))


def test_workspace_comes_from_app_settings_and_missing_ones_are_named(
    backend, checkout, monkeypatch
):
    spec = _spec(checkout)
    spec.compute.pop("workspace")
    for name in ("AZUREML_SUBSCRIPTION_ID", "AZUREML_RESOURCE_GROUP", "AZUREML_WORKSPACE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZUREML_SUBSCRIPTION_ID", fakes.SUBSCRIPTION)
    with pytest.raises(PermanentBackendError, match="AZUREML_RESOURCE_GROUP, AZUREML_WORKSPACE"):
        backend.submit(spec)
    monkeypatch.setenv("AZUREML_RESOURCE_GROUP", fakes.RESOURCE_GROUP)
    monkeypatch.setenv("AZUREML_WORKSPACE", fakes.WORKSPACE)
    handle = backend.submit(spec)
    assert backend.clients_made[-1] == WorkspaceRef(
        fakes.SUBSCRIPTION, fakes.RESOURCE_GROUP, fakes.WORKSPACE
    )
    assert handle.data["workspace"]["resourceGroup"] == fakes.RESOURCE_GROUP


def test_missing_environment_or_target_is_named(backend, checkout, monkeypatch):
    monkeypatch.delenv("AZUREML_ENVIRONMENT", raising=False)
    monkeypatch.delenv("AZUREML_COMPUTE", raising=False)
    spec = _spec(checkout)
    del spec.compute["environment"]
    with pytest.raises(PermanentBackendError, match=r"compute.environment .*AZUREML_ENVIRONMENT"):
        backend.submit(spec)
    spec = _spec(checkout)
    del spec.compute["target"]
    with pytest.raises(PermanentBackendError, match=r"compute.target"):
        backend.submit(spec)


def test_a_bad_environment_app_setting_is_named(backend, service, checkout, monkeypatch):
    monkeypatch.setenv("AZUREML_ENVIRONMENT", "azureml:nb-env@prod")
    spec = _spec(checkout)
    del spec.compute["environment"]
    with pytest.raises(PermanentBackendError, match="app setting AZUREML_ENVIRONMENT"):
        backend.submit(spec)


# -- the code that runs on the compute ------------------------------------------------------


def _entry_args(service, tmp_path, spec):
    """The job's command line, with the output placeholder replaced as Azure ML does."""
    command = _put_job(service).json()["properties"]["command"]
    args = command.split()[1:]
    out = tmp_path / "mounted-output"
    args[args.index("${{outputs.notebook}}")] = str(out)
    return args, out


def _materialise(service, spec, checkout, work):
    """The uploaded snapshot as the job sees it (the recorder kept names; copy the staged
    files from the checkout plus the entry script)."""
    for name in service.uploads[0]["files"]:
        source = (
            ROOT / "notebookops/compute/papermill_entry.py" if name == ENTRY_FILE_NAME else None
        )
        source = source or Path(spec.checkout) / name
        if not source.exists():
            continue
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(source.read_bytes())


def test_the_entry_script_reports_missing_packages_instead_of_crashing(
    backend, service, tmp_path, checkout
):
    """`python -S` has no site-packages: the environment a job gets from an image without
    papermill and ipykernel."""
    spec = _spec(checkout)
    backend.submit(spec)
    work = tmp_path / "job"
    _materialise(service, spec, checkout, work)
    args, out = _entry_args(service, tmp_path, spec)
    result = subprocess.run(
        [sys.executable, "-S", *args], cwd=work, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3, result.stderr[-2000:]
    report = json.loads((out / RESULT_FILE).read_text())
    assert report["reason"] == "missingPackages"
    assert report["packages"] == ["papermill", "ipykernel"]
    assert "nb-env@latest" in report["message"]


def test_the_entry_script_never_runs_an_r_notebook_on_python(backend, service, tmp_path):
    repo = tmp_path / "repo"
    (repo / "nb").mkdir(parents=True)
    kernelspec = {"name": "ir", "display_name": "R", "language": "R"}
    (repo / "nb" / "stats.ipynb").write_text(
        json.dumps(_notebook([("code", "x <- 1", [])], kernelspec=kernelspec))
    )
    spec = _spec(repo, notebook="nb/stats.ipynb")
    backend.submit(spec)
    work = tmp_path / "job"
    _materialise(service, spec, repo, work)
    args, out = _entry_args(service, tmp_path, spec)
    env = {**os.environ, "JUPYTER_DATA_DIR": str(tmp_path / "jupyter"), "HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, *args], cwd=work, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 3, result.stderr[-2000:]
    report = json.loads((out / RESULT_FILE).read_text())
    assert report["reason"] == "missingKernel" and report["language"] == "r"
    assert "'ir'" in report["message"] and "does not run it on Python" in report["message"]
    assert not (out / "stats.ipynb").exists()
    assert not (tmp_path / "jupyter" / "kernels" / "ir").exists()


@pytest.mark.slow
def test_the_entry_script_runs_papermill_with_the_exact_parameters_and_a_string_kernelspec(
    backend, service, tmp_path
):
    """Runs the shipped entry script as the job would, with the command's own --job value, on
    a notebook whose kernelspec was saved as a bare string."""
    repo = tmp_path / "repo"
    (repo / "nb").mkdir(parents=True)
    notebook = _notebook(
        [
            ("code", "params = None", ["parameters"]),
            (
                "code",
                "import json, os\nprint(json.dumps({k: globals()[k] for k in "
                f"{sorted(HOSTILE)!r}}}))\nprint(os.getcwd())",
                [],
            ),
        ]
    )
    notebook["metadata"]["kernelspec"] = "python3"
    (repo / "nb" / "echo.ipynb").write_text(json.dumps(notebook))
    spec = _spec(repo, notebook="nb/echo.ipynb")
    backend.submit(spec)
    work = tmp_path / "job"
    _materialise(service, spec, repo, work)
    args, out = _entry_args(service, tmp_path, spec)
    result = subprocess.run(
        [sys.executable, *args], cwd=work, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-2000:]
    executed = json.loads((out / "echo.ipynb").read_text())
    printed = "".join(executed["cells"][-1]["outputs"][0]["text"]).splitlines()
    assert json.loads(printed[0]) == HOSTILE
    assert printed[1] == str(work / "nb")


def test_the_job_json_is_base64_of_json():
    from notebookops.compute.papermill_entry import encode_job

    job = {"notebook": "a.ipynb", "output": "a.ipynb", "parameters": HOSTILE}
    assert json.loads(base64.b64decode(encode_job(job))) == job


# -- lazy imports and backend switching -----------------------------------------------------


def test_app_start_registry_and_an_orchestrator_replay_import_no_azure_ml_sdk():
    code = r"""
import json, sys
from datetime import datetime, timezone
import function_app
from notebookops.compute import registry
from devhost import events as ev
from devhost.app import load_app
from devhost.episode import call_orchestrator

names = registry.known_backends()
backends = [registry.get_backend(n).name for n in ("azureml", "azureml-v1")]
func = load_app(".").get("OrchestratorFunction").func
now = datetime(2026, 1, 1, tzinfo=timezone.utc)
request = {"repository": {"url": "https://dev.azure.com/o/p/_git/r", "ref": "main"},
           "notebooks": ["nb/a.ipynb"], "parameters": {},
           "compute": {"backend": "azureml", "target": "cpu", "environment": "azureml:e@latest",
                       "experiment": "x"}, "timeoutMinutes": 60, "failFast": False,
           "maxParallel": 5}
clone = {"ok": True, "commit": "abc", "checkout": "/co",
         "notebooks": [{"path": "nb/a.ipynb", "entryIndex": 0}]}
history = [ev.orchestrator_started(now),
           ev.execution_started(now, name="OrchestratorFunction", instance_id="i1",
                                execution_id="e1", input_text=json.dumps({"request": request}),
                                parent_instance_id=None, generation=0),
           ev.task_scheduled(now, 0, "ActivityClone", None),
           ev.orchestrator_completed(now), ev.orchestrator_started(now),
           ev.task_completed(now, 0, json.dumps(clone))]
state, error = call_orchestrator(func, {"history": history,
    "input": json.dumps({"request": request}), "instanceId": "i1",
    "isReplaying": False, "parentInstanceId": None, "upperSchemaVersion": 1,
    "upperSchemaVersionNew": 2})
actions = json.dumps(state.get("actions"))
heavy = [m for m in sys.modules if m.split(".")[0] == "azureml" or m.startswith("azure.ai.ml")]
print(json.dumps({"names": names, "backends": backends, "error": error,
                  "submits": actions.count("ActivitySubmit"), "heavy": heavy}))
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["error"] is None
    assert report["submits"] == 1, report
    assert report["backends"] == ["azureml", "azureml-v1"]
    assert report["heavy"] == []


@pytest.mark.parametrize("name", ["local", "azureml", "azureml-v1"])
def test_switching_compute_backend_is_a_name_in_the_message(name, monkeypatch):
    from notebookops.compute import Backend

    monkeypatch.setenv("NOTEBOOKOPS_ALLOW_LOCAL_BACKEND", "1")
    backend = get_backend(name)
    assert backend.name == name and isinstance(backend, Backend)


# -- the whole app on devhost, with Azure ML at the wire ------------------------------------


@pytest.mark.slow
def test_a_pipeline_run_on_azure_ml_at_the_wire(flow_env, service, credential, monkeypatch):
    """The real function app on devhost (virtual clock) with the `azureml` backend talking to
    the fake service: one notebook succeeds, one fails in a cell, and one meets a 429 storm on
    every submit, which fails that notebook only. One snapshot is uploaded for the commit."""
    from notebookops.compute import registry
    from tests.flow_support import app_host, deliver, make_repo, message, notebook

    committed = notebook("x = 1")
    # As committed, the notebooks the fake service hands back executed: a title, then the code
    # (the monitor numbers a failing cell against the commit).
    committed.cells.insert(0, nbformat.v4.new_markdown_cell("# title"))
    repo = make_repo(
        flow_env / "repo",
        {name: committed for name in ("nb/a.ipynb", "nb/b.ipynb", "nb/c.ipynb")},
    )
    clients: dict = {}

    def factory(workspace):
        if workspace not in clients:
            clients[workspace] = build_client(
                workspace, credential=credential, transport=service.transport
            )
        return clients[workspace]

    monkeypatch.setitem(
        registry._factories,
        "azureml",
        lambda: AzureMLBackend(client_factory=factory, work_dir=flow_env / "aml-work"),
    )

    def on_create(job):
        notebook_path = _entry_job(job.body)["notebook"]
        name = Path(notebook_path).name
        if notebook_path == "nb/b.ipynb":
            job.script = list(fakes.FAILING)
            job.error = "User program exited with code 1"
            job.outputs[name] = json.dumps(fakes.notebook_json(("KeyError", "'id'"))).encode()
        else:
            job.outputs[name] = json.dumps(fakes.notebook_json()).encode()

    service.on_create = on_create
    service.fail_next(r"^PUT ws:/jobs/nb-nb-c-", 429, times=1000, headers={"Retry-After": "5"})
    body = message(
        repo,
        ["nb/a.ipynb", "nb/b.ipynb", "nb/c.ipynb"],
        compute={
            "backend": "azureml",
            "target": "cpu-cluster",
            "environment": "azureml:nb-env@latest",
            "workspace": {
                "subscriptionId": fakes.SUBSCRIPTION,
                "resourceGroup": fakes.RESOURCE_GROUP,
                "name": fakes.WORKSPACE,
            },
        },
    )
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body)
        status = host.wait_for(instance, 240)
    summary = status["output"]
    assert status["runtimeStatus"] == "Completed", status
    by_path = {n["path"]: n for n in summary["notebooks"]}
    a, b, c = by_path["nb/a.ipynb"], by_path["nb/b.ipynb"], by_path["nb/c.ipynb"]
    assert a["state"] == "succeeded" and Path(a["outputNotebook"]).is_file(), json.dumps(a)
    assert a["portalUrl"].startswith("https://ml.azure.com/runs/nb-nb-a-")
    assert a["durationSeconds"] is not None and a["durationSeconds"] >= 0
    assert b["state"] == "failed" and b["error"]["ename"] == "KeyError", b
    assert b["error"]["cellIndex"] == 1
    assert c["state"] == "failed" and "429" in json.dumps(c)
    assert summary["result"] == "failed"
    assert len(service.uploads) == 1  # one snapshot for the commit's three notebooks
    assert sorted(job.name[:8] for job in service.jobs.values()) == ["nb-nb-a-", "nb-nb-b-"]
    for job in service.jobs.values():
        assert job.body["properties"]["tags"]["notebookops.instance"] == instance
    assert service.unrouted == []
    assert fakes.FakeCredential.TOKEN not in json.dumps(summary)


@pytest.mark.slow
@pytest.mark.parametrize("throttled_after", [0, 4, 1000])
def test_a_job_created_by_a_lost_answer_is_canceled_by_its_run_key(
    flow_env, service, credential, monkeypatch, throttled_after
):
    """The first submit attempt's PUT creates the job but its answer is lost; every request
    after that meets a 429 until the orchestrator runs out of attempts, so the notebook fails
    with no handle. The job exists all the same: the orchestrator cancels it by its run key
    (the job name), request by request below, and says so in the notebook's message.

    `throttled_after`: reads still throttled once the submit gave up. 0: the cancel right
    after the failure gets through; 4: that one meets a 429 (the SDK's 4 tries) and the cancel
    when the run stops gets through; 1000: neither does, and the message says so."""
    from notebookops.compute import registry
    from tests.flow_support import app_host, deliver, make_repo, message, notebook

    repo = make_repo(flow_env / "repo", {"nb/a.ipynb": notebook("x = 1")})

    def factory(workspace):
        return build_client(workspace, credential=credential, transport=service.transport)

    monkeypatch.setitem(
        registry._factories,
        "azureml",
        lambda: AzureMLBackend(client_factory=factory, work_dir=flow_env / "aml-work"),
    )
    storm = {"Retry-After": "5"}
    service.lose_response(r"^PUT ws:/jobs/nb-nb-a-")  # the job is created, the answer lost
    service.fail_next(r"^PUT ws:/jobs/nb-nb-a-", 429, times=1000, headers=storm)
    # From the job's creation on, reads of it are throttled for the submit's remaining tries.
    service.on_create = lambda job: service.fail_next(
        r"^GET ws:/jobs/nb-nb-a-", 429, times=8 + throttled_after, headers=storm
    )
    body = message(
        repo,
        ["nb/a.ipynb"],
        compute={
            "backend": "azureml",
            "target": "cpu-cluster",
            "environment": "nb-env@latest",
            "workspace": {
                "subscriptionId": fakes.SUBSCRIPTION,
                "resourceGroup": fakes.RESOURCE_GROUP,
                "name": fakes.WORKSPACE,
            },
        },
    )
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body)
        status = host.wait_for(instance, 240)
    key = run_key(instance, "nb/a.ipynb")
    job = f"ws:/jobs/{key}"
    seen = [(r.route.split("?")[0], r.status) for r in service.requests if key in r.route]
    submit = [
        # attempt 1: not there yet; the PUT is done but unanswered; the SDK's 3 retries: 429
        (f"GET {job}", 404),
        (f"PUT {job}", 201),
        (f"PUT {job}", 429),
        (f"PUT {job}", 429),
        (f"PUT {job}", 429),
        # attempts 2 and 3 look for the job first (4 tries each), throttled
        *[(f"GET {job}", 429)] * 8,
    ]
    # Out of attempts, the notebook fails; its job is looked for by its key right away, and
    # again when the run stops if that was throttled (the SDK's 4 tries each time).
    throttled = {0: 0, 4: 4, 1000: 8}[throttled_after]
    cancel = [
        (f"GET {job}", 200),  # found
        (f"GET {job}", 200),  # still running
        (f"GET {job}", 200),  # read again by cancel
        (f"POST {job}/cancel", 202),
    ]
    expected = submit + [(f"GET {job}", 429)] * throttled
    assert seen == expected + (cancel if throttled_after <= 4 else []), seen
    summary = status["output"]
    [result] = summary["notebooks"]
    assert result["state"] == "failed" and "429" in result["message"]
    assert result["runId"] is None and summary["result"] == "failed"
    if throttled_after > 4:
        assert service.jobs[key].script[-1] != "Canceled"
        assert (
            f"its run {key} may have been created before an answer was lost and could "
            "not be canceled (HttpResponseError" in result["message"]
        )
        assert result["message"].endswith("cancel it in the service")
    else:
        assert service.jobs[key].script[-1] == "Canceled"
        assert result["message"].endswith(
            f"its run {key}, created before an answer was lost, was canceled"
        )
    assert service.unrouted == []
