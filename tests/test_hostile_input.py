"""Hostile input: a token in the repository URL goes nowhere, and mutated bodies thrown at
the HTTP starter (real HTTP on loopback, the real app on devhost) and at `validate` only
ever get 202/400 or exit 0/2, never a 5xx or a traceback.

The fuzz tests run derandomized when CI is set, so CI sees the same examples every time.
No example can reach a network: git is given a config that rewrites every remote URL to a
missing local path, no callback values are ever sent, and the local backend is off.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notebookops.cli import main
from tests.devhost_support import http
from tests.fake_devops import FakeDevOps
from tests.flow_support import app_host, deliver

PAT = "patQ7wXyZ0123456789abcdefTOKEN"
VALID = {
    "repository": {"url": "https://dev.azure.com/org/proj/_git/repo", "ref": "main"},
    "notebooks": ["nb/a.ipynb", {"path": "nb/b.ipynb", "parameters": {"alpha": 1}}],
    "compute": {"backend": "azureml", "target": "cpu-cluster"},
    "timeoutMinutes": 30,
    "maxParallel": 4,
}
FUZZ = settings(
    derandomize=bool(os.environ.get("CI")),
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _everything_under(folder: Path) -> str:
    return "\n".join(
        p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file()
    )


def test_a_token_in_the_repository_url_is_in_no_output_log_state_or_status(flow_env, caplog):
    """The token never reaches the durable state (SQLite), the status API, the run view, the
    pipeline's log, feed and TaskCompleted, or a log line; the pipeline is told `failed`."""
    url = f"https://{PAT}@dev.azure.com/org/proj/_git/repo"
    body = {"repository": {"url": url}, "notebooks": ["nb/a.ipynb"]}
    state = flow_env / "state"
    with FakeDevOps() as devops, caplog.at_level(logging.DEBUG), app_host(state) as host:
        instance = deliver(host, body, properties=devops.properties())
        status = host.wait_for(instance, 60)
        full = host.get_status(instance, show_history=True, show_history_output=True)
        view = http("GET", f"{host.base_url}/api/runs/{instance}")
        refused = http("POST", f"{host.base_url}/api/runs", body)
        durable = http(
            "GET",
            f"{host.base_url}/runtime/webhooks/durabletask/instances/{instance}"
            "?showHistory=true&showHistoryOutput=true&showInput=true",
        )
        pipeline = [
            "\n".join(devops.feed_lines()),
            devops.log_text(),
            json.dumps(devops.task_completed_events()),
        ]
    assert status["output"]["result"] == "failed"
    assert [e["result"] for e in devops.task_completed_events()] == ["failed"]
    assert "https://***@dev.azure.com/org/proj/_git/repo" in json.dumps(status["output"])
    assert refused[0] == 400
    seen = [
        json.dumps(status),
        json.dumps(full),
        json.dumps(view[1]),
        json.dumps(refused[1]),
        json.dumps(durable[1]),
        caplog.text,
        _everything_under(state),
        *pipeline,
    ]
    for text in seen:
        for form in (PAT, quote(PAT), PAT[:12]):
            assert form not in text


# --- fuzzing --------------------------------------------------------------------------------

