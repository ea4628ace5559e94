"""Benchmark 4: clone. A generated repository with many commits and a large history (every
commit rewrites one of 20 files of incompressible data, so the history is about `megabytes` while
the tip stays small): ActivityClone for one notebook (in-process, a fresh checkout cache each
time) against a full `git clone` of the same `file://` URL. Alternated, median of `repeats`."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.common import Report, Sample, git, git_env, sleep_notebook, timed

FILES = 20


def _generate(path: Path, commits: int, megabytes: float, env: dict[str, str]) -> None:
    """A repository built with git fast-import: `commits` commits, about `megabytes` of blobs,
    stored at zlib level 0 (see bench/reposize.py: random data does not compress, so only the
    generation gets faster)."""
    import nbformat

    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main", env=env)
    size = max(1, int(megabytes * 1_000_000 / commits))
    notebook = nbformat.writes(nbformat.from_dict(sleep_notebook(0, "cloned"))).encode()
    proc = subprocess.Popen(
        ["git", "-c", "core.compression=0", "-C", str(path), "fast-import", "--quiet"],
        stdin=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None
    write = proc.stdin.write
    for i in range(commits):
        message = f"commit {i}".encode()
        write(b"commit refs/heads/main\n")
        write(f"committer Bench <bench@example.invalid> {1_700_000_000 + i} +0000\n".encode())
        write(b"data %d\n%s\n" % (len(message), message))
        data = os.urandom(size)
        write(b"M 644 inline data/blob-%02d.bin\ndata %d\n" % (i % FILES, len(data)))
        write(data + b"\n")
        if i == 0:
            write(b"M 644 inline nb/one.ipynb\ndata %d\n" % len(notebook))
            write(notebook + b"\n")
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError("git fast-import failed")
    git(path, "checkout", "-q", "main", env=env)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(report: Report, commits: int = 2000, megabytes: float = 100, repeats: int = 5) -> dict:
    root = Path(tempfile.mkdtemp(prefix="nbops-bench-clone-"))
    saved = dict(os.environ)
    try:
        env = git_env(root / "home")
        repo = root / "repo"
        elapsed, _ = timed(lambda: _generate(repo, commits, megabytes, env))
        history = _du(repo / ".git")
        count = git(repo, "rev-list", "--count", "HEAD", env=env)
        print(f"  generated {count} commits, .git {history / 1e6:.0f} MB, in {elapsed:.1f} s")
        url = repo.absolute().as_uri()
        os.environ.update(
            NOTEBOOKOPS_ALLOW_LOCAL_REPOS="1", GIT_CONFIG_GLOBAL=env["GIT_CONFIG_GLOBAL"]
        )
        from notebookops import activities

        ours, full = [], []
        for i in range(repeats):
            os.environ["NOTEBOOKOPS_CHECKOUT_DIR"] = str(root / f"checkouts-{i}")
            payload = {
                "instanceId": f"bench-{i}",
                "repository": {"url": url, "ref": "main"},
                "patterns": ["nb/one.ipynb"],
            }
            seconds, result = timed(lambda p=payload: activities.clone(p))
            if not result.get("ok") or len(result.get("notebooks", [])) != 1:
                raise RuntimeError(f"ActivityClone failed: {result}")
            ours.append(seconds)
            dest = root / f"full-{i}"
            seconds, _ = timed(
                lambda d=dest: git(root, "clone", "--quiet", "--no-checkout", url, str(d), env=env)
            )
            seconds_co, _ = timed(lambda d=dest: git(d, "checkout", "-q", "main", env=env))
            full.append(seconds + seconds_co)
            shutil.rmtree(dest)
            shutil.rmtree(root / f"checkouts-{i}", ignore_errors=True)
        s_ours, s_full = Sample(ours), Sample(full)
        ratio = s_ours.median / s_full.median
        print(f"  ActivityClone (1 notebook) {s_ours.fmt(3)}")
        print(f"  git clone (full)           {s_full.fmt(3)}   ratio {ratio:.2f}x")
        report.add(
            "4 clone",
            f"ActivityClone vs full git clone, {count} commits, {history / 1e6:.0f} MB .git",
            s_ours.fmt(3),
            s_full.fmt(3),
            f"{ratio:.2f}x",
            "<= 0.2x",
            ratio <= 0.2,
        )
        return {"ours": ours, "full": full, "historyBytes": history, "commits": int(count)}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(root, ignore_errors=True)
