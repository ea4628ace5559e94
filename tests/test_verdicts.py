"""The notebook's environment in the message, and errors people read on one line.

Real-kernel behaviour (kernel choice, tags, malformed notebooks next to good ones) is in
tests/test_verdicts_corpus.py; these are the rules around it."""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

from notebookops import policy
from notebookops.report import error_line, junit_xml, summary_table
from notebookops.request import inspect_message, parse_request

REPO = {"url": "https://dev.azure.com/o/p/_git/r"}
ROOT = Path(__file__).resolve().parent.parent


def errors_of(**fields):
    _, _, errors = inspect_message({"repository": REPO, "notebooks": ["a.ipynb"], **fields})
    return errors


def test_kernel_and_python_are_validated_fields_per_message_and_per_notebook():
    request = parse_request(
        {
            "repository": REPO,
            "notebooks": [
                "a.ipynb",
                {"path": "r/*.ipynb", "kernel": "ir"},
                {"path": "b.ipynb", "python": "/opt/envs/ml"},
            ],
            "compute": {"backend": "local", "kernel": "python3"},
        }
    )
    assert request.compute.kernel == "python3"
    as_dict = request.to_dict()
    assert as_dict["compute"]["kernel"] == "python3"
    assert as_dict["notebooks"][1]["kernel"] == "ir"
    assert as_dict["notebooks"][2]["python"] == "/opt/envs/ml"
    assert parse_request(as_dict).to_dict() == as_dict  # survives the orchestration input


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"compute": {"kernel": "py 3"}}, "compute.kernel: must be a Jupyter kernelspec name"),
        ({"compute": {"kernel": 3}}, "compute.kernel: must be a Jupyter kernelspec name"),
        ({"compute": {"python": "venv"}}, "compute.python: must be the absolute path"),
        (
            {"compute": {"kernel": "python3", "python": "/v"}},
            "compute.python: cannot be combined with kernel",
        ),
        (
            {"compute": {"backend": "azureml", "python": "/v"}},
            "compute.python: applies to the local backend only; on azureml",
        ),
        (
            {"compute": {"kernal": "python3"}},
            'compute.kernal: unknown field (did you mean "kernel"?)',
        ),
    ],
)
def test_bad_environment_choices_name_the_field_and_value(fields, expected):
    errors = errors_of(**fields)
    assert any(e.startswith(expected) for e in errors), errors


def test_a_notebook_entry_choice_replaces_the_messages():
    request = parse_request(
        {
            "repository": REPO,
            "notebooks": ["a.ipynb", {"path": "b.ipynb", "python": "/opt/envs/ml"}],
            "compute": {"backend": "local", "kernel": "python3"},
        }
    ).to_dict()
    state = {"request": request}
    first = policy.compute_for(state, {"entryIndex": 0})
    second = policy.compute_for(state, {"entryIndex": 1})
    assert (first.get("kernel"), first.get("python")) == ("python3", None)
    assert (second.get("kernel"), second.get("python")) == (None, "/opt/envs/ml")
    assert request["compute"]["kernel"] == "python3"  # the message itself is not changed


MULTI = "first line of the problem\n  detail one\n  detail two"


def _summary():
    return {
        "instanceId": "i",
        "result": "failed",
        "commit": None,
        "startedAt": "2026-01-01T00:00:00Z",
        "counts": {"total": 1, "succeeded": 0, "failed": 1, "timedOut": 0, "canceled": 0},
        "errors": [],
        "notebooks": [
            {
                "path": "nb/x.ipynb",
                "state": "failed",
                "allowFailure": False,
                "durationSeconds": 1.0,
                "error": {
                    "cellIndex": 2,
                    "ename": "ValueError",
                    "evalue": MULTI,
                    "traceback": "tb",
                },
                "message": None,
                "outputNotebook": None,
            }
        ],
    }


def test_multi_line_error_values_are_one_line_in_the_table_and_junit_message():
    summary = _summary()
    assert error_line(summary["notebooks"][0]) == (
        "ValueError: first line of the problem … (cell 2)"
    )
    table = summary_table(summary).splitlines()
    assert len(table) == 4  # header, rule, one row, result
    assert "ValueError: first line of the problem … (cell 2)" in table[2]
    failure = ET.fromstring(junit_xml(summary)).find(".//failure")
    assert failure.get("message") == "ValueError: first line of the problem … (cell 2)"
    assert summary["notebooks"][0]["error"]["evalue"] == MULTI  # the full text stays


