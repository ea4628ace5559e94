"""The `azureml-v1` backend (azureml-core + azureml-contrib-notebook) on real SDK objects.

Two boundaries, each said where it is used:

- **Reading, cancelling and downloading runs go over the wire** (the "v1 at the wire"
  section): the backend's real service (`Run.get`, the Run's get_status, get_details,
  cancel, get_file_names, download_file) runs down to `requests`, and only the services'
  answers are faked (tests.azureml_fakes.FakeRunHistory at `HTTPAdapter.send`: the
  managed-identity endpoint, ARM, discovery, run history, the execution service's cancel, the
  artifact service and blob storage).
- **Submit and environments stay at the backend's service seam** `V1Service`
  (`Experiment.submit`, `Environment.get`, and `Run.get` for the runs that submit returns),
  replaced by tests.azureml_fakes.FakeV1Service: azureml-core's submit spans five services
  (ARM, run history, execution, artifacts, a snapshot upload through azure-storage-blob, each
  with its own session, retries and token refresh), so a recorded HTTP layer for it would be
  larger than the backend it tests. NotebookRunConfig, RunConfiguration, Environment,
  CondaDependencies, Workspace and the auth objects are the real ones, built offline. That
  fake answers as the service does where the backend depends on it: runs follow the documented
  v1 status sequence, a duplicate run id and an environment named with a reserved prefix are
  refused with the service's words, and `Experiment.submit` tags the run in a second call, as
  the SDK does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import azureml.core  # noqa: F401 - pay the import once per module
import pytest
import requests
from azureml.core import Environment
from azureml.core.authentication import MsiAuthentication
from azureml.core.conda_dependencies import CondaDependencies
from azureml.exceptions import ExperimentExecutionException

from notebookops.compute import PermanentBackendError, RunNotFinishedError, RunSpec, run_key
from notebookops.compute.azureml_v1 import AzureMLV1Backend, parse_environment
from tests import azureml_fakes as fakes

HOSTILE = {
    "quotes": 'it\'s "quoted"',
    "newlines": "a\nb\r\n",
    "shell": "x; $(rm -rf /) ${{outputs.y}} | cat",
    "unicode": "naïve 東京 🚀",
    "tiny": 1e-05,
    "flag": False,
    "nested": {"l": [1, None]},
}


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "nb" / "smoke").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "nb" / "smoke" / "train.ipynb").write_text(json.dumps(fakes.notebook_json()))
    (root / "nb" / "helper.py").write_text("X = 1\n")
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
    return h.hexdigest()


def _spec(checkout: Path, **compute) -> RunSpec:
    return RunSpec(
        run_key=run_key("inst-1", "nb/smoke/train.ipynb"),
        instance_id="inst-1",
        notebook="nb/smoke/train.ipynb",
        checkout=str(checkout),
        commit="c0ffee",
        parameters=dict(HOSTILE),
        timeout_seconds=900.5,
        compute={
            "backend": "azureml-v1",
            "target": "cpu-cluster",
            "environment": "nb-env@latest",
            "experiment": "notebook-ci",
            "workspace": {
                "subscriptionId": fakes.SUBSCRIPTION,
                "resourceGroup": "rg",
                "name": "ws",
            },
            **compute,
        },
        tags={"notebookops.instance": "inst-1", "notebookops.commit": "c0ffee"},
    )


def _registered_env() -> Environment:
    env = Environment("nb-env")
    env.python.conda_dependencies = CondaDependencies.create(
        python_version="3.10", pip_packages=["azureml-defaults", "papermill", "ipykernel"]
    )
    return env


@pytest.fixture
def service() -> fakes.FakeV1Service:
    svc = fakes.FakeV1Service()
    svc.environments["nb-env"] = _registered_env()
    return svc


@pytest.fixture
def backend(service, tmp_path) -> AzureMLV1Backend:
    return AzureMLV1Backend(service=service, work_dir=tmp_path / "work", auth=MsiAuthentication())


def test_submit_hands_azure_ml_a_notebook_run_that_uploads_its_output(backend, service, checkout):
    spec = _spec(checkout)
    handle = backend.submit(spec)

    [sub] = service.submissions
    config = sub["config"]
    assert (sub["experiment"], sub["run_id"], sub["tags"]) == (
        "notebook-ci",
        spec.run_key,
        spec.tags,
    )
    ws = sub["workspace"]
    assert (ws.subscription_id, ws.resource_group, ws.name) == (fakes.SUBSCRIPTION, "rg", "ws")
    assert config.run_config.target == "cpu-cluster"
    assert config.run_config.max_run_duration_seconds == 901
    assert config.script == "papermill_notebook_run_handler.py"
    args = config.arguments
    assert args[args.index("-i") + 1] == "nb/smoke/train.ipynb"
    assert args[args.index("-o") + 1] == "outputs/train.ipynb"
    assert json.loads(args[args.index("-n") + 1]) == HOSTILE  # what the runner json.loads
    papermill_options = json.loads(args[args.index("-p") + 1])
    assert papermill_options["cwd"] == "nb/smoke" and papermill_options["log_output"] is True
    assert sorted(sub["snapshot"]) == sorted(
        [
            ".amlignore",  # empty: the ignore rules were applied while staging
            "nb/smoke/train.ipynb",
            "nb/helper.py",
            "papermill_notebook_run_handler.py",
        ]
    )
    assert "setuptools<82" in sub["conda"] and "azureml-contrib-notebook[full]" in sub["conda"]
    assert config.run_config.environment.name == "notebookops-nb-env"
    assert service.runs[spec.run_key].tags == spec.tags
    assert handle.run_id == spec.run_key and handle.backend == "azureml-v1"
    assert handle.portal_url.startswith(f"https://ml.azure.com/runs/{spec.run_key}?wsid=")


def test_the_checkout_and_the_registered_environment_are_not_modified(backend, service, checkout):
    before = _digest(checkout)
    env = service.environments["nb-env"]
    env_before = env.python.conda_dependencies.serialize_to_string()
    backend.submit(_spec(checkout))
    assert _digest(checkout) == before
    assert not (checkout / "nb" / "smoke" / "papermill_notebook_run_handler.py").exists()
    assert env.python.conda_dependencies.serialize_to_string() == env_before
    assert env.name == "nb-env"


def test_source_directory_is_the_snapshot_root(backend, service, checkout):
    backend.submit(_spec(checkout, sourceDirectory="nb/smoke"))
    [sub] = service.submissions
    assert sorted(sub["snapshot"]) == [
        ".amlignore",
        "papermill_notebook_run_handler.py",
        "train.ipynb",
    ]
    args = sub["config"].arguments
    assert json.loads(args[args.index("-p") + 1]).get("cwd") is None  # notebook at the root


def test_without_an_environment_a_notebook_ready_one_is_defined(backend, service, checkout):
    backend.submit(_spec(checkout, environment=None))
    conda = service.submissions[0]["conda"]
    for package in ("papermill", "ipykernel", "setuptools<82", "azureml-contrib-notebook[full]"):
        assert package in conda
    assert service.count("get_environment") == 0


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("azureml:nb-env:3", ("nb-env", "3", None)),
        ("nb-env@latest", ("nb-env", None, None)),
        ("nb-env@prod", ("nb-env", None, "prod")),
        ("nb-env", ("nb-env", None, None)),
        (
            "AzureML-sklearn-1.0-ubuntu20.04-py38-cpu@latest",
            ("AzureML-sklearn-1.0-ubuntu20.04-py38-cpu", None, None),
        ),
        (
            f"/subscriptions/{fakes.SUBSCRIPTION}/resourceGroups/rg/providers/"
            "Microsoft.MachineLearningServices/workspaces/ws/environments/nb-env/versions/4",
            ("nb-env", "4", None),
        ),
    ],
)
def test_environment_references(text, parsed):
    assert parse_environment(text) == parsed


def test_a_bad_or_unknown_environment_is_a_permanent_error_naming_it(backend, checkout):
    with pytest.raises(PermanentBackendError, match=r"compute.environment 'azureml://x/y'"):
        backend.submit(_spec(checkout, environment="azureml://x/y"))
    with pytest.raises(PermanentBackendError, match=r"'missing-env'.*not found"):
        backend.submit(_spec(checkout, environment="missing-env"))


def test_a_lost_submit_response_retried_finds_the_run_and_tags_it(backend, service, checkout):
    """The fake creates the run, then drops the response as a broken connection would, before
    the SDK's second call (set_tags): the retried submit finds the untagged run and tags it."""
    service.lose_next_response = True
    spec = _spec(checkout)
    with pytest.raises(requests.ConnectionError):
        backend.submit(spec)
    assert service.runs[spec.run_key].tags == {}
    first = backend.submit(spec)
    assert service.runs[spec.run_key].tags == spec.tags
    second = backend.submit(spec)
    assert service.count("submit") == 1 and list(service.runs) == [spec.run_key]
    assert service.count("set_tags") == 1  # tagged once, not on every retry
    assert first == second


