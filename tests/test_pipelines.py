"""The example pipelines: valid Azure Pipelines YAML, and they say what the app relies on.

Validation uses the Azure Pipelines schema vendored by check-jsonschema (the one the VS Code
extension uses), run through check-jsonschema's own command line with its azure-pipelines data
transform, exactly as a pre-commit hook would. Nothing here talks to Azure DevOps.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from notebookops.request import parse_request

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "examples" / "pipelines"
VALIDATION = PIPELINES / "notebook-validation.yml"
DEPLOY = PIPELINES / "deploy-function-app.yml"

# Values a build would put in for the predefined variables the message body uses.
SAMPLE_VARIABLES = {
    "build.repository.uri": "https://dev.azure.com/fabrikam/ml/_git/notebooks",
    "build.sourcebranch": "refs/heads/main",
    "build.sourceversion": "0123456789abcdef0123456789abcdef01234567",
    "build.buildid": "20317",
}
_MACRO = re.compile(r"\$\(([A-Za-z0-9_.]+)\)")


def load(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text(encoding="utf-8"))


def schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.azure-pipelines",
            "--data-transform",
            "azure-pipelines",
            "--regex-variant",
            "nonunicode",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def steps(document: Any) -> list[dict[str, Any]]:
    """Every step of a pipeline, whether in jobs, stages or deployment strategies."""
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("steps"), list):
                found.extend(node["steps"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    return found


def task(document: Any, name: str) -> dict[str, Any]:
    (step,) = [s for s in steps(document) if s.get("task") == name]
    return step


@pytest.mark.parametrize("path", [VALIDATION, DEPLOY], ids=lambda p: p.name)
def test_pipeline_validates_against_the_azure_pipelines_schema(path: Path) -> None:
    result = schema_check(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_broken_pipeline(tmp_path: Path) -> None:
    # A misspelt input must fail, or the checks above prove nothing.
    broken = tmp_path / "broken.yml"
    broken.write_text(
        VALIDATION.read_text(encoding="utf-8").replace("waitForCompletion:", "waitForCompletio:"),
        encoding="utf-8",
    )
    assert schema_check(broken).returncode != 0


def test_validation_job_is_agentless_and_waits_for_the_callback() -> None:
    document = load(VALIDATION)
    (job,) = document["jobs"]
    assert job["pool"] == "server"
    publish = task(document, "PublishToAzureServiceBus@2")
    inputs = publish["inputs"]
    assert inputs["waitForCompletion"] is True
    assert inputs["useDataContractSerializer"] is False
    for required in ("azureSubscription", "serviceBusNamespace", "serviceBusQueueName"):
        assert inputs[required]
    # The token travels in the task's message properties; the body must never carry it.
    assert "accesstoken" not in inputs["messageBody"].lower()


def expand(body: str) -> str:
    unknown = {m for m in _MACRO.findall(body) if m.lower() not in SAMPLE_VARIABLES}
    assert not unknown, f"messageBody uses variables the test has no sample for: {unknown}"
    return _MACRO.sub(lambda m: SAMPLE_VARIABLES[m.group(1).lower()], body)


def test_message_body_is_a_valid_request_once_variables_are_expanded() -> None:
    document = load(VALIDATION)
    body = expand(task(document, "PublishToAzureServiceBus@2")["inputs"]["messageBody"])
    assert isinstance(json.loads(body), dict)
    properties = json.loads(
        (ROOT / "examples/messages/properties.example.json").read_text(encoding="utf-8")
    )

    request = parse_request(body.encode("utf-8"), properties=properties)

    assert request.repository_url == SAMPLE_VARIABLES["build.repository.uri"]
    assert request.ref == SAMPLE_VARIABLES["build.sourcebranch"]
    assert request.commit == SAMPLE_VARIABLES["build.sourceversion"]
    assert request.callback is not None
    assert request.callback.build_id == SAMPLE_VARIABLES["build.buildid"]
    assert request.callback.plan_url == properties["PlanUrl"]
    (job,) = document["jobs"]
    job_minutes = int(job["timeoutInMinutes"])
    # Long enough for the whole run plus reporting, short enough not to hide a lost callback.
    assert request.timeout_minutes < job_minutes <= request.timeout_minutes + 30


def test_deploy_pipeline_tests_packages_and_deploys_python_311() -> None:
    document = load(DEPLOY)
    versions = {
        s["inputs"]["versionSpec"] for s in steps(document) if s.get("task") == "UsePythonVersion@0"
    }
    variables = document["variables"]
    assert {v.replace("$(pythonVersion)", variables["pythonVersion"]) for v in versions} == {"3.11"}
    scripts = [s.get("script", "") for s in steps(document)]
    assert any(re.match(r"make test\b", s) for s in scripts)

    deploy = task(document, "AzureFunctionApp@2")["inputs"]
    assert deploy["runtimeStack"] == "PYTHON|3.11"
    assert deploy["appType"] == "functionAppLinux"
    published = task(document, "PublishPipelineArtifact@1")["inputs"]
    artifact = published["artifact"]
    package_name = published["targetPath"].rsplit("/", 1)[-1]
    assert deploy["package"] == f"$(Pipeline.Workspace)/{artifact}/{package_name}"

    stage_names = [stage["stage"] for stage in document["stages"]]
    assert stage_names == ["test", "package", "deploy"]
    deploy_stage = document["stages"][-1]
    assert "refs/heads/main" in deploy_stage["condition"]


def packaging_script() -> str:
    (step,) = [s for s in steps(load(DEPLOY)) if "bash" in s and ".funcignore" in s["bash"]]
    match = re.search(r"<<'PY'\n(.*?)\nPY\b", step["bash"], re.DOTALL)
    assert match, "the packaging step runs an inline Python script"
    return match.group(1)


def test_the_package_step_zips_the_app_without_what_funcignore_excludes(tmp_path: Path) -> None:
    archive = tmp_path / "app.zip"
    subprocess.run(
        [sys.executable, "-", str(archive)],
        input=packaging_script(),
        text=True,
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    names = zipfile.ZipFile(archive).namelist()
    for needed in (
        "function_app.py",
        "host.json",
        "requirements.txt",
        "notebookops/devops/client.py",
    ):
        assert needed in names
    for excluded in (".venv/", "tests/", "devhost/", "examples/", ".git/", "bench/"):
        assert not any(name.startswith(excluded) for name in names), excluded
    assert not any("__pycache__" in name for name in names)
    assert "local.settings.json" not in names
    assert "requirements-dev.txt" not in names
