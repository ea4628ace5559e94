"""devhost hosting small apps written the way the Durable Functions v2 samples are written
(module-level `myApp`, blueprints, HTTP starters returning create_check_status_response),
driven over real HTTP on loopback through the unmodified SDK."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from devhost import AppIndexError, Host
from devhost.events import EXECUTION_STARTED
from tests.devhost_support import APPS, follow_status, http

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_env():
    """local.settings.json Values go into os.environ; put the environment back afterwards."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# -- 1. a FunctionRegister of any name ------------------------------------------------------


def test_app_named_myApp_with_a_blueprint_is_hosted_over_http(tmp_path):
    with Host(APPS / "any_name", tmp_path / "state") as host:
        code, body, headers = http(
            "POST", f"{host.base_url}/api/orchestrators/greet_cities", ["Oslo", "Lima"]
        )
        assert code == 202 and headers["Location"] == body["statusQueryGetUri"]
        status = follow_status(body["statusQueryGetUri"])
    assert status["runtimeStatus"] == "Completed"
    assert status["output"] == ["Hello Oslo!", "Hello Lima!"]


def test_two_function_apps_are_refused_naming_both(tmp_path):
    with pytest.raises(AppIndexError) as err:
        Host(APPS / "two_apps", tmp_path).start()
    message = str(err.value)
    assert "'app' (FunctionApp)" in message and "'myApp' (DFApp)" in message


def test_cli_serves_an_app_named_myApp_and_refuses_two(tmp_path):
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "devhost",
            "serve",
            "--app",
            str(APPS / "two_apps"),
            "--state",
            str(tmp_path / "s1"),
            "--port",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "'app'" in refused.stderr and "'myApp'" in refused.stderr
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devhost",
            "serve",
            "--app",
            str(APPS / "any_name"),
            "--state",
            str(tmp_path / "s2"),
            "--port",
            "0",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("devhost listening on "), (line, server.stderr.read())
        base = line.split()[-1]
        code, body, _ = http("POST", f"{base}/api/orchestrators/greet_cities", ["Rome"])
        assert code == 202
        assert follow_status(body["statusQueryGetUri"])["output"] == ["Hello Rome!"]
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stdout.close()
        server.stderr.close()