def test_a_duplicate_run_id_answer_resolves_to_the_existing_run(backend, service, checkout):
    """Another worker submitted between our lookup and our submit: the fake's first lookup
    misses, and its submit refuses the id as the service does."""
    spec = _spec(checkout)
    backend.submit(spec)
    real_get = service.get_run
    misses = [None]

    def racing_get(ws, run_id):
        return misses.pop() if misses else real_get(ws, run_id)

    service.get_run = racing_get
    handle = backend.submit(spec)
    assert service.count("submit") == 2 and len(service.runs) == 1
    assert handle.run_id == spec.run_key


V1_DOCUMENTED = {  # reference §3.1 / §8.3
    "NotStarted": "queued",
    "Starting": "queued",
    "Provisioning": "queued",
    "Preparing": "queued",
    "Queued": "queued",
    "Unapproved": "queued",
    "Running": "running",
    "Finalizing": "running",
    "CancelRequested": "running",
    "NotResponding": "running",
    "Pausing": "running",
    "Paused": "running",
    "Completed": "succeeded",
    "Failed": "failed",
    "Canceled": "canceled",
    "SomethingNew": "running",
}


@pytest.mark.parametrize(("raw", "state"), sorted(V1_DOCUMENTED.items()))
def test_every_documented_run_status_maps_to_a_contract_state(
    backend, service, checkout, raw, state
):
    """The fake run is scripted to sit in one status."""
    service.next_script = [raw]
    status = backend.status(backend.submit(_spec(checkout)))
    assert (status.state, status.raw_status) == (state, raw)


def test_a_failed_run_reports_cell_service_error_times_and_its_notebook(
    backend, service, checkout, tmp_path
):
    """Scripted: NotStarted, Queued, Running, Failed; outputs/ holds the executed notebook."""
    service.next_script = fakes.FAILING
    handle = backend.submit(_spec(checkout))
    run = service.runs[handle.run_id]
    run.files["outputs/train.ipynb"] = json.dumps(
        fakes.notebook_json(("ValueError", "bad"))
    ).encode()
    run.error_message = "UserError: User program failed with ValueError: bad"
    with pytest.raises(RunNotFinishedError):
        backend.fetch_output(handle, tmp_path / "o.ipynb")
    while not (status := backend.status(handle)).terminal:
        pass
    assert status.state == "failed"
    assert (status.error.cell_index, status.error.ename) == (1, "ValueError")
    assert status.message == "UserError: User program failed with ValueError: bad"
    assert (status.started_at, status.ended_at) == (
        "2026-01-01T10:00:00.000Z",
        "2026-01-01T10:05:30.000Z",
    )
    dest = tmp_path / "out" / "nb" / "smoke" / "train.ipynb"
    assert backend.fetch_output(handle, dest) == dest
    assert json.loads(dest.read_text())["cells"][1]["outputs"][0]["ename"] == "ValueError"