# -- the local backend refuses an environment it does not have, per notebook, before queueing


@pytest.fixture
def local(tmp_path, monkeypatch):
    from notebookops.compute.local import LocalBackend
    from notebookops.compute.local_state import RunFiles

    monkeypatch.setenv("NOTEBOOKOPS_ALLOW_LOCAL_BACKEND", "1")
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, checkout / "a.ipynb")
    backend = LocalBackend(runs_dir=tmp_path / "runs", workers=1)
    yield backend, checkout
    for run_dir in (tmp_path / "runs").glob("nb-*"):
        RunFiles(run_dir).kill_kernel_group()
        RunFiles(run_dir).kill_runner_group()


def _verdict(backend, checkout, compute):
    from notebookops.compute.base import RunSpec, run_key

    spec = RunSpec(
        run_key=run_key("i", f"a.ipynb-{sorted(compute.items())}"),
        instance_id="i",
        notebook="a.ipynb",
        checkout=str(checkout),
        commit="0" * 40,
        compute={"backend": "local", **compute},
    )
    handle = backend.submit(spec)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = backend.status(handle)
        if status.terminal:
            return status
        time.sleep(0.05)
    raise AssertionError("the run did not end")


@pytest.mark.slow
def test_missing_kernels_and_unusable_environments_fail_that_notebook_with_how_to_fix(
    local, tmp_path
):
    backend, checkout = local
    missing = _verdict(backend, checkout, {"kernel": "julia-1.9"})
    assert (missing.state, missing.error.ename, missing.error.cell_index) == (
        "failed",
        "NoSuchKernel",
        None,
    )
    assert "No such kernel named 'julia-1.9' (compute.kernel)" in missing.message
    assert "installed kernels: python3" in missing.message
    assert missing.started_at is None  # it never held a worker

    nowhere = _verdict(backend, checkout, {"python": str(tmp_path / "no-such-env")})
    assert "is not a Python executable or a virtual environment folder" in nowhere.message

    bare = tmp_path / "bare-env"  # a venv without ipykernel
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    without = _verdict(backend, checkout, {"python": str(bare)})
    assert without.error.ename == "NoSuchKernel"
    assert "ipykernel is not installed there" in without.message
    assert f"{bare}/bin/python -m pip install ipykernel" in without.message


# -- the Azure ML entry script gives a tagged cell's error the local backend's verdict --------


@pytest.mark.slow
def test_the_azureml_entry_script_allows_raises_exception_cells_like_the_local_backend(tmp_path):
    """The shipped entry script, run as the job runs it (its own process, a real kernel)."""
    from notebookops.compute.papermill_entry import encode_job

    def notebook(*cells):
        nb = nbformat.v4.new_notebook(cells=list(cells))
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "P", "language": "python"}
        return nb

    expected = nbformat.v4.new_code_cell("1 / 0", metadata={"tags": ["raises-exception"]})
    nbformat.write(
        notebook(expected, nbformat.v4.new_code_cell("print('on')")), tmp_path / "ok.ipynb"
    )
    nbformat.write(
        notebook(expected, nbformat.v4.new_code_cell("undefined_name")), tmp_path / "bad.ipynb"
    )
    entry = ROOT / "notebookops" / "compute" / "papermill_entry.py"

    def job(name):
        value = encode_job({"notebook": name, "output": name, "parameters": {}})
        return subprocess.run(
            [sys.executable, str(entry), "--output-dir", str(tmp_path / "out"), "--job", value],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )

    ok = job("ok.ipynb")
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    executed = nbformat.read(tmp_path / "out" / "ok.ipynb", as_version=4)
    assert [c.source for c in executed.cells] == ["1 / 0", "print('on')"]  # no red markers
    assert executed.cells[1].outputs[0]["text"] == "on\n"
    bad = job("bad.ipynb")
    assert bad.returncode == 1
    assert "notebook failed: NameError: name 'undefined_name' is not defined" in bad.stdout
