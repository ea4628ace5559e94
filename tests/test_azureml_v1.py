"""The `azureml-v1` backend (azureml-core + azureml-contrib-notebook) on real SDK objects.

NotebookRunConfig, RunConfiguration, Environment, CondaDependencies, Workspace and the auth
objects are the real ones, built offline. The faked boundary is the backend's own service seam
`V1Service` (`Experiment.submit`, `Run.get`, `Environment.get`) and the `Run` objects they
return, replaced by tests.azureml_fakes.FakeV1Service: azureml-core's submit is not one HTTP
client but five (ARM, run history, execution, artifacts, a snapshot upload through
azure-storage-blob, each with its own `requests` session, retries and token refresh), so a
recorded HTTP layer for it would be larger than the backend it tests. The fake answers as the
service does where the backend depends on it: runs follow the documented v1 status sequence,
a duplicate run id and an environment named with a reserved prefix are refused with the
service's words, and `Experiment.submit` tags the run in a second call, as the SDK does.
"""

from __future__ import annotations

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


def test_a_failed_run_whose_output_cannot_be_read_keeps_its_verdict(
    backend, service, checkout, tmp_path
):
    service.next_script = ["Failed"]
    handle = backend.submit(_spec(checkout))
    run = service.runs[handle.run_id]
    run.files["outputs/train.ipynb"] = b"{}"

    def forbidden(name, output_file_path=None):
        raise ExperimentExecutionException(
            '{"status_code": 403, "error_details": {"error": '
            '{"message": "AuthorizationPermissionMismatch"}}}'
        )

    run.download_file = forbidden
    status = backend.status(handle)
    assert status.state == "failed" and "could not be read" in status.message
    assert backend.fetch_output(handle, tmp_path / "x.ipynb") is None