def test_cancel_then_canceled_and_no_second_cancel(backend, service, checkout):
    """The fake answers cancel with CancelRequested, then Canceled."""
    service.next_script = ["Running"]
    handle = backend.submit(_spec(checkout))
    backend.cancel(handle)
    assert backend.status(handle).raw_status == "CancelRequested"
    assert backend.status(handle).state == "canceled"
    backend.cancel(handle)
    assert service.count("cancel") == 1


@pytest.mark.parametrize(
    ("body", "transient"),
    [
        ({"status_code": 429, "error_details": {"error": {"message": "Too many requests"}}}, True),
        ({"status_code": 503, "error_details": {"error": {"message": "unavailable"}}}, True),
        (
            {"status_code": 403, "error_details": {"error": {"message": "AuthorizationFailed"}}},
            False,
        ),
        ({"status_code": 404, "error_details": {"error": {"message": "Compute not found"}}}, False),
    ],
)
def test_submit_errors_retry_or_fail_by_status(backend, service, checkout, body, transient):
    service.submit_error = ExperimentExecutionException(json.dumps(body, indent=4))
    if transient:
        with pytest.raises(ExperimentExecutionException):
            backend.submit(_spec(checkout))
        return
    with pytest.raises(PermanentBackendError) as caught:
        backend.submit(_spec(checkout))
    text = str(caught.value)
    assert body["error_details"]["error"]["message"] in text and "\n" not in text
    assert "AzureML Data Scientist" in text or "compute.target" in text


def test_service_principal_settings_must_be_complete_and_never_leak(
    service, checkout, tmp_path, monkeypatch
):
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "sup3r-s3cret")
    monkeypatch.delenv("AZURE_TENANT_ID", raising=False)
    monkeypatch.setenv("AZURE_CLIENT_ID", "11111111-1111-1111-1111-111111111111")
    backend = AzureMLV1Backend(service=service, work_dir=tmp_path / "w")
    with pytest.raises(PermanentBackendError) as caught:
        backend.submit(_spec(checkout))
    assert "AZURE_TENANT_ID" in str(caught.value) and "sup3r-s3cret" not in str(caught.value)


# -- environments the service accepts -------------------------------------------------------


def _curated_env(name: str, pip: list[str]) -> Environment:
    env = Environment(name)
    env.python.conda_dependencies = CondaDependencies.create(
        python_version="3.10", pip_packages=pip
    )
    return env


def test_a_curated_environment_is_copied_under_a_name_the_service_accepts(
    backend, service, checkout
):
    curated = "AzureML-sklearn-1.0-ubuntu20.04-py38-cpu"
    service.environments[curated] = _curated_env(curated, ["papermill", "ipykernel"])
    spec = _spec(checkout, environment=f"{curated}@latest")
    handle = backend.submit(spec)
    [sub] = service.submissions
    env = sub["config"].run_config.environment
    assert env.name == f"notebookops-{curated}" and env.version is None
    assert "setuptools<82" in sub["conda"]
    assert service.environments[curated].name == curated  # the curated one is untouched
    assert handle.run_id == spec.run_key


def test_the_fake_refuses_a_reserved_environment_name_as_the_service_does(service, checkout):
    """The check the test above relies on: a copy named AzureML-... is refused."""
    from azureml.core.runconfig import RunConfiguration

    config = RunConfiguration()
    config.environment = _curated_env("AzureML-x-notebookops", [])
    wrapped = type("Config", (), {"run_config": config, "source_directory": str(checkout)})
    with pytest.raises(ExperimentExecutionException, match="can not start with the prefix"):
        service.submit(None, "e", wrapped(), "r1", {})


@pytest.mark.parametrize(
    ("pip", "pinned"),
    [
        (["papermill", "ipykernel"], True),
        (["papermill", "setuptools-scm"], True),  # another package: the pin is still needed
        (["papermill", "setuptools_rust>=1"], True),
        (["papermill", "setuptools"], True),  # unpinned: pip would take 82+
        (["papermill", "setuptools>=60"], True),
        (["papermill", "setuptools<70"], False),  # already keeps pkg_resources
        (["papermill", "Setuptools==65.5.0"], False),
    ],
)
def test_the_setuptools_pin_matches_the_package_name_exactly(
    backend, service, checkout, pip, pinned
):
    service.environments["nb-env"] = _curated_env("nb-env", pip)
    backend.submit(_spec(checkout))
    pips = service.submissions[0]["config"].run_config.environment.python.conda_dependencies
    assert ("setuptools<82" in list(pips.pip_packages)) == pinned


# -- the snapshot ---------------------------------------------------------------------------


def _writable(root: Path) -> None:
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def test_ignore_files_shape_the_snapshot_but_never_drop_the_runner_or_the_notebook(
    backend, service, checkout
):
    _writable(checkout)
    (checkout / ".gitignore").write_text("*.py\n*.ipynb\ndata/\n")
    (checkout / "data").mkdir()
    (checkout / "data" / "big.csv").write_text("x\n" * 100)
    backend.submit(_spec(checkout))
    snapshot = service.submissions[0]["snapshot"]
    assert "nb/helper.py" not in snapshot and "data/big.csv" not in snapshot
    assert {"nb/smoke/train.ipynb", "papermill_notebook_run_handler.py"} <= set(snapshot)
    assert ".gitignore" in snapshot and snapshot[".amlignore"].startswith(b"#")


def test_a_snapshot_over_2000_files_fails_at_submit_with_count_size_and_the_setting(
    backend, service, checkout
):
    _writable(checkout)
    many = checkout / "nb" / "many"
    many.mkdir()
    for i in range(2001):
        (many / f"f{i}.txt").write_text("x")
    with pytest.raises(PermanentBackendError) as caught:
        backend.submit(_spec(checkout))
    text = str(caught.value)
    assert "2,005 files" in text and "MB" in text and "2,000 files" in text
    assert "compute.sourceDirectory" in text and ".amlignore" in text
    assert service.count("submit") == 0
    # Narrowing the upload is the fix the message names.
    backend.submit(_spec(checkout, sourceDirectory="nb/smoke"))
    assert service.count("submit") == 1


