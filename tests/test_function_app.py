"""The deployed app's shape: indexed functions, bindings and host.json, checked with the
editor JSON schemas by the shared tool, and start-up that imports no Azure ML SDK."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT.parent / "shared" / "tools" / "validate_function_app.py"


@pytest.mark.skipif(not TOOL.is_file(), reason="shared/tools is not beside this clone")
def test_function_app_validates_against_the_schemas():
    result = subprocess.run(
        [sys.executable, str(TOOL)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert "0 problem(s)" in result.stdout, result.stdout + result.stderr
    assert result.returncode == 0


def test_indexing_imports_no_azure_ml_sdk_papermill_or_git():
    # pydantic too: the message models load when a starter first reads a message.
    code = (
        "import sys, function_app\n"
        "heavy = [m for m in ('azure.ai.ml', 'azureml.core', 'papermill', 'git', 'nbclient', 'nbconvert', 'jinja2', 'pydantic')"
        " if m in sys.modules]\n"
        "print(len(function_app.app.get_functions()), heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "11 []"  # AzureMLEvents included