def _devhost_imports() -> dict[str, set[str]]:
    """Which devhost modules each devhost module imports, lazily or not (from the source)."""
    import ast

    package = ROOT / "devhost"
    names = {p.stem for p in package.glob("*.py")} - {"__init__", "__main__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        tree = ast.parse((package / f"{name}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("devhost."):
                found.add(node.module.split(".")[1])
        graph[name] = found & names
    return graph


def test_devhost_modules_import_each_other_without_a_cycle():
    graph = _devhost_imports()
    assert "engine" in graph["http"] and "http" not in graph["engine"]

    def reach(start: str, seen: set[str]) -> set[str]:
        for nxt in graph[start] - seen:
            seen.add(nxt)
            reach(nxt, seen)
        return seen

    cycles = [name for name in graph if name in reach(name, set())]
    assert cycles == [], f"import cycles through {cycles}: {graph}"


# -- 2. orchestration versions ----------------------------------------------------------------


def _run_versioned(host, start_url: str) -> tuple[dict, str]:
    code, body, _ = http("POST", start_url)
    assert code == 202, body
    follow_status(
        body["statusQueryGetUri"],
        until=lambda s: s.get("customStatus") == "Waiting for Continue event...",
    )
    event_url = body["sendEventPostUri"].replace("{eventName}", "Continue")
    assert http("POST", event_url, {"go": True})[0] == 202
    return follow_status(body["statusQueryGetUri"]), body["id"]


def test_version_from_the_query_string_reaches_context_version_and_survives_continue_as_new(
    tmp_path,
):
    with Host(APPS / "versioning", tmp_path / "state") as host:
        status, instance = _run_versioned(
            host, f"{host.base_url}/api/orchestrators/versioned?version=2.0"
        )
        started = [e for e in host.history(instance) if e["EventType"] == EXECUTION_STARTED]
    assert status["output"] == {
        "version": "2.0",
        "first": "Hello from B!",
        "second": "Hello from B!",
    }
    # The second generation's ExecutionStarted still carries the version.
    assert [e["Version"] for e in started] == ["2.0"] and started[0]["Generation"] == 1


def test_default_version_from_host_json_applies_and_old_instances_keep_theirs(tmp_path):
    app = tmp_path / "app"
    shutil.copytree(APPS / "versioning", app)
    state = tmp_path / "state"
    with Host(app, state) as host:
        _, old, _ = http("POST", f"{host.base_url}/api/orchestrators/versioned")
        follow_status(old["statusQueryGetUri"], until=lambda s: s.get("customStatus"))
    # A deployment with a new defaultVersion while the first instance waits for its event.
    host_json = json.loads((app / "host.json").read_text())
    host_json["extensions"]["durableTask"]["defaultVersion"] = "2.0"
    (app / "host.json").write_text(json.dumps(host_json))
    with Host(app, state) as host:
        new = host.start_new("versioned")
        durable = f"{host.base_url}/runtime/webhooks/durabletask"
        code, direct, _ = http("POST", f"{durable}/orchestrators/versioned?version=9.9")
        assert code == 202
        explicit = host.start_new("versioned", version="3.0")
        for instance in (old["id"], new, direct["id"], explicit):
            _wait_custom_status(host, instance)
            host.raise_event(instance, "Continue", "null")
        outputs = {
            i: host.wait_for(i, 30)["output"] for i in (old["id"], new, direct["id"], explicit)
        }
    assert outputs[old["id"]] == {
        "version": "1.0",
        "first": "Hello from A!",
        "second": "Hello from A!",
    }
    assert outputs[new]["version"] == "2.0" and outputs[new]["first"] == "Hello from B!"
    assert outputs[direct["id"]]["version"] == "9.9"
    assert outputs[explicit]["version"] == "3.0"


def _wait_custom_status(host, instance, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while not (host.get_status(instance) or {}).get("customStatus"):
        assert time.monotonic() < deadline, host.get_status(instance)
        time.sleep(0.02)


def test_state_file_of_format_1_is_upgraded_and_its_instances_go_on(tmp_path):
    state = tmp_path / "state"
    with Host(APPS / "versioning", state, clock="virtual") as host:
        instance = host.start_new("versioned")
        _wait_custom_status(host, instance)
    db = sqlite3.connect(state / "devhost.sqlite3")
    # What format 1 lacked.
    for column in ("version", "parent_execution_id", "parent_task_id", "parent_retry"):
        db.execute(f"ALTER TABLE instances DROP COLUMN {column}")
    db.execute("UPDATE meta SET value='1' WHERE key='format'")
    db.commit()
    db.close()
    with Host(APPS / "versioning", state, clock="virtual") as host:
        host.raise_event(instance, "Continue", "null")
        status = host.wait_for(instance, 30)
    # The instance started as 1.0 (its ExecutionStarted says so) and finishes on that branch;
    # only the column was missing, so the next generation starts without a stored version.
    assert status["output"]["first"] == "Hello from A!"
    db = sqlite3.connect(state / "devhost.sqlite3")
    assert db.execute("SELECT value FROM meta WHERE key='format'").fetchone()[0] == "4"
    db.close()


# -- 4. %SETTING% in host.json ------------------------------------------------------------------


def test_hub_name_and_default_version_come_from_app_settings(tmp_path, clean_env, monkeypatch):
    monkeypatch.delenv("TASKHUB_NAME", raising=False)
    monkeypatch.setenv("ORCHESTRATION_VERSION", "4.2")
    with Host(APPS / "hub_setting", tmp_path / "state") as host:
        code, body, _ = http("POST", f"{host.base_url}/api/orchestrators/report_version")
        assert code == 202
        status = follow_status(body["statusQueryGetUri"])
        binding = json.loads(host.client_binding())
    assert status["output"] == "4.2"
    assert binding["taskHubName"] == "LocalSettingsHub"
    links = [v for k, v in body.items() if k.endswith("Uri")]
    assert links and all("taskHub=LocalSettingsHub" in link for link in links)
    assert not any("%" in link for link in links)


def test_the_environment_wins_over_local_settings(tmp_path, clean_env, monkeypatch):
    monkeypatch.setenv("TASKHUB_NAME", "FromEnvironment")
    monkeypatch.setenv("ORCHESTRATION_VERSION", "1")
    with Host(APPS / "hub_setting", tmp_path / "state") as host:
        assert json.loads(host.client_binding())["taskHubName"] == "FromEnvironment"


def test_a_missing_app_setting_is_named_with_its_host_json_key(tmp_path, clean_env, monkeypatch):
    monkeypatch.delenv("ORCHESTRATION_VERSION", raising=False)
    with pytest.raises(AppIndexError) as err:
        Host(APPS / "hub_setting", tmp_path / "state").start()
    message = str(err.value)
    assert "extensions.durableTask.defaultVersion" in message
    assert "'ORCHESTRATION_VERSION'" in message and "host.json" in message


# -- 3. unsupported features say what they are --------------------------------------------------


@pytest.fixture(scope="module")
def unsupported(tmp_path_factory):
    with Host(APPS / "unsupported", tmp_path_factory.mktemp("state")) as host:
        yield host


def test_entity_endpoints_answer_501_naming_entities(unsupported):
    durable = f"{unsupported.base_url}/runtime/webhooks/durabletask"
    for method, path in (("GET", "entities/Counter/k1"), ("POST", "entities/Counter/k1?op=add")):
        code, body, _ = http(method, f"{durable}/{path}", 1 if method == "POST" else None)
        assert code == 501
        assert "durable entities" in body["Message"]
    # Through the SDK: an error, not "the entity does not exist" (which a 404 would mean).
    code, text, _ = http("GET", f"{unsupported.base_url}/api/entity/k1")
    assert code == 502 and "unexpected status code 501" in text


def test_suspend_resume_rewind_restart_answer_501(unsupported):
    instance = unsupported.start_new("child", "x")
    unsupported.wait_for(instance, 30)
    base = f"{unsupported.base_url}/runtime/webhooks/durabletask/instances/{instance}"
    for action, feature in (
        ("suspend", "suspending"),
        ("resume", "resuming"),
        ("rewind", "rewinding"),
        ("restart", "restarting"),
    ):
        code, body, _ = http("POST", f"{base}/{action}?reason=x")
        assert code == 501 and feature in body["Message"], (action, body)


def test_orchestrators_using_unsupported_actions_fail_saying_so(unsupported):
    parent = unsupported.wait_for(unsupported.start_new("parent"), 30)
    entity = unsupported.wait_for(unsupported.start_new("uses_entity"), 30)
    assert parent["runtimeStatus"] == "Failed"
    assert "devhost does not support call_http" in parent["output"]
    assert entity["runtimeStatus"] == "Failed"
    assert "devhost does not support entities" in entity["output"]


# -- 5. historyEvents and HTTP function failures ---------------------------------------------------


def test_history_events_have_the_documented_fields(tmp_path):
    with Host(APPS / "any_name", tmp_path / "state", clock="virtual") as host:
        instance = host.start_new("greet_cities", ["Tokyo", "Seattle"])
        host.wait_for(instance, 30)
        url = (
            f"{host.base_url}/runtime/webhooks/durabletask/instances/{instance}"
            "?showHistory=true&showHistoryOutput=true"
        )
        code, status, _ = http("GET", url)
        _, quiet, _ = http("GET", url.replace("&showHistoryOutput=true", ""))
    assert code == 200
    events = status["historyEvents"]
    assert [e["EventType"] for e in events] == [
        "ExecutionStarted",
        "TaskCompleted",
        "TaskCompleted",
        "ExecutionCompleted",
    ]
    assert events[0]["FunctionName"] == "greet_cities"
    first = events[1]
    assert first["FunctionName"] == "say_hello"
    assert first["Result"] == "Hello Tokyo!"  # the value, not JSON text
    assert first["ScheduledTime"] <= first["Timestamp"]
    assert events[-1]["OrchestrationStatus"] == "Completed"
    assert events[-1]["Result"] == ["Hello Tokyo!", "Hello Seattle!"]
    assert all("Result" not in e for e in quiet["historyEvents"])


def test_http_function_exception_text_is_in_the_500_body(tmp_path):
    with Host(APPS / "any_name", tmp_path / "state") as host:
        code, body, _ = http("GET", f"{host.base_url}/api/explode?widget=w7")
    assert code == 500
    assert "ValueError: the widget w7 is on fire" in body["error"]
    assert body["function"] == "explode"