def test_a_snapshot_over_300_mb_fails_at_submit(backend, service, checkout):
    _writable(checkout)
    with open(checkout / "nb" / "weights.bin", "wb") as handle:
        handle.truncate(301 * 1024 * 1024)  # sparse: no disk is spent on it
    with pytest.raises(PermanentBackendError, match=r"30[01]\.\d MB.*300 MB"):
        backend.submit(_spec(checkout))
    assert service.count("submit") == 0


def test_an_ignored_big_file_keeps_the_snapshot_inside_the_limits(backend, service, checkout):
    _writable(checkout)
    with open(checkout / "nb" / "weights.bin", "wb") as handle:
        handle.truncate(301 * 1024 * 1024)
    (checkout / ".amlignore").write_text("*.bin\n")
    backend.submit(_spec(checkout))
    assert "nb/weights.bin" not in service.submissions[0]["snapshot"]


# -- times and credentials ------------------------------------------------------------------


def test_a_queued_run_has_no_start_time_and_a_running_one_has_its_own(backend, service, checkout):
    """The fake's run history sets startTimeUtc from the second read on (Queued included),
    as the service does once a run leaves NotStarted; queued is not execution."""
    service.next_script = ["NotStarted", "Queued", "Preparing", "Running"]
    handle = backend.submit(_spec(checkout))
    seen = [backend.status(handle) for _ in range(4)]
    assert [s.state for s in seen] == ["queued", "queued", "queued", "running"]
    assert [s.started_at for s in seen] == [None, None, None, "2026-01-01T10:00:00.000Z"]


def test_a_transient_managed_identity_failure_is_retried_not_fatal(backend, service, checkout):
    from azureml.exceptions import AuthenticationException

    handle = backend.submit(_spec(checkout))
    real = service.get_run

    def flaky(ws, run_id):
        service.get_run = real
        raise AuthenticationException(
            "MSI: Failed to retrieve a token from the managed identity endpoint: connection "
            "timed out"
        )

    service.get_run = flaky
    with pytest.raises(AuthenticationException):
        backend.status(handle)
    assert backend.status(handle).state == "queued"


def test_a_refused_identity_is_permanent(backend, service, checkout):
    from azureml.exceptions import AuthenticationException

    def refused(ws, run_id):
        raise AuthenticationException("AADSTS700016: Application not found in the directory")

    service.get_run = refused
    with pytest.raises(PermanentBackendError, match="AzureML Data Scientist"):
        backend.submit(_spec(checkout))


# -- output storage refusing the identity ---------------------------------------------------


def _storage_refusal() -> Exception:
    """What azure-storage-blob raises (through azureml-core's download_file) when an
    identity-based datastore refuses an identity without a data role."""
    from azure.core.exceptions import HttpResponseError

    exc = HttpResponseError(
        message="This request is not authorized to perform this operation using this "
        "permission.\nRequestId:0f0c\nTime:2026-01-01T10:06:00Z\n"
        "ErrorCode:AuthorizationPermissionMismatch"
    )
    exc.status_code, exc.error_code = 403, "AuthorizationPermissionMismatch"
    return exc


@pytest.mark.parametrize(
    ("script", "state"), [(["Completed"], "succeeded"), (["Failed"], "failed")]
)
def test_a_finished_run_whose_output_storage_refuses_the_identity_keeps_its_state(
    backend, service, checkout, tmp_path, script, state
):
    service.next_script = script
    handle = backend.submit(_spec(checkout))
    run = service.runs[handle.run_id]
    run.files["outputs/train.ipynb"] = json.dumps(fakes.notebook_json()).encode()

    def forbidden(name, output_file_path=None):
        service.calls.append(("download_file", name))
        raise _storage_refusal()

    run.download_file = forbidden
    status = backend.status(handle)
    assert (status.state, status.raw_status) == (state, script[0])
    assert "output could not be downloaded" in status.message
    assert "'Storage Blob Data Reader' role on the workspace's storage account" in status.message
    assert "AuthorizationPermissionMismatch" in status.message and "\n" not in status.message
    assert backend.fetch_output(handle, tmp_path / "x.ipynb") is None
    assert not (tmp_path / "x.ipynb").exists()


# -- the runner's packages ------------------------------------------------------------------


def test_a_conda_environment_gets_papermill_and_ipykernel_when_it_lists_neither(
    backend, service, checkout
):
    service.environments["nb-env"] = _curated_env("nb-env", ["pandas"])
    backend.submit(_spec(checkout))
    pips = list(
        service.submissions[0][
            "config"
        ].run_config.environment.python.conda_dependencies.pip_packages
    )
    assert {"papermill", "ipykernel", "pandas"} <= set(pips)


def test_a_listed_papermill_pin_is_kept_and_not_doubled(backend, service, checkout):
    service.environments["nb-env"] = _curated_env("nb-env", ["Papermill==2.4.0", "ipykernel>=6"])
    backend.submit(_spec(checkout))
    pips = list(
        service.submissions[0][
            "config"
        ].run_config.environment.python.conda_dependencies.pip_packages
    )
    assert [p for p in pips if p.lower().startswith(("papermill", "ipykernel"))] == [
        "Papermill==2.4.0",
        "ipykernel>=6",
    ]


def _docker_env(name: str) -> Environment:
    env = Environment(name)
    env.docker.base_image = "myregistry.azurecr.io/notebooks:1"
    env.python.user_managed_dependencies = True
    return env


HANDLER_IMPORT_FAILURE = """\
Traceback (most recent call last):
  File "papermill_notebook_run_handler.py", line 9, in <module>
    import azureml.contrib.notebook._engines
  File "/azureml-envs/x/lib/python3.10/site-packages/azureml/contrib/notebook/_engines/__init__.py", line 5, in <module>
    from papermill.engines import papermill_engines
ModuleNotFoundError: No module named 'papermill'
"""


