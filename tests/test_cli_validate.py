"""``python -m notebookops validate``, run as a user runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from notebookops.cli import build_parser, main
from notebookops.datacontract import DATACONTRACT_PREFIX

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "messages"
VALID = {
    "repository": {"url": "https://dev.azure.com/org/proj/_git/repo"},
    "notebooks": ["nb/a.ipynb", {"path": "nb/b.ipynb", "parameters": {"alpha": 1}}],
    "compute": {"backend": "azureml", "target": "cpu-cluster"},
}


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notebookops", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture
def valid_body(tmp_path):
    path = tmp_path / "body.json"
    path.write_text(json.dumps(VALID))
    return path


@pytest.mark.slow
def test_valid_message_with_example_properties(valid_body):
    result = run_cli("validate", valid_body, "--properties", EXAMPLES / "properties.example.json")
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "valid: 2 notebook entries, backend azureml\n",
        "",
    )


@pytest.mark.slow
def test_invalid_example_prints_each_error_on_its_own_line():
    result = run_cli("validate", EXAMPLES / "invalid.json")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 9
    assert lines[0].startswith('failfast: unknown field (did you mean "failFast"?)')
    assert (
        'notebooks[1]: must stay inside the repository (no .. segments), got "../outside.ipynb"'
        in lines
    )
    assert 'compute.backend: must be one of azureml, azureml-v1, local, got "gpu"' in lines


@pytest.mark.slow
def test_datacontract_body_file_and_bad_token_not_echoed(tmp_path):
    text = json.dumps(VALID).encode()
    wrapped = tmp_path / "wrapped.bin"
    wrapped.write_bytes(
        DATACONTRACT_PREFIX + b"\x9a" + len(text).to_bytes(2, "little") + text + b"\x01"
    )
    props = json.loads((EXAMPLES / "properties.example.json").read_text())
    props |= {"AuthToken": "leaky secret value", "JobId": "leaky secret value"}
    props_path = tmp_path / "props.json"
    props_path.write_text(json.dumps(props))

    assert run_cli("validate", wrapped).stdout == "valid: 2 notebook entries, backend azureml\n"
    result = run_cli("validate", wrapped, "--properties", props_path)
    assert result.returncode == 2
    assert "properties.AuthToken: must be a token string without spaces" in result.stderr
    assert 'properties.JobId: must be a GUID, got "***"' in result.stderr
    assert "leaky" not in result.stderr + result.stdout


@pytest.mark.slow
def test_unreadable_files_and_usage_errors_exit_2(tmp_path, valid_body):
    missing = run_cli("validate", tmp_path / "nope.json")
    assert missing.returncode == 2 and "cannot read message body" in missing.stderr
    (tmp_path / "list.json").write_text("[]")
    bad_props = run_cli("validate", valid_body, "--properties", tmp_path / "list.json")
    assert bad_props.returncode == 2 and "must hold a JSON object" in bad_props.stderr
    no_command = run_cli()
    assert no_command.returncode == 2 and "COMMAND" in no_command.stderr


def test_parser_has_room_for_more_subcommands(valid_body, capsys):
    parser = build_parser()
    args = parser.parse_args(["validate", str(valid_body)])
    assert args.command == "validate" and callable(args.handler)
    assert main(["validate", str(valid_body)]) == 0
    assert capsys.readouterr().out == "valid: 2 notebook entries, backend azureml\n"


@pytest.mark.slow
def test_validate_reads_the_demo_message_as_run_does_from_any_folder(tmp_path):
    """The relative repository.url ("../..") is resolved against the message file's folder
    and local repositories are allowed, exactly as `run` does; no setting is needed."""
    result = subprocess.run(
        [sys.executable, "-m", "notebookops", "validate", str(EXAMPLES / "local.json")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "valid: 3 notebook entries, backend local\n",
        "",
    )


@pytest.mark.slow
def test_validate_and_run_refuse_the_same_url_with_the_same_words(tmp_path):
    token = "pat0123456789abcdefTOKEN"
    bodies = {
        "token": f"https://{token}@dev.azure.com/org/proj/_git/repo",
        "option": "ssh://-oProxyCommand=touch%20pwned/r",
        "port": "ssh://host.example:99999/r",
    }
    for name, url in bodies.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"repository": {"url": url}, "notebooks": ["a.ipynb"]}))
        checked = run_cli("validate", path)
        ran = run_cli("run", path, "--out", tmp_path / f"out-{name}")
        assert checked.returncode == ran.returncode == 2, (checked.stderr, ran.stderr)
        refusal = [line for line in checked.stderr.splitlines() if line]
        assert refusal and refusal[0].startswith("repository.url: ")
        assert all(line in ran.stderr for line in refusal), (refusal, ran.stderr)
        for text in (checked.stdout, checked.stderr, ran.stdout, ran.stderr):
            assert token not in text
    assert not (tmp_path / "pwned").exists()


def _serve(state: Path, *extra: str) -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "notebookops",
            "serve",
            "--port",
            "0",
            "--state",
            str(state),
            *list(extra),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Even an inherited setting does not open `serve` to local repositories.
        env={**os.environ, "NOTEBOOKOPS_ALLOW_LOCAL_REPOS": "1", "PYTHONPATH": str(ROOT)},
    )
    note = proc.stderr.readline()
    line = proc.stdout.readline()
    assert line.startswith("devhost listening on "), line + note
    return proc, line.split()[-1], note


@pytest.mark.slow
def test_serve_allows_local_repositories_only_when_asked(tmp_path):
    from tests.devhost_support import http

    body = {"repository": {"url": "file:///etc"}, "notebooks": ["passwd.ipynb"]}
    for flag, expected in (((), 400), (("--allow-local-repos",), 202)):
        proc, url, note = _serve(tmp_path / f"state{len(flag)}", *flag)
        try:
            code, answer, _ = http("POST", f"{url}/api/runs", body)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        assert code == expected, answer
        if flag:
            assert "local repositories allowed (--allow-local-repos)" in note
        else:
            assert "local repositories (paths, file:// URLs) refused" in note
            assert any(
                e.startswith("repository.url: local repositories are allowed only")
                for e in answer["errors"]
            )
