"""Run the real function app through devhost in tests: env, repositories, delivery."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from devhost import Host
from notebookops.starter import instance_id_for
from tests.fake_backend import FakeBackend
from tests.gitrepos import file_url, make_repo, notebook

APP_ROOT = Path(__file__).resolve().parent.parent


def fake_notebook(polls: int = 1, outcome: str = "succeeded", **extra: Any) -> dict[str, Any]:
    nb = notebook("print('fake')")
    nb["metadata"]["fake"] = {"polls": polls, "outcome": outcome, **extra}
    return nb


@pytest.fixture
def flow_env(tmp_path, monkeypatch):
    """The settings `python -m notebookops run` uses, in per-test folders."""
    gitconfig = tmp_path / "gitconfig"
    gitconfig.write_text("")
    values = {
        "NOTEBOOKOPS_ALLOW_LOCAL_REPOS": "1",
        "NOTEBOOKOPS_ALLOW_LOCAL_BACKEND": "1",
        "NOTEBOOKOPS_SECRET_KEY": "test-key-material-for-sealing",
        "NOTEBOOKOPS_LOCAL_RUNS_DIR": str(tmp_path / "runs"),
        "NOTEBOOKOPS_CHECKOUT_DIR": str(tmp_path / "checkouts"),
        "NOTEBOOKOPS_OUTPUT_DIR": str(tmp_path / "outputs"),
        "GIT_CONFIG_GLOBAL": str(gitconfig),
        # The fake DevOps server answers at once; keep retries and timeouts short.
        "NOTEBOOKOPS_DEVOPS_RETRY_SECONDS": "0.01",
        "NOTEBOOKOPS_DEVOPS_TIMEOUT_SECONDS": "2",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    # Registered for this test only, so other tests see the real list of backends.
    from notebookops.compute import registry

    monkeypatch.setitem(registry._factories, "fake", FakeBackend)
    FakeBackend.reset()
    return tmp_path


def message(repo: Path, notebooks: list[Any], **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "repository": {"url": file_url(repo), "ref": "main"},
        "notebooks": notebooks,
    }
    body.update(fields)
    return body


def deliver(
    host: Host,
    body: dict[str, Any] | bytes,
    *,
    message_id: str = "msg-1",
    properties: dict[str, Any] | None = None,
) -> str:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    host.deliver_service_bus(
        "ServiceBusStarter", data, application_properties=properties, message_id=message_id
    )
    from notebookops.request import read_callback

    return instance_id_for(
        read_callback(properties, None, None) if properties else None, message_id
    )


def app_host(state: Path, clock: str = "virtual") -> Host:
    return Host(APP_ROOT, state, clock=clock)


__all__ = [
    "FakeBackend",
    "app_host",
    "deliver",
    "fake_notebook",
    "file_url",
    "flow_env",
    "make_repo",
    "message",
    "notebook",
    "os",
]
