"""`pip install .` and a wheel give a `notebookops` command that works from any folder.

Each install goes into a throwaway venv made by the test. So that it is fast and needs no
registry, the venv sees the test interpreter's installed dependencies through a .pth file,
and the project is built without build isolation (setuptools from requirements-dev.txt);
the project itself is only ever the installed copy: commands run outside any checkout with
no PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.devhost_support import http
from tests.gitrepos import file_url, make_repo, notebook

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _source_copy(target: Path) -> Path:
    """The project's files as a clone has them, so building leaves the checkout clean."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (item.decode() for item in listed)):
        source = ROOT / name
        if source.is_file() and not source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies, not the project: the test interpreter's site-packages.
    Path(purelib, "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _pip(python: Path, *args: str | Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    gitconfig = tmp_path / "gitconfig"
    gitconfig.write_text("")
    return env | {"GIT_CONFIG_GLOBAL": str(gitconfig), "PATH": "/usr/bin:/bin"}


def _check_command(venv_python: Path, src: Path, tmp_path: Path) -> None:
    command = venv_python.parent / "notebookops"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _env(tmp_path)

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [command, *map(str, args)],
            cwd=elsewhere,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )

    where = subprocess.run(
        [venv_python, "-c", "import notebookops, notebookops_app; print(notebookops.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert where.returncode == 0, where.stderr
    assert not where.stdout.startswith(str(ROOT)) and "site-packages" in where.stdout
    installed = Path(where.stdout.strip()).parent
    # What the package needs besides Python: the app's host.json and the page templates.
    for needed in (
        installed.parent / "notebookops_app" / "host.json",
        installed / "templates" / "pages" / "run.html.j2",
        installed / "templates" / "nbconvert" / "notebookops" / "index.html.j2",
    ):
        assert needed.is_file(), needed

    checked = run("validate", src / "examples" / "messages" / "local.json")
    assert (checked.returncode, checked.stdout) == (0, "valid: 3 notebook entries, backend local\n")
    assert run("--help").stdout.startswith("usage: notebookops ")

    repo = make_repo(tmp_path / "repo", {"a.ipynb": notebook("print('installed ok')")})
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"repository": {"url": file_url(repo)}, "notebooks": ["a.ipynb"]}))
    ran = run("run", body, "--out", tmp_path / "out")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["result"] == "succeeded"

    server = subprocess.Popen(
        [command, "serve", "--port", "0", "--state", tmp_path / "serve-state"],
        cwd=elsewhere,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("devhost listening on "), line + server.stderr.read()
        code, answer, _ = http("POST", f"{line.split()[-1]}/api/runs", {"notebooks": []})
        assert code == 400 and answer["errors"], answer
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def test_pip_install_dot_gives_a_notebookops_command(tmp_path):
    src = _source_copy(tmp_path / "src")
    python = _venv(tmp_path / "venv")
    _pip(python, "install", "--no-deps", "--no-build-isolation", "--no-index", src)
    _check_command(python, src, tmp_path)


def test_a_built_wheel_gives_the_same_command(tmp_path):
    src = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(dist),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = dist.glob("notebookops-*.whl")
    python = _venv(tmp_path / "venv")
    _pip(python, "install", "--no-deps", "--no-index", wheel)
    _check_command(python, src, tmp_path)
