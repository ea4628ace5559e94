"""Shared pieces of the benchmarks: timing, statistics, the result table, repos and notebooks.

Every figure printed comes from a run in this process: nothing here is a constant result.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
VENV_BIN = Path(PYTHON).parent


@dataclass
class Sample:
    """Repeated measurements of one quantity (seconds unless `unit` says otherwise)."""

    values: list[float]
    unit: str = "s"

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def fmt(self, digits: int = 2) -> str:
        if len(self.values) == 1:
            return f"{self.values[0]:.{digits}f} {self.unit} (1 run)"
        return (
            f"{self.median:.{digits}f} {self.unit} "
            f"[{self.low:.{digits}f}..{self.high:.{digits}f}, n={len(self.values)}]"
        )


@dataclass
class Goal:
    """One line of the final table: a figure, its baseline, and whether the goal holds."""

    bench: str
    what: str
    ours: str
    baseline: str
    ratio: str
    goal: str
    met: bool | None  # None: informational line, no goal

    def row(self) -> list[str]:
        verdict = "" if self.met is None else ("met" if self.met else "MISSED")
        return [self.bench, self.what, self.ours, self.baseline, self.ratio, self.goal, verdict]


@dataclass
class Report:
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *args: Any, **kwargs: Any) -> Goal:
        goal = Goal(*args, **kwargs)
        self.goals.append(goal)
        return goal


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def run_cmd(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
) -> tuple[float, subprocess.CompletedProcess]:
    """Run a command, return its wall time and result; raise with its output when it fails."""
    started = time.perf_counter()
    proc = subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout[-4000:]}"
        )
    return elapsed, proc


def bench_env(**extra: str) -> dict[str, str]:
    """The environment for benchmark subprocesses: the venv first on PATH, a quiet git."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(VENV_BIN), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    env.update(extra)
    return env


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def sleep_notebook(seconds: float, label: str) -> dict[str, Any]:
    """A notebook whose only work is `time.sleep(seconds)` and a print."""
    from nbformat import v4

    nb = v4.new_notebook(
        cells=[v4.new_code_cell(f"import time\ntime.sleep({seconds!r})\nprint({label!r})")]
    )
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    return nb


def git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.strip()


def git_env(home: Path) -> dict[str, str]:
    """A hermetic git: an empty global config, a fixed author."""
    home.mkdir(parents=True, exist_ok=True)
    config = home / "gitconfig"
    config.touch()
    env = dict(os.environ)
    env.update(
        GIT_CONFIG_GLOBAL=str(config),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="Bench",
        GIT_AUTHOR_EMAIL="bench@example.invalid",
        GIT_COMMITTER_NAME="Bench",
        GIT_COMMITTER_EMAIL="bench@example.invalid",
    )
    return env


def in_process_app_env(root: Path) -> None:
    """The settings the real app needs when a benchmark hosts it in this process (devhost with
    an in-process fake backend): local repositories, a fresh seal key, folders under `root`."""
    from notebookops import sealing

    genv = git_env(root / "home")
    os.environ.update(
        NOTEBOOKOPS_ALLOW_LOCAL_REPOS="1",
        NOTEBOOKOPS_SECRET_KEY=sealing.new_key(),
        NOTEBOOKOPS_CHECKOUT_DIR=str(root / "checkouts"),
        NOTEBOOKOPS_OUTPUT_DIR=str(root / "outputs"),
        GIT_CONFIG_GLOBAL=genv["GIT_CONFIG_GLOBAL"],
    )


def write_repo(path: Path, files: dict[str, Any], env: dict[str, str]) -> Path:
    """A one-commit repository on `main` holding `files` (str text or a notebook dict)."""
    import nbformat

    path.mkdir(parents=True, exist_ok=True)
    for rel, value in files.items():
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, str):
            target.write_text(value, encoding="utf-8")
        else:
            target.write_text(nbformat.writes(nbformat.from_dict(value)), encoding="utf-8")
    git(path, "init", "-q", "-b", "main", env=env)
    git(path, "add", "--all", env=env)
    git(path, "commit", "-q", "-m", "initial", env=env)
    return path
