"""The activity payloads (notebookops.payloads) read what the orchestrator wrote, and write it
back unchanged.

The recorded history (tests/replay/before_typed_payloads.json, written by the code before
these declarations existed) holds real activity inputs and outputs: every one must read into
its declaration and come back out as the same JSON, or durable state written by one version
would change meaning in the next.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from notebookops import payloads
from notebookops.compute.base import RunError, RunHandle, RunSpec, RunStatus

FIXTURE = Path(__file__).parent / "replay" / "before_typed_payloads.json"
ROOT = Path(__file__).resolve().parent.parent

INPUTS = {
    "ActivityClone": payloads.CloneInput,
    "ActivitySubmit": payloads.SubmitInput,
    "ActivityMonitor": payloads.MonitorInput,
    "ActivityReport": payloads.ReportInput,
}
OUTPUTS = {
    "ActivityClone": payloads.CloneOutput,
    "ActivitySubmit": payloads.SubmitOutput,
    "ActivityMonitor": payloads.MonitorOutput,
}
REPORT_OUTPUTS = {
    "started": payloads.Started,
    "publish": payloads.Published,
    "deliver": payloads.Delivery,
}


def recorded_calls() -> list[tuple[str, dict, dict]]:
    """(activity, input, output) of every completed activity in the recorded history."""
    events = [json.loads(r["event"]) for r in json.loads(FIXTURE.read_text())["tables"]["history"]]
    scheduled = {e["EventId"]: e for e in events if e["EventType"] == 4}
    calls = []
    for event in events:
        if event["EventType"] == 5:
            task = scheduled[event["TaskScheduledId"]]
            calls.append((task["Name"], json.loads(task["Input"]), json.loads(event["Result"])))
    return calls


def test_the_recording_covers_every_activity() -> None:
    assert {name for name, _, _ in recorded_calls()} == set(INPUTS)


@pytest.mark.parametrize(
    ("name", "given", "answer"), recorded_calls(), ids=[c[0] for c in recorded_calls()]
)
def test_recorded_payloads_read_and_write_back_the_same_json(name, given, answer) -> None:
    job = INPUTS[name].from_dict(given)
    for key, value in job.to_dict().items():
        # Inputs: every key the orchestrator sent comes back as it was; the others are defaults.
        if key in given:
            assert value == given[key], key
    assert set(given) <= set(job.to_dict())
    output = REPORT_OUTPUTS[given["phase"]] if name == "ActivityReport" else OUTPUTS[name]
    assert _as_recorded(output.from_dict(answer).to_dict(), answer) == answer


# What a newer declaration may write differently from the recorded JSON and still mean the
# same to the orchestrator: a field added since, at its default (PollPolicy's
# pushMaxIntervalSeconds), or a null the old code wrote where an absent key now says the same
# (the monitor's executionSeconds for a notebook without papermill timing).
_DEFAULTS = (None, 0, 0.0, False, [], {})


def _as_recorded(written: object, recorded: object) -> object:
    if isinstance(written, dict) and isinstance(recorded, dict):
        for key in set(written) - set(recorded):
            assert written[key] in _DEFAULTS, f"{key}: {written[key]!r} was not recorded"
        for key in set(recorded) - set(written):
            assert recorded[key] is None, f"{key}: {recorded[key]!r} was not written back"
        return {
            key: _as_recorded(written[key], value) if key in written else None
            for key, value in recorded.items()
        }
    if isinstance(written, list) and isinstance(recorded, list) and len(written) == len(recorded):
        return [_as_recorded(w, r) for w, r in zip(written, recorded, strict=True)]
    return written


def test_contract_types_read_the_recorded_handles_and_errors() -> None:
    _, _, monitored = next(c for c in recorded_calls() if c[0] == "ActivityMonitor")
    failed = next(r for r in monitored["runs"] if r["state"] == "failed")
    assert RunError.from_dict(failed["error"]) == RunError(
        1, "ValueError", "fake failure", "Traceback: fake"
    )
    _, _, submitted = next(c for c in recorded_calls() if c[0] == "ActivitySubmit")
    handle = RunHandle.from_dict(submitted["handle"])
    assert handle.backend == "fake" and handle.to_dict() == submitted["handle"]


def test_a_bad_payload_names_every_field_and_value() -> None:
    with pytest.raises(ValueError) as caught:
        payloads.MonitorInput.from_dict(
            {
                "instanceId": "i",
                "runs": [{"path": "a.ipynb", "handle": {"backend": "local", "runId": 7}}],
                "cancel": [{"path": "b.ipynb", "handle": {"backend": "x", "runId": "r"}}],
                "waitSeconds": True,
            }
        )
    text = str(caught.value)
    assert text.startswith("MonitorInput: ")
    assert "field 'runs.0.handle.runId' has invalid value 7" in text
    assert "missing field 'cancel.0.state'" in text
    assert "missing field 'cancel.0.message'" in text
    assert "field 'waitSeconds' has invalid value True" in text
    with pytest.raises(ValueError, match=r"ReportInput: phase 'deliver' needs field 'result'"):
        payloads.ReportInput.from_dict({"phase": "deliver"})
    with pytest.raises(ValueError, match=r"field 'phase' has invalid value 'finish'"):
        payloads.ReportInput.from_dict({"phase": "finish"})


def test_fields_that_may_be_absent_stay_absent_and_contract_nulls_stay_null() -> None:
    seen = payloads.Observation(path="a.ipynb", state="running")
    assert seen.to_dict() == {
        "path": "a.ipynb",
        "state": "running",
        "message": None,
        "error": None,
        "startedAt": None,
    }
    assert payloads.Refusal(error="no such target").to_dict() == {
        "ok": False,
        "error": "no such target",
    }
    spec = RunSpec("k", "i", "n.ipynb", "/c", "abc")
    assert spec.to_dict()["timeoutSeconds"] is None  # the backend contract keeps its nulls
    status = RunStatus("failed", "Failed", RunError(None, "E", "v"))
    assert RunStatus.from_dict(json.loads(json.dumps(status.to_dict()))) == status


def test_declarations_import_without_pydantic() -> None:
    """Importing the declarations (function_app, every local runner process) loads no
    pydantic; the first from_dict does."""
    code = (
        "import sys, function_app, notebookops.payloads, notebookops.compute.local_runner\n"
        "assert 'pydantic' not in sys.modules, 'pydantic imported'\n"
        "from notebookops.payloads import Repository\n"
        "Repository.from_dict({'url': 'u'})\n"
        "assert 'pydantic' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