_numbers = st.one_of(
    st.integers(min_value=-(10**400), max_value=10**400),
    st.sampled_from([0, -0.0, 1e308, 5e-324, 10080, 10081, 500, 501]),
    st.floats(allow_nan=False, allow_infinity=False),
)
_urls = st.builds(
    lambda scheme, user, host, port, path: f"{scheme}{user}{host}{port}{path}",
    st.sampled_from(["https://", "ssh://", "http://", "file://", "", "git@", "ext::", "-"]),
    st.sampled_from(["", "git@", f"{PAT}@", "u:p@", "%2d@", "-o@"]),
    st.sampled_from(["dev.azure.com", "-oProxyCommand=x", "[::1]", "[::1", "h%0a", "", "a..b"]),
    st.sampled_from(["", ":22", ":0", ":99999", ":-1", ":x", ":" + "9" * 400]),
    st.sampled_from(["/org/r", "/-r", "", ":path", "/a b", "/\x00", "/\u202e", "/..//x"]),
)
_leaves = st.one_of(
    st.none(),
    st.booleans(),
    _numbers,
    st.text(max_size=30),
    _urls,
    st.sampled_from(["nb/a.ipynb", "../x.ipynb", "-x.ipynb", "/abs.ipynb", "a\\b.ipynb"]),
)
_json = st.recursive(
    _leaves,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
_paths = st.sampled_from(
    [
        ("repository",),
        ("repository", "url"),
        ("repository", "ref"),
        ("repository", "commit"),
        ("notebooks",),
        ("notebooks", 0),
        ("notebooks", 1, "timeoutMinutes"),
        ("notebooks", 1, "parameters"),
        ("notebooks", 1, "allowFailure"),
        ("parameters",),
        ("compute",),
        ("compute", "backend"),
        ("compute", "workspace"),
        ("compute", "sourceDirectory"),
        ("timeoutMinutes",),
        ("maxParallel",),
        ("failFast",),
        ("surprise",),
    ]
)


def _mutated(mutations: list[tuple[tuple, object]]) -> dict:
    body = json.loads(json.dumps(VALID))
    for path, value in mutations:
        target = body
        for key in path[:-1]:
            if isinstance(target, dict):
                target = target.setdefault(key, {})
            elif isinstance(target, list) and isinstance(key, int) and key < len(target):
                target = target[key]
            else:
                break
        else:
            if isinstance(target, dict) or (
                isinstance(target, list) and isinstance(path[-1], int) and path[-1] < len(target)
            ):
                target[path[-1]] = value
    body.pop("devops", None)  # callback values would send the run's report to their host
    return body


def _encode(body: dict) -> bytes:
    # Python's json writes huge ints and inf as a client could (Infinity is invalid JSON).
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


_bodies = st.one_of(
    st.lists(st.tuples(_paths, _json), min_size=1, max_size=4).map(_mutated).map(_encode),
    st.tuples(st.binary(max_size=40), st.integers(min_value=0, max_value=200)).map(
        lambda cut: _encode(VALID)[: cut[1]] + cut[0] + _encode(VALID)[cut[1] :]
    ),
)


@pytest.fixture
def offline_git(flow_env, monkeypatch):
    """Every git remote rewritten to a missing local path: a mutated body that happens to be
    valid starts a run whose clone fails at once, without leaving this machine."""
    gitconfig = flow_env / "gitconfig"
    rewrite = "\n".join(
        f'[url "/nonexistent-fuzz-remote/"]\n\tinsteadOf = {prefix}'
        for prefix in ("https://", "http://", "ssh://", "git@", "git://")
    )
    gitconfig.write_text(rewrite + "\n[http]\n\tproxy = http://127.0.0.1:9\n")
    monkeypatch.setenv("GIT_SSH_COMMAND", "false")
    monkeypatch.delenv("NOTEBOOKOPS_ALLOW_LOCAL_REPOS")
    monkeypatch.delenv("NOTEBOOKOPS_ALLOW_LOCAL_BACKEND")
    return flow_env


@pytest.mark.slow
def test_fuzzed_bodies_get_202_or_400_from_the_http_starter(offline_git):
    answers: dict[int, int] = {}
    with app_host(offline_git / "state") as host:

        @FUZZ
        @given(raw=_bodies)
        def post(raw: bytes) -> None:
            code, answer, _ = http("POST", f"{host.base_url}/api/runs", raw=raw)
            answers[code] = answers.get(code, 0) + 1
            assert code in (202, 400), (code, answer, raw[:300])
            assert "Traceback" not in json.dumps(answer)
            if code == 400:
                assert answer["errors"] and all(isinstance(e, str) for e in answer["errors"])
                # A URL's user part is masked in any error; in repository.url always.
                url_errors = [e for e in answer["errors"] if e.startswith("repository.url")]
                assert all(PAT not in e for e in url_errors)

        post()
    assert answers.get(400, 0) > 0 and answers.get(202, 0) > 0  # broken bodies and valid ones


@pytest.mark.slow
def test_fuzzed_bodies_get_exit_0_or_2_from_validate(tmp_path, capsys):
    body_file = tmp_path / "body.json"

    @FUZZ
    @given(raw=_bodies)
    def validate(raw: bytes) -> None:
        body_file.write_bytes(raw)
        code = main(["validate", str(body_file)])
        out, err = capsys.readouterr()
        assert code in (0, 2), (code, out, err)
        assert "Traceback" not in out + err
        assert all(PAT not in line for line in err.splitlines() if "repository.url" in line)
        assert (code == 0) == out.startswith("valid: ")

    validate()
