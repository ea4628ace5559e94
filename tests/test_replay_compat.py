"""An orchestration started by an older version of the app finishes on this one.

tests/replay/before_typed_payloads.json is devhost's durable state of a real run, recorded
(tests/replay/capture.py) on the code before the activity payloads became typed models
(commit 83e7f33): three notebooks submitted to the fake backend, one monitor round done
(one succeeded, one failed), a timer pending for the third. Its history holds the activity
inputs and outputs in the shape that code wrote them. Here the current app resumes that
state on devhost: it must replay the recorded history without a non-determinism error,
feed the recorded shapes to today's activities and report the same run to the pipeline.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from devhost import Host
from devhost.store import Store
from notebookops.compute import registry
from tests.fake_backend import FakeBackend
from tests.fake_devops import FakeDevOps
from tests.flow_support import APP_ROOT
from tests.replay.capture import DEVOPS_MARK, ROOT_MARK, TABLES, settings

FIXTURE = Path(__file__).parent / "replay" / "before_typed_payloads.json"


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    raw = FIXTURE.read_text()
    with FakeDevOps(**_fake_devops_args(json.loads(raw))) as devops:
        fixture = json.loads(raw.replace(DEVOPS_MARK, devops.url).replace(ROOT_MARK, str(tmp_path)))
        for key, value in settings(tmp_path).items():
            monkeypatch.setenv(key, value)
        (tmp_path / "gitconfig").write_text("")
        monkeypatch.setitem(registry._factories, "fake", FakeBackend)
        FakeBackend.reset()
        FakeBackend.runs.update(fixture["fakeRuns"])
        _restore(tmp_path / "state", fixture["tables"])
        yield fixture, devops, tmp_path / "state"
    FakeBackend.reset()


def _fake_devops_args(fixture: dict) -> dict:
    return {"token": fixture["token"], **fixture["ids"]}


def _restore(state: Path, tables: dict[str, list[dict]]) -> None:
    Store(state).close()  # today's schema, then the recorded rows into it
    db = sqlite3.connect(state / "devhost.sqlite3")
    with db:
        for table in TABLES:
            for row in tables[table]:
                columns = ", ".join(row)
                marks = ", ".join("?" for _ in row)
                db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", list(row.values()))  # noqa: S608
    db.close()


def test_an_instance_recorded_before_typed_payloads_finishes_on_this_code(recorded):
    fixture, devops, state = recorded
    instance = fixture["instanceId"]
    recorded_events = [json.loads(r["event"]) for r in fixture["tables"]["history"]]
    with Host(APP_ROOT, state, clock="virtual") as host:
        status = host.wait_for(instance, 60)
        history = host.history(instance)
    assert status["runtimeStatus"] == "Completed", status.get("output")
    summary = status["output"]
    assert summary["instanceId"] == instance
    assert summary["result"] == "failed"
    assert summary["counts"] == {
        "total": 3,
        "succeeded": 2,
        "failed": 1,
        "timedOut": 0,
        "canceled": 0,
    }
    by_path = {n["path"]: n for n in summary["notebooks"]}
    assert [n["path"] for n in summary["notebooks"]] == [
        "nb/broken.ipynb",
        "nb/long.ipynb",
        "nb/quick.ipynb",
    ]
    assert by_path["nb/quick.ipynb"]["state"] == "succeeded"
    assert by_path["nb/long.ipynb"]["state"] == "succeeded"
    assert by_path["nb/broken.ipynb"]["state"] == "failed"
    assert by_path["nb/broken.ipynb"]["error"] == {
        "cellIndex": 1,
        "ename": "ValueError",
        "evalue": "fake failure",
        "traceback": "Traceback: fake",
    }
    for notebook in summary["notebooks"]:
        assert notebook["runId"] == f"{notebook['portalUrl'].rsplit('/', 1)[1]}"
        assert notebook["warnings"], notebook  # the recorded submits' unknown-parameter warnings
    # The recorded submits were replayed, not run again; the runs the old code created (in
    # the fake service's table) are the ones polled to their end.
    assert FakeBackend.submits == []
    assert FakeBackend.runs["nb-nb-long-a4099b2078260f948be9"]["state"] == "succeeded"
    # History kept its recorded prefix: replay reproduced every recorded decision.
    assert [e["EventType"] for e in history[: len(recorded_events)]] == [
        e["EventType"] for e in recorded_events
    ]
    # The pipeline hears the verdict once, and the live feed goes on (this fake DevOps is a
    # fresh one, so it no longer knows the recorded log id and refuses appends to it).
    assert [e["result"] for e in devops.task_completed_events()] == ["failed"]
    assert any("finished nb/long.ipynb: succeeded" in line for line in devops.feed_lines())