def test_a_user_managed_environment_without_papermill_is_named_from_the_runs_log(
    backend, service, checkout
):
    """A Docker-only environment: nothing can be added at submit, and the run fails in the
    handler's imports before any notebook exists; the driver log says why."""
    service.environments["nb-docker"] = _docker_env("nb-docker")
    service.next_script = ["Failed"]
    handle = backend.submit(_spec(checkout, environment="nb-docker@latest"))
    conda = service.submissions[0]["config"].run_config.environment.python
    assert conda.user_managed_dependencies is True
    run = service.runs[handle.run_id]
    run.files["user_logs/std_log.txt"] = ("x" * 300_000 + "\n" + HANDLER_IMPORT_FAILURE).encode()
    run.error_message = "UserError: Execution failed. User process exited with code 1"
    status = backend.status(handle)
    assert status.state == "failed" and status.error is None
    assert status.message.startswith(
        "the environment nb-docker@latest lacks papermill, which the azureml-v1 runner "
        "(azureml-contrib-notebook's papermill handler) needs (user_logs/std_log.txt says "
        "\"No module named 'papermill'\")"
    )
    assert "user-managed" in status.message and "install papermill in that image" in status.message
    backend.status(handle)
    assert service.calls.count(("download_file", "user_logs/std_log.txt")) == 1  # cached


def test_a_run_whose_log_names_no_runner_package_keeps_the_services_reason(
    backend, service, checkout
):
    service.next_script = ["Failed"]
    handle = backend.submit(_spec(checkout))
    run = service.runs[handle.run_id]
    run.files["azureml-logs/70_driver_log.txt"] = b"Starting the daemon thread\nout of memory\n"
    run.error_message = "Job failed: the node ran out of memory"
    assert backend.status(handle).message == "Job failed: the node ran out of memory"


def test_an_unreadable_log_keeps_the_services_reason(backend, service, checkout):
    service.next_script = ["Failed"]
    handle = backend.submit(_spec(checkout))
    run = service.runs[handle.run_id]
    run.files["user_logs/std_log.txt"] = b"No module named 'papermill'\n"
    run.error_message = "UserError: User process exited with code 1"

    def refused(name, output_file_path=None):
        raise _storage_refusal()

    run.download_file = refused
    assert backend.status(handle).message == "UserError: User process exited with code 1"


def test_find_run_by_key_finds_the_run_or_none(backend, service, checkout):
    spec = _spec(checkout)
    assert backend.find_run(spec.compute, spec.run_key, spec.notebook) is None
    submitted = backend.submit(spec)
    found = backend.find_run(spec.compute, spec.run_key, spec.notebook)
    assert (found.run_id, found.data["workspace"], found.data["output"]) == (
        submitted.run_id,
        submitted.data["workspace"],
        "outputs/train.ipynb",
    )
    backend.cancel(found)
    assert service.count("cancel") == 1


def test_the_monitor_cancels_a_run_by_its_key_when_its_submit_gave_up(
    backend, service, checkout, monkeypatch
):
    """ActivityMonitor's `orphans`, what the orchestrator asks for when a submit ran out of
    retries after an attempt whose answer was lost: the run is found by its run id (the run
    key) and canceled; no run, or a finished one, is left alone; a failure is an outcome."""
    from notebookops import activities
    from notebookops.compute import registry

    monkeypatch.setitem(registry._factories, "azureml-v1", lambda: backend)
    spec = _spec(checkout)
    orphan = {"path": spec.notebook, "compute": spec.compute}

    def cancel_by_key() -> dict:
        (outcome,) = activities.monitor({"instanceId": "inst-1", "orphans": [orphan]})["orphans"]
        return outcome

    assert cancel_by_key()["outcome"] == "absent"
    service.next_script = ["Running"]
    backend.submit(spec)
    answer = cancel_by_key()
    assert answer == {"path": spec.notebook, "outcome": "canceled", "runId": spec.run_key}
    assert service.count("cancel") == 1
    while not backend.status(backend.find_run(spec.compute, spec.run_key, spec.notebook)).terminal:
        pass
    assert cancel_by_key()["outcome"] == "finished"

    def throttled(ws, run_id):
        raise ExperimentExecutionException('{"status_code": 429, "error_details": {}}')

    service.get_run = throttled
    answer = cancel_by_key()
    assert answer["outcome"] == "error" and "429" in answer["error"]
    assert service.count("cancel") == 1


# -- verdicts on notebooks executed by papermill on a real kernel ---------------------------
#
# The v1 runner is azureml-contrib-notebook's handler, i.e. `papermill.execute_notebook`. Each
# notebook below is executed here by papermill on a real kernel, and the fake run hands back
# exactly that output notebook (and papermill's own log) as the service would.

MARKER = "papermill-error-cell-tag"


def _committed(cells: list[tuple[str, str, list[str]]]) -> dict:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Py"}
    for kind, source, tags in cells:
        cell = (
            nbformat.v4.new_markdown_cell(source)
            if kind == "md"
            else nbformat.v4.new_code_cell(source)
        )
        if tags:
            cell.metadata["tags"] = tags
        nb.cells.append(cell)
    return json.loads(nbformat.writes(nb))


CORPUS = {
    # The only error is allowed: nbclient goes on, papermill's final check raises.
    "allowed": [
        ("md", "# allowed", []),
        ("code", "1/0", ["raises-exception"]),
        ("code", "x = 2", []),
    ],
    # An allowed error, then a real one; the commit still holds papermill's markers from an
    # earlier run (papermill strips them before running, so the executed copy is shorter).
    "later": [
        ("md", '<span style="color:red">An Exception was encountered</span>', [MARKER]),
        ("md", "# later", []),
        ("code", "1/0", ["raises-exception"]),
        ("code", "{}['id']", []),
        ("code", "y = 1", []),
    ],
    # An allowed error, then the kernel dies (out of memory): papermill ends its loop (the
    # notebook's end time is set) but never starts the last cell, and raises DeadKernelError.
    "dead-kernel": [
        ("md", "# dead", []),
        ("code", "1/0", ["raises-exception"]),
        ("code", "import os\nos._exit(1)", []),
        ("code", "z = 3", []),
    ],
    # Clean: papermill raises nothing, but the run failed after it (say, a node lost).
    "clean": [("md", "# clean", []), ("code", "x = 1", [])],
}
KILLED = [
    ("md", "# killed", []),
    ("code", "1/0", ["raises-exception"]),
    (
        "code",
        "import os, time\nopen('kernel.pid', 'w').write(str(os.getpid()))\ntime.sleep(60)",
        [],
    ),
    ("code", "z = 3", []),
]


