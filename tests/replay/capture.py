"""Record a running orchestration's durable state as a replay fixture.

    .venv/bin/python -m tests.replay.capture tests/replay/NAME.json

Runs the real app on devhost (real clock) with the fake backend (tests/fake_backend.py) and
a fake Azure DevOps on loopback: three notebooks are submitted, the first monitor round sees
one succeed and one fail, and the orchestration waits on its timer for the third. The host
is stopped there, and every row of devhost's state (instances, history, inbox, work) is
written out with the fake service's run table, the temporary folder and the fake DevOps URL
replaced by placeholders, so tests/test_replay_compat.py can resume the instance with
whatever code is checked out then and check that it finishes.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT_MARK = "@ROOT@"
DEVOPS_MARK = "@DEVOPS@/"
TOKEN = "replay-fixture-pipeline-token"
SECRET_KEY = "replay-fixture-key-material"
IDS = {
    "project_id": "5b0c5ee1-0b3a-4b5e-9e07-6f1c1b9c0a11",
    "plan_id": "5b0c5ee1-0b3a-4b5e-9e07-6f1c1b9c0a12",
    "job_id": "5b0c5ee1-0b3a-4b5e-9e07-6f1c1b9c0a13",
    "timeline_id": "5b0c5ee1-0b3a-4b5e-9e07-6f1c1b9c0a14",
    "task_instance_id": "5b0c5ee1-0b3a-4b5e-9e07-6f1c1b9c0a15",
}
TABLES = ("instances", "history", "inbox", "work")


def settings(root: Path) -> dict[str, str]:
    """What tests/flow_support.flow_env sets, under ``root``."""
    return {
        "NOTEBOOKOPS_ALLOW_LOCAL_REPOS": "1",
        "NOTEBOOKOPS_SECRET_KEY": SECRET_KEY,
        "NOTEBOOKOPS_CHECKOUT_DIR": str(root / "checkouts"),
        "NOTEBOOKOPS_OUTPUT_DIR": str(root / "outputs"),
        "GIT_CONFIG_GLOBAL": str(root / "gitconfig"),
        "NOTEBOOKOPS_DEVOPS_RETRY_SECONDS": "0.01",
        "NOTEBOOKOPS_DEVOPS_TIMEOUT_SECONDS": "2",
    }


def _waiting_on_timer_after_a_monitor_round(history: list[dict[str, Any]]) -> bool:
    names = {e.get("EventId"): e.get("Name") for e in history if e.get("EventType") == 4}
    monitored = False
    for event in history:
        if event.get("EventType") == 5 and names.get(event.get("TaskScheduledId")) == (
            "ActivityMonitor"
        ):
            monitored = True
        if monitored and event.get("EventType") == 10:
            return True
    return False


def capture(out: Path) -> None:
    from devhost import Host
    from notebookops.compute import registry
    from tests.fake_backend import FakeBackend
    from tests.fake_devops import FakeDevOps
    from tests.flow_support import APP_ROOT, deliver, fake_notebook, message
    from tests.gitrepos import make_repo

    root = Path(tempfile.mkdtemp(prefix="nbops-replay-")).resolve()
    os.environ.update(settings(root))
    (root / "gitconfig").write_text("")
    registry._factories["fake"] = FakeBackend
    repo = make_repo(
        root / "repo",
        {
            "nb/quick.ipynb": fake_notebook(polls=1),
            "nb/broken.ipynb": fake_notebook(polls=1, outcome="failed"),
            "nb/long.ipynb": fake_notebook(polls=3),
        },
    )
    body = message(
        repo,
        ["nb/quick.ipynb", "nb/broken.ipynb", {"path": "nb/long.ipynb", "parameters": {"n": 3}}],
        compute={"backend": "fake", "target": "cpu"},
        parameters={"env": "ci"},
    )
    with FakeDevOps(token=TOKEN, **IDS) as devops:
        host = Host(APP_ROOT, root / "state", clock="real").start()
        try:
            instance = deliver(host, body, properties=devops.properties())
            deadline = time.monotonic() + 60
            while not _waiting_on_timer_after_a_monitor_round(host.history(instance)):
                if time.monotonic() > deadline:
                    raise SystemExit("the orchestration did not reach its first timer in 60 s")
                time.sleep(0.05)
        finally:
            host.stop()
        url = devops.url
    db = sqlite3.connect(root / "state" / "devhost.sqlite3")
    db.row_factory = sqlite3.Row
    tables = {t: [dict(r) for r in db.execute(f"SELECT * FROM {t}")] for t in TABLES}  # noqa: S608
    db.close()
    fixture = {
        "about": __doc__.strip().splitlines()[0],
        "instanceId": instance,
        "ids": IDS,
        "token": TOKEN,
        "secretKey": SECRET_KEY,
        "tables": tables,
        "fakeRuns": FakeBackend.runs,
    }
    text = json.dumps(fixture, indent=1, sort_keys=True)
    text = text.replace(url, DEVOPS_MARK).replace(str(root), ROOT_MARK)
    out.write_text(text + "\n")
    shutil.rmtree(root, ignore_errors=True)
    print(f"{out}: instance {instance}, {len(tables['history'])} history events")


if __name__ == "__main__":
    capture(Path(sys.argv[1]))
