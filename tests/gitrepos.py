"""Build real git repositories in temp dirs for tests.

    repo = make_repo(tmp_path / "src", {"nb/a.ipynb": notebook("x = 1"), "README.md": "hi"})
    sha = commit(repo, {"nb/b.ipynb": notebook("print(2)")}, "add b")
    tag(repo, "v1")
    url = file_url(repo)

File values: ``str`` (UTF-8 text), ``bytes``, ``dict`` (a notebook, written with nbformat),
``Symlink("target")`` (a symlink committed as such), or ``None`` (delete, in :func:`commit`).
Cloning these through notebookops.repo needs ``NOTEBOOKOPS_ALLOW_LOCAL_REPOS=1``; for
hermetic tests also point ``GIT_CONFIG_GLOBAL`` at an empty file (see tests/test_repo.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import git
import nbformat
from nbformat import v4

__all__ = ["Symlink", "branch", "commit", "file_url", "make_repo", "notebook", "tag"]


@dataclass(frozen=True)
class Symlink:
    target: str


FileValue = str | bytes | dict[str, Any] | Symlink | None


def notebook(*code_cells: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """An nbformat 4 notebook; ``parameters`` becomes a first cell tagged ``parameters``."""
    cells = []
    if parameters is not None:
        source = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
        cells.append(v4.new_code_cell(source, metadata={"tags": ["parameters"]}))
    cells.extend(v4.new_code_cell(src) for src in code_cells)
    nb = v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def _write(root: Path, files: dict[str, FileValue]) -> None:
    for rel, value in files.items():
        target = root / rel
        if value is None:
            target.unlink()
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        if isinstance(value, Symlink):
            target.symlink_to(value.target)
        elif isinstance(value, bytes):
            target.write_bytes(value)
        elif isinstance(value, str):
            target.write_text(value, encoding="utf-8")
        else:
            target.write_text(nbformat.writes(nbformat.from_dict(value)), encoding="utf-8")


def make_repo(path: Path, files: dict[str, FileValue], branch: str = "main") -> Path:
    """Create a repository at ``path`` with one commit on ``branch`` holding ``files``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    repo = git.Repo.init(path, initial_branch=branch)
    with repo.config_writer() as cfg:
        cfg.set_value("user", "name", "Test Author")
        cfg.set_value("user", "email", "test@example.invalid")
        cfg.set_value("commit", "gpgsign", "false")
    repo.close()
    commit(path, files, "initial")
    return path


def commit(repo: Path, files: dict[str, FileValue], message: str) -> str:
    """Write ``files`` into the work tree, commit them all, return the new commit's SHA."""
    repo = Path(repo)
    _write(repo, files)
    g = git.Git(str(repo))
    g.add("--all")
    g.commit("--allow-empty", "--quiet", "-m", message)
    return g.rev_parse("HEAD")


def tag(repo: Path, name: str, *, ref: str = "HEAD", message: str | None = None) -> str:
    """Tag ``ref`` (annotated when ``message`` is given); returns the tagged commit's SHA."""
    g = git.Git(str(repo))
    if message is None:
        g.tag(name, ref)
    else:
        g.tag("-a", name, "-m", message, ref)
    return g.rev_parse(f"{name}^{{commit}}")


def branch(repo: Path, name: str, *, ref: str = "HEAD") -> None:
    git.Git(str(repo)).branch(name, ref)


def file_url(repo: Path) -> str:
    """``file://`` URL of ``repo``: git only honours ``--depth`` for local repos in this form."""
    return Path(repo).absolute().as_uri()