def _papermill(source: Path, out: Path) -> None:
    """papermill as the v1 handler calls it; a kernel that failed to start is started again."""
    import papermill
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    for attempt in (1, 2):
        try:
            papermill.execute_notebook(str(source), str(out), progress_bar=False, log_output=False)
            return
        except (PapermillExecutionError, DeadKernelError):
            return
        except RuntimeError:
            if attempt == 2:
                raise


def _killed(folder: Path) -> Path:
    """papermill killed while cell 2 runs (a preempted node): cell 2 started, never ended."""
    import os
    import signal
    import subprocess
    import sys
    import time

    source, out = folder / "killed.ipynb", folder / "killed.out.ipynb"
    source.write_text(json.dumps(_committed(KILLED)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "papermill", str(source), str(out)],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pid_file = folder / "kernel.pid"
    try:
        deadline = time.monotonic() + 120
        while not (pid_file.is_file() and pid_file.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, (
                "papermill never got to cell 2"
            )
            time.sleep(0.1)
        time.sleep(0.5)  # papermill saved the notebook at cell 2's start
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if pid_file.is_file() and pid_file.read_text():
            with contextlib.suppress(ProcessLookupError):  # the kernel is its own session
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
    return out


def _no_ipykernel(folder: Path) -> tuple[Path, bytes]:
    """papermill on a kernelspec whose Python lacks ipykernel, as in an image without it: the
    output notebook is saved before the kernel dies, with no cell started; stderr is the log."""
    import os
    import subprocess
    import sys

    kernels = folder / "jupyter" / "kernels" / "bare"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(
        json.dumps(
            {
                "argv": ["/usr/bin/python3", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "bare",
                "language": "python",
            }
        )
    )
    source, out = folder / "bare.ipynb", folder / "bare.out.ipynb"
    source.write_text(json.dumps(_committed(CORPUS["clean"])))
    done = subprocess.run(
        [sys.executable, "-m", "papermill", str(source), str(out), "-k", "bare", "--log-output"],
        cwd=folder,
        capture_output=True,
        timeout=180,
        env={**os.environ, "JUPYTER_PATH": str(folder / "jupyter")},
    )
    assert done.returncode != 0
    return out, done.stdout + done.stderr


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict[str, tuple[dict, bytes]]:
    """name -> (committed notebook, papermill's output notebook bytes)."""
    folder = tmp_path_factory.mktemp("executed")
    found = {}
    for name, cells in CORPUS.items():
        committed = _committed(cells)
        source = folder / f"{name}.ipynb"
        source.write_text(json.dumps(committed))
        _papermill(source, folder / f"{name}.out.ipynb")
        found[name] = (committed, (folder / f"{name}.out.ipynb").read_bytes())
    found["killed"] = (_committed(KILLED), _killed(folder).read_bytes())
    out, log = _no_ipykernel(folder)
    found["no-ipykernel"] = (_committed(CORPUS["clean"]), out.read_bytes())
    found["no-ipykernel-log"] = ({}, log)
    return found


def _failed_run(backend, service, checkout, committed: dict, output: bytes, **compute):
    """A v1 run that Azure ML reports Failed, handing back papermill's output notebook; the
    checkout holds the notebook as committed."""
    _writable(checkout)
    (checkout / "nb" / "smoke" / "train.ipynb").write_text(json.dumps(committed))
    service.next_script = ["Running", "Failed"]
    handle = backend.submit(_spec(checkout, **compute))
    run = service.runs[handle.run_id]
    run.files["outputs/train.ipynb"] = output
    run.error_message = (
        "UserError: User program failed with PapermillExecutionError: "
        'Exception encountered at "In [1]"'
    )
    assert backend.status(handle).state == "running"
    return handle


def _observed(backend, handle, checkout, tmp_path, monkeypatch) -> dict:
    """The monitor's account of the run (activities._describe: status, download, numbering
    against the commit, rendering)."""
    from notebookops import activities

    monkeypatch.setenv(activities.OUTPUT_DIR_SETTING, str(tmp_path / "out"))
    return activities._describe(
        "inst-1", "nb/smoke/train.ipynb", handle, backend, backend.status(handle), str(checkout)
    ).to_dict()


@pytest.mark.slow
def test_v1_lets_an_error_in_a_raises_exception_cell_pass_as_the_other_backends_do(
    backend, service, checkout, tmp_path, monkeypatch, executed
):
    committed, output = executed["allowed"]
    assert MARKER in output.decode()  # papermill's final check failed it and marked the cell
    handle = _failed_run(backend, service, checkout, committed, output)
    status = backend.status(handle)
    assert (status.state, status.raw_status, status.error) == ("succeeded", "Failed", None)
    assert "raises-exception" in status.message and "papermill's final check" in status.message
    result = _observed(backend, handle, checkout, tmp_path, monkeypatch)
    assert (result["state"], result["error"]) == ("succeeded", None)
    delivered = json.loads(Path(result["outputNotebook"]).read_text())
    sources = ["".join(c["source"]) for c in delivered["cells"]]
    assert sources == ["# allowed", "1/0", "x = 2"]  # papermill's markers removed
    assert delivered["cells"][1]["outputs"][0]["ename"] == "ZeroDivisionError"


@pytest.mark.slow
def test_v1_reports_the_first_error_not_allowed_numbered_against_the_commit(
    backend, service, checkout, tmp_path, monkeypatch, executed
):
    committed, output = executed["later"]
    handle = _failed_run(backend, service, checkout, committed, output)
    result = _observed(backend, handle, checkout, tmp_path, monkeypatch)
    assert result["state"] == "failed"
    # Committed: marker 0, title 1, allowed 2, the KeyError 3 (the executed copy counts 2).
    assert (result["error"]["ename"], result["error"]["cellIndex"]) == ("KeyError", 3)
    assert result["message"].startswith("UserError: User program failed with Papermill")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["killed", "dead-kernel"])
def test_v1_keeps_failed_when_a_cell_never_ran_after_an_allowed_error(
    backend, service, checkout, tmp_path, monkeypatch, executed, name
):
    """killed: papermill itself was killed in cell 2 (its notebook has no end time);
    dead-kernel: the kernel died in cell 2 and papermill never started cell 3."""
    committed, output = executed[name]
    nb = json.loads(output)
    assert nb["cells"][-1]["metadata"]["papermill"]["start_time"] is None
    assert (nb["metadata"]["papermill"]["end_time"] is None) == (name == "killed")
    handle = _failed_run(backend, service, checkout, committed, output)
    result = _observed(backend, handle, checkout, tmp_path, monkeypatch)
    assert result["state"] == "failed" and result["error"] is None
    assert result["message"].startswith("UserError: User program failed")


@pytest.mark.slow
def test_v1_keeps_failed_for_a_clean_notebook_in_a_failed_run(
    backend, service, checkout, tmp_path, monkeypatch, executed
):
    committed, output = executed["clean"]
    handle = _failed_run(backend, service, checkout, committed, output)
    service.runs[handle.run_id].error_message = "Job preempted: the node was lost"
    status = backend.status(handle)
    assert (status.state, status.message) == ("failed", "Job preempted: the node was lost")


@pytest.mark.slow
def test_v1_names_a_missing_ipykernel_from_papermills_log(
    backend, service, checkout, tmp_path, monkeypatch, executed
):
    """papermill really ran on a kernel whose Python lacks ipykernel: its output notebook has
    no cell started, and its log (the run's std_log.txt) says why."""
    committed, output = executed["no-ipykernel"]
    log = executed["no-ipykernel-log"][1]
    assert b"No module named ipykernel_launcher" in log
    handle = _failed_run(backend, service, checkout, committed, output)
    service.runs[handle.run_id].files["user_logs/std_log.txt"] = log
    result = _observed(backend, handle, checkout, tmp_path, monkeypatch)
    assert result["state"] == "failed" and result["error"] is None
    assert result["message"].startswith(
        "the environment nb-env@latest lacks ipykernel, which the azureml-v1 runner"
    )
    assert "No module named ipykernel_launcher" in result["message"]
    assert "add ipykernel to its pip dependencies" in result["message"]


# -- v1 at the wire: reading, cancelling and downloading runs --------------------------------
#
# Here nothing of azureml-core is replaced: the backend's default service (AzureMLCoreService:
# the real `Run.get`, and the real Run's get_status, get_details, cancel, get_file_names,
# download_file) runs down to `requests`, whose HTTPAdapter.send is tests.azureml_fakes.
# FakeRunHistory: the managed-identity endpoint, ARM, discovery, run history, the execution
# service and the artifact service answer there, and so does blob storage (azure-storage-blob's
# transport is `requests` too). Only submit stays at the service seam (see the module
# docstring): its five services are not modelled.


@pytest.fixture
def history(monkeypatch, tmp_path) -> fakes.FakeRunHistory:
    svc = fakes.FakeRunHistory()
    svc.install(monkeypatch, tmp_path)
    return svc


@pytest.fixture
def wire_backend(history, tmp_path) -> AzureMLV1Backend:
    return AzureMLV1Backend(work_dir=tmp_path / "work", auth=MsiAuthentication())


WIRE_COMPUTE = {
    "backend": "azureml-v1",
    "workspace": {
        "subscriptionId": fakes.SUBSCRIPTION,
        "resourceGroup": fakes.RESOURCE_GROUP,
        "name": fakes.WORKSPACE,
    },
}
KEY = run_key("inst-1", "nb/smoke/train.ipynb")


def _history_routes(history) -> list[tuple[str, int]]:
    """Run history, execution, artifacts and blob requests (not tokens, metadata, discovery)."""
    keep = ("/history/", "/execution/", "/artifact/", "/azureml/")
    return [(r.route, r.status) for r in history.requests if r.route.split(" ")[1].startswith(keep)]


def test_wire_a_run_is_found_by_its_key_read_and_its_notebook_downloaded(
    wire_backend, history, tmp_path
):
    assert wire_backend.find_run(WIRE_COMPUTE, KEY, "nb/smoke/train.ipynb") is None
    run = history.add_run(KEY, ["Queued", "Running", "Failed"])
    run.error = "UserError: User program failed with KeyError: 'id'"
    run.files["outputs/train.ipynb"] = json.dumps(
        fakes.notebook_json(("KeyError", "'id'"))
    ).encode()
    handle = wire_backend.find_run(WIRE_COMPUTE, KEY, "nb/smoke/train.ipynb")
    assert handle.run_id == KEY and handle.data["output"] == "outputs/train.ipynb"
    del history.requests[:]
    seen = [wire_backend.status(handle)]
    run.advance()
    seen.append(wire_backend.status(handle))
    run.advance()
    assert [(s.state, s.raw_status, s.started_at) for s in seen] == [
        ("queued", "Queued", None),
        ("running", "Running", "2026-01-01T10:00:00.000Z"),
    ]
    status = wire_backend.status(handle)
    assert (status.state, status.error.ename, status.error.cell_index) == ("failed", "KeyError", 1)
    assert status.message == "UserError: User program failed with KeyError: 'id'"
    assert status.ended_at == "2026-01-01T10:05:30.000Z"
    container = f"ExperimentRun/dcid.{KEY}"
    download = [
        (f"GET /artifact/v2.0ws:/artifacts/{container}", 200),  # get_file_names
        (f"GET /artifact/v2.0ws:/artifacts/contentinfo/{container}/outputs/train.ipynb", 200),
        (f"GET /azureml/{container}/outputs/train.ipynb", 206),  # the blob, by its SAS URI
    ]
    routes = _history_routes(history)
    assert routes[-3:] == download, routes
    assert routes.count((f"GET /azureml/{container}/outputs/train.ipynb", 206)) == 1
    dest = tmp_path / "out" / "train.ipynb"
    assert wire_backend.fetch_output(handle, dest) == dest
    assert json.loads(dest.read_text())["cells"][1]["outputs"][0]["ename"] == "KeyError"
    assert sum(1 for r in history.requests if r.route.startswith("GET /azureml/")) == 1  # cached
    token = fakes.FakeCredential.TOKEN
    assert all(
        r.headers.get("Authorization") == f"Bearer {token}"
        for r in history.requests
        if "/history/" in r.path
    )
    assert token not in json.dumps(status.to_dict())
    assert history.unrouted == []


def test_wire_cancel_posts_to_the_execution_service_once(wire_backend, history):
    history.add_run(KEY, ["Running"])
    handle = wire_backend.find_run(WIRE_COMPUTE, KEY, "nb/smoke/train.ipynb")
    wire_backend.cancel(handle)
    cancel = f"POST /execution/v1.0ws:/experiments/notebook-ci/runId/{KEY}/cancel"
    assert (cancel, 200) in _history_routes(history)
    assert wire_backend.status(handle).raw_status == "CancelRequested"
    history.runs[KEY].advance()
    assert wire_backend.status(handle).state == "canceled"
    wire_backend.cancel(handle)
    assert history.count(r"^POST .*/cancel$") == 1
    assert history.unrouted == []


def test_wire_a_storage_refusal_is_retried_by_the_sdk_then_named(
    wire_backend, history, monkeypatch, tmp_path
):
    """azureml-core's download_file retries any failure 5 times, sleeping 2, 4, 16 and 256 s
    (recorded here, not waited): a refused blob holds the monitor round for 4.6 minutes
    before the verdict stands with the role to grant."""
    import azureml._file_utils.file_utils as file_utils

    sleeps: list[float] = []
    monkeypatch.setattr(file_utils.time, "sleep", sleeps.append)
    run = history.add_run(KEY, ["Completed"])
    run.files["outputs/train.ipynb"] = json.dumps(fakes.notebook_json()).encode()
    history.blob_read_forbidden = True
    handle = wire_backend.find_run(WIRE_COMPUTE, KEY, "nb/smoke/train.ipynb")
    status = wire_backend.status(handle)
    assert (status.state, status.raw_status) == ("succeeded", "Completed")
    assert "'Storage Blob Data Reader' role on the workspace's storage account" in status.message
    assert sleeps == [2, 4, 16, 256]
    blob = f"GET /azureml/ExperimentRun/dcid.{KEY}/outputs/train.ipynb"
    assert _history_routes(history).count((blob, 403)) == 5
    # The monitor's fetch_output after status: the refusal is remembered, not waited out again.
    assert wire_backend.fetch_output(handle, tmp_path / "x.ipynb") is None
    assert _history_routes(history).count((blob, 403)) == 5 and len(sleeps) == 4


def test_wire_a_missing_package_is_read_from_the_runs_log(wire_backend, history):
    run = history.add_run(KEY, ["Failed"])
    run.error = "UserError: Execution failed. User process exited with code 1"
    run.files["user_logs/std_log.txt"] = HANDLER_IMPORT_FAILURE.encode()
    handle = wire_backend.find_run(WIRE_COMPUTE, KEY, "nb/smoke/train.ipynb")
    status = wire_backend.status(handle)
    assert status.state == "failed" and "lacks papermill" in status.message
    assert "user_logs/std_log.txt says \"No module named 'papermill'\"" in status.message
    log_blob = f"GET /azureml/ExperimentRun/dcid.{KEY}/user_logs/std_log.txt"
    assert (log_blob, 206) in _history_routes(history)


def test_wire_a_throttled_read_is_transient(wire_backend, history, monkeypatch):
    """A 429 from run history reaches the backend as the SDK's ServiceException after
    azureml-core's own retries (3, with its 32 s back-off doubling: recorded here, not
    waited): transient, so the monitor reports the status unavailable and the next round
    reads again."""
    import azureml._restclient.clientbase as clientbase
    from azureml._restclient.exceptions import ServiceException

    sleeps: list[float] = []
    history.add_run(KEY, ["Running"])
    handle = wire_backend.find_run(WIRE_COMPUTE, KEY, "nb/smoke/train.ipynb")
    history.fail_next(rf"^GET /history/v1.0ws:/experimentids/.*/runs/{KEY}$", 429, times=1000)
    monkeypatch.setattr(clientbase.time, "sleep", sleeps.append)
    with pytest.raises(ServiceException) as caught:
        wire_backend.status(handle)
    assert caught.value.status_code == 429
    assert sleeps == [32, 64, 128]  # one throttled read holds the monitor round 3.7 minutes
    assert history.count(rf"^GET /history/v1.0ws:/experimentids/.*/runs/{KEY}$") == 4
    history._faults.clear()
    assert wire_backend.status(handle).state == "running"


@pytest.mark.slow
def test_wire_papermills_notebook_with_only_allowed_errors_succeeds(
    wire_backend, history, tmp_path, executed
):
    """The notebook papermill executed on a real kernel, downloaded through the artifact
    service and blob storage of a run Azure ML reports Failed."""
    committed, output = executed["allowed"]
    run = history.add_run(KEY, ["Failed"])
    run.error = "UserError: User program failed with PapermillExecutionError"
    run.files["outputs/train.ipynb"] = output
    handle = wire_backend.find_run(WIRE_COMPUTE, KEY, "nb/smoke/train.ipynb")
    status = wire_backend.status(handle)
    assert (status.state, status.raw_status, status.error) == ("succeeded", "Failed", None)
    dest = wire_backend.fetch_output(handle, tmp_path / "train.ipynb")
    cells = json.loads(dest.read_text())["cells"]
    assert MARKER not in json.dumps(cells) and len(cells) == len(committed["cells"])
