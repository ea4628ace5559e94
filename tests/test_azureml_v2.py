"""The `azureml` backend (azure-ai-ml v2) on real SDK objects built offline.

Azure ML cannot be reached from here, so every test that submits replaces only the network
boundary, `MLClient.jobs`, with tests.azureml_fakes.FakeJobOperations: a recording fake that
serialises each job with the SDK's own REST serialiser and walks the documented status sequence.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import azure.ai.ml  # noqa: F401 - pay the import once per module
import pytest
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

from notebookops.compute import (
    PermanentBackendError,
    RunNotFinishedError,
    RunSpec,
    get_backend,
    run_key,
)
from notebookops.compute.azureml import AzureMLBackend
from notebookops.compute.azureml_common import WorkspaceRef
from notebookops.compute.papermill_entry import ENTRY_FILE_NAME, decode_job
from tests import azureml_fakes as fakes

ROOT = Path(__file__).resolve().parent.parent
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


def _notebook(cells: list[tuple[str, str, list[str]]]) -> dict:
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
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
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


def _spec(checkout: Path, **compute) -> RunSpec:
    return RunSpec(
        run_key=run_key("inst-1", "nb/smoke/train.ipynb"),
        instance_id="inst-1",
        notebook="nb/smoke/train.ipynb",
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
                "resourceGroup": "rg",
                "name": "ws",
            },
            **compute,
        },
        tags={
            "notebookops.instance": "inst-1",
            "notebookops.notebook": "nb/smoke/train.ipynb",
            "notebookops.commit": "c0ffee",
            "devops.planId": "plan-9",
        },
    )


@pytest.fixture
def jobs() -> fakes.FakeJobOperations:
    return fakes.FakeJobOperations()


@pytest.fixture
def backend(jobs, tmp_path) -> AzureMLBackend:
    made: list[WorkspaceRef] = []

    def factory(workspace: WorkspaceRef):
        made.append(workspace)
        return fakes.offline_client(jobs, workspace)

    b = AzureMLBackend(client_factory=factory, work_dir=tmp_path / "work")
    b.clients_made = made
    return b


def _entry_job(body: dict) -> dict:
    command = body["properties"]["command"]
    return decode_job(command.split("--job ", 1)[1].split()[0])


# -- what Azure ML receives -----------------------------------------------------------------


def test_submit_sends_one_command_job_azure_ml_can_run(backend, jobs, checkout):
    spec = _spec(checkout)
    handle = backend.submit(spec)

    assert list(jobs.bodies) == [spec.run_key]
    body = jobs.bodies[spec.run_key]
    props = body["properties"]
    assert body["name"] == spec.run_key
    assert props["jobType"] == "Command"
    assert props["displayName"] == "nb/smoke/train.ipynb"
    assert props["experimentName"] == "notebook-ci"
    assert props["computeId"] == "cpu-cluster"
    assert props["environmentId"] == "azureml:nb-env@latest"
    assert props["limits"]["timeout"] == "PT30M"
    assert props["outputs"] == {
        "notebook": {"mode": "ReadWriteMount", "jobOutputType": "uri_folder"}
    }
    assert props["tags"] == spec.tags
    command = props["command"]
    assert command.startswith(
        f"python {ENTRY_FILE_NAME} --output-dir ${{{{outputs.notebook}}}} --job "
    )
    # Only base64 after the service's own placeholder: nothing a shell or ${{}} could misread.
    tail = command.split("--job ", 1)[1]
    assert all(c.isalnum() or c in "+/=" for c in tail), tail
    assert _entry_job(body) == {
        "notebook": "nb/smoke/train.ipynb",
        "output": "train.ipynb",
        "parameters": HOSTILE,
        "kernel": None,
    }
    # The uploaded code: the checkout without .git, plus the entry script.
    assert sorted(jobs.code_snapshots[spec.run_key]) == sorted(
        [ENTRY_FILE_NAME, "README.md", "nb/data.csv", "nb/smoke/train.ipynb"]
    )
    assert handle.backend == "azureml" and handle.run_id == spec.run_key
    assert handle.portal_url.startswith(f"https://ml.azure.com/runs/{spec.run_key}?wsid=")
    assert handle.data["workspace"]["name"] == "ws"


def test_parameters_keep_values_and_types_through_the_command_line(backend, jobs, checkout):
    backend.submit(_spec(checkout))
    decoded = _entry_job(jobs.bodies[next(iter(jobs.bodies))])["parameters"]
    assert decoded == HOSTILE
    assert type(decoded["tiny"]) is float and type(decoded["big"]) is int
    assert decoded["octalish"] == "010" and decoded["flag"] is True and decoded["nothing"] is None


def test_source_directory_limits_the_upload_and_the_checkout_is_untouched(backend, jobs, checkout):
    before = _digest(checkout)
    spec = _spec(checkout, sourceDirectory="nb")
    backend.submit(spec)
    assert sorted(jobs.code_snapshots[spec.run_key]) == sorted(
        [ENTRY_FILE_NAME, "data.csv", "smoke/train.ipynb"]
    )
    assert _entry_job(jobs.bodies[spec.run_key])["notebook"] == "smoke/train.ipynb"
    assert _digest(checkout) == before
    assert not (backend._work() / "code" / spec.run_key).exists()  # staging is cleaned up


def test_a_lost_submit_response_retried_finds_the_job_instead_of_creating_another(
    backend, jobs, checkout
):
    """The fake creates the job, then drops the response as a broken connection would."""
    from azure.core.exceptions import ServiceResponseError

    spec = _spec(checkout)
    jobs.lose_next_response = True
    with pytest.raises(ServiceResponseError):  # transient: the activity is retried
        backend.submit(spec)
    handle = backend.submit(spec)
    again = backend.submit(spec)
    assert jobs.count("create_or_update") == 1
    assert list(jobs.scripts) == [spec.run_key]
    assert handle == again and handle.run_id == spec.run_key


# -- status, output, cancel -----------------------------------------------------------------

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
def test_every_documented_job_status_maps_to_a_contract_state(backend, jobs, checkout, raw, state):
    """The fake job is scripted to sit in one status."""
    jobs.next_script = [raw]
    handle = backend.submit(_spec(checkout))
    status = backend.status(handle)
    assert (status.state, status.raw_status) == (state, raw)
    assert status.terminal == (raw in ("Completed", "Failed", "Canceled"))


def test_a_run_walks_the_documented_sequence_and_its_notebook_is_fetched(
    backend, jobs, checkout, tmp_path
):
    """Status reads advance the fake along NotStarted, Queued, Preparing, Running, Finalizing,
    Completed."""
    handle = backend.submit(_spec(checkout))
    jobs.notebooks[handle.run_id] = fakes.notebook_json()
    dest = tmp_path / "out" / "nb" / "smoke" / "train.ipynb"
    seen = []
    with pytest.raises(RunNotFinishedError):
        backend.fetch_output(handle, dest)
    while not (status := backend.status(handle)).terminal:
        seen.append(status.state)
        assert len(seen) < 10
    assert status.state == "succeeded" and status.error is None
    assert "queued" in seen and "running" in seen
    assert backend.fetch_output(handle, dest) == dest
    assert json.loads(dest.read_text()) == fakes.notebook_json()


def test_a_failed_job_reports_the_failing_cell_and_the_service_reason(backend, jobs, checkout):
    """Scripted: NotStarted, Queued, Running, Failed; the fake serves the executed notebook."""
    jobs.next_script = fakes.FAILING
    handle = backend.submit(_spec(checkout))
    jobs.notebooks[handle.run_id] = fakes.notebook_json(("KeyError", "'id'"))
    jobs.service_errors[handle.run_id] = "Execution failed.\nUser program exited with code 1"
    while not (status := backend.status(handle)).terminal:
        pass
    assert status.state == "failed"
    assert (status.error.cell_index, status.error.ename, status.error.evalue) == (
        1,
        "KeyError",
        "'id'",
    )
    assert status.message == "Execution failed. User program exited with code 1"
    downloads = jobs.count("download")
    backend.fetch_output(handle, Path(backend._work()) / "copy.ipynb")
    assert jobs.count("download") == downloads  # the notebook was cached by status


def test_a_job_that_failed_before_papermill_says_where_to_look(backend, jobs, checkout, tmp_path):
    jobs.next_script = ["Failed"]
    handle = backend.submit(_spec(checkout))
    status = backend.status(handle)
    assert status.state == "failed" and status.error is None
    assert "before the notebook produced output" in status.message
    assert backend.fetch_output(handle, tmp_path / "x.ipynb") is None


def test_cancel_goes_through_cancel_requested_and_is_a_no_op_once_over(backend, jobs, checkout):
    """The fake answers begin_cancel with CancelRequested, then Canceled, as the service does."""
    jobs.next_script = ["Running"]
    handle = backend.submit(_spec(checkout))
    backend.cancel(handle)
    assert jobs.count("begin_cancel") == 1
    requested = backend.status(handle)
    assert (requested.state, requested.raw_status) == ("running", "CancelRequested")
    final = backend.status(handle)
    assert final.state == "canceled"
    backend.cancel(handle)
    assert jobs.count("begin_cancel") == 1


# -- errors and configuration ---------------------------------------------------------------


def _http_error(code: int, message: str) -> HttpResponseError:
    error = HttpResponseError(message=message)
    error.status_code = code
    return error


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (_http_error(403, "AuthorizationFailed: no write on jobs"), "AzureML Data Scientist"),
        (_http_error(404, "Compute cpu-cluster not found"), "compute.target"),
        (_http_error(400, "QuotaExceeded for Standard_DS3_v2"), "quota"),
        (ClientAuthenticationError("DefaultAzureCredential failed"), "managed identity"),
    ],
)
def test_refusals_become_permanent_errors_that_say_what_to_fix(
    backend, jobs, checkout, monkeypatch, error, words
):
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "s3cr3t-value")
    jobs.create_error = error
    with pytest.raises(PermanentBackendError) as caught:
        backend.submit(_spec(checkout))
    text = str(caught.value)
    assert words in text and "ws" in text and "\n" not in text
    assert "s3cr3t-value" not in text


@pytest.mark.parametrize("code", [429, 500, 503])
def test_throttling_and_server_errors_are_left_for_the_retry_policy(backend, jobs, checkout, code):
    jobs.create_error = _http_error(code, "busy")
    with pytest.raises(HttpResponseError) as caught:
        backend.submit(_spec(checkout))
    assert not isinstance(caught.value, PermanentBackendError)


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
    monkeypatch.setenv("AZUREML_RESOURCE_GROUP", "rg-settings")
    monkeypatch.setenv("AZUREML_WORKSPACE", "ws-settings")
    handle = backend.submit(spec)
    assert backend.clients_made[-1] == WorkspaceRef(
        fakes.SUBSCRIPTION, "rg-settings", "ws-settings"
    )
    assert handle.data["workspace"]["resourceGroup"] == "rg-settings"


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


# -- the code that runs on the compute ------------------------------------------------------


@pytest.mark.slow
def test_the_entry_script_runs_papermill_with_the_exact_parameters(backend, jobs, tmp_path):
    """Runs the shipped entry script as the job would, with the command's own --job value."""
    repo = tmp_path / "repo"
    (repo / "nb").mkdir(parents=True)
    (repo / "nb" / "echo.ipynb").write_text(
        json.dumps(
            _notebook(
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
        )
    )
    spec = _spec(repo)
    spec.notebook = "nb/echo.ipynb"
    backend.submit(spec)
    code = jobs.code_snapshots[spec.run_key]
    work = tmp_path / "job"
    for name, data in code.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(data)
    command = jobs.bodies[spec.run_key]["properties"]["command"]
    args = command.split()[1:]
    out = tmp_path / "mounted-output"
    args[args.index("${{outputs.notebook}}")] = str(out)
    result = subprocess.run(
        [sys.executable, *args], cwd=work, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-2000:]
    executed = json.loads((out / "echo.ipynb").read_text())
    printed = "".join(executed["cells"][-1]["outputs"][0]["text"]).splitlines()
    assert json.loads(printed[0]) == HOSTILE
    assert printed[1] == str(work / "nb")


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
    assert report["submits"] == 1, report  # the replay got as far as submitting on azureml
    assert report["backends"] == ["azureml", "azureml-v1"]
    assert report["heavy"] == []


@pytest.mark.parametrize("name", ["local", "azureml", "azureml-v1"])
def test_switching_compute_backend_is_a_name_in_the_message(name, monkeypatch):
    from notebookops.compute import Backend

    monkeypatch.setenv("NOTEBOOKOPS_ALLOW_LOCAL_BACKEND", "1")
    backend = get_backend(name)
    assert backend.name == name and isinstance(backend, Backend)
