"""Benchmark 6: cost against repository size.

Two generated repositories that differ only in their data files (incompressible, about
`small_mb` and `large_mb`), each with the same one-line notebooks. `python -m notebookops run`
(local backend, 2 workers) runs N of them with the checkout cache warm, small and large
alternated; figures: wall time and the peak disk used under the run's state folder (sampled
while it runs, and once more after), with the ratios large/small. The checkout cache lives
outside the state folder, as it does by default (`<tmp>/notebookops-checkouts`); its size is
printed beside. Cold, ActivityClone of the large repository is measured against a plain
`git clone --depth 1 --single-branch` of the same ref, alternated; the last cold clone is
made into the warm runs' checkout cache, and one run of the small repository fills its entry
and warms the machine before anything warm is timed. Both repositories are generated once
per benchmark run, before any timing.

Goals (issue 17): warm time ratio large/small <= 1.15; peak disk of the large run <=
1.2 x (repository size + the small run's peak disk); cold clone <= 1.2x git's own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import nbformat

from bench.common import (
    PYTHON,
    Report,
    Sample,
    bench_env,
    git,
    git_env,
    run_cmd,
    sleep_notebook,
    timed,
)

BLOB_MB = 1


def _generate(path: Path, megabytes: float, notebooks: int, env: dict[str, str]) -> int:
    """A one-commit repository (git fast-import, no working tree): `notebooks` one-line
    notebooks under nb/ and about `megabytes` of random data under data/. Returns the bytes of
    the files at the commit. Generated once per benchmark run, outside every timed region."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main", env=env)
    proc = subprocess.Popen(
        # zlib level 0: deflating random data only finds it incompressible (zlib then stores
        # it anyway, so the pack a clone reads is the same size and as cheap to inflate), and
        # that attempt was half of the generation's 18 s.
        ["git", "-c", "core.compression=0", "-C", str(path), "fast-import", "--quiet"],
        stdin=subprocess.PIPE,
        env=env,
    )
    assert proc.stdin is not None
    write = proc.stdin.write
    write(b"commit refs/heads/main\ncommitter Bench <bench@example.invalid> 1700000000 +0000\n")
    write(b"data 4\ndata\n")
    total = 0
    remaining = int(megabytes * 1_000_000)
    index = 0
    while remaining > 0:
        data = os.urandom(min(remaining, BLOB_MB * 1_000_000))
        remaining -= len(data)
        write(b"M 644 inline data/blob-%04d.bin\ndata %d\n" % (index, len(data)))
        write(data + b"\n")
        total += len(data)
        index += 1
    for i in range(notebooks):
        raw = nbformat.writes(nbformat.from_dict(sleep_notebook(0, f"n{i}"))).encode()
        write(b"M 644 inline nb/n%03d.ipynb\ndata %d\n" % (i, len(raw)))
        write(raw + b"\n")
        total += len(raw)
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError("git fast-import failed")
    return total


def disk_bytes(root: Path) -> int:
    """Bytes allocated under `root` (du's count: blocks, so links cost what they cost)."""
    total = 0
    stack = [str(root)]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            total += st.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return total


class PeakDisk:
    """Samples the disk used under a folder while a run goes on, and once more after.

    A walk of a large state folder is not free: at N=50 in the 200 MB repository it visits
    some 12,500 links (about 60 ms of CPU here), and walking every 0.3 s took a sixth of a CPU
    from the very run it measured, more for the large repository than for the small one (it
    inflated the large/small time ratio). So the pause after each walk is at least 30 times the
    walk's own time: the sampler keeps to about 3 % of one CPU whatever the folder's size.
    Views stay until the run's end, so the final walk sees them all; `cpu` is what the
    sampler's walks cost.
    """

    DUTY = 1 / 30

    def __init__(self, root: Path, interval: float = 0.3) -> None:
        self.root, self.interval, self.peak, self.cpu = root, interval, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> float:
        started = time.thread_time()
        self.peak = max(self.peak, disk_bytes(self.root))
        spent = time.thread_time() - started
        self.cpu += spent
        return spent

    def _loop(self) -> None:
        pause = self.interval
        while not self._stop.wait(pause):
            pause = max(self.interval, self._sample() / self.DUTY)

    def __enter__(self) -> PeakDisk:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _run(url: str, count: int, folder: Path, env: dict[str, str]) -> tuple[float, int, float]:
    notebooks = [f"nb/n{i:03d}.ipynb" for i in range(count)]
    body = folder / "body.json"
    folder.mkdir(parents=True)
    body.write_text(
        json.dumps(
            {
                "repository": {"url": url, "ref": "main"},
                "notebooks": notebooks,
                "compute": {"backend": "local"},
            }
        )
    )
    state = folder / "state"
    state.mkdir()
    argv = [PYTHON, "-m", "notebookops", "run", str(body), "--out", str(folder / "out")]
    argv += ["--state", str(state), "--workers", "2", "-q"]
    with PeakDisk(state) as peak:
        elapsed, proc = run_cmd(argv, env=env, cwd=folder)
    summary = json.loads((folder / "out" / "summary.json").read_text())
    if summary["result"] != "succeeded" or summary["counts"]["succeeded"] != count:
        raise RuntimeError(f"notebookops run did not succeed:\n{proc.stdout[-3000:]}")
    return elapsed, peak.peak, peak.cpu


def _cold_clone(
    url: str, root: Path, i: int, env: dict[str, str], keep: Path | None = None
) -> tuple[float, float]:
    """ActivityClone into an empty cache, then git's own shallow clone of the same ref. With
    `keep`, the cache is that folder and stays: the warm runs' checkout cache, filled."""
    from notebookops import activities

    cache = keep or root / f"cold-{i}"
    os.environ["NOTEBOOKOPS_CHECKOUT_DIR"] = str(cache)
    payload = {
        "instanceId": f"bench-cold-{i}",
        "repository": {"url": url, "ref": "main"},
        "patterns": ["nb/n000.ipynb"],
    }
    ours, result = timed(lambda: activities.clone(payload))
    if not result.get("ok"):
        raise RuntimeError(f"ActivityClone failed: {result}")
    dest = root / f"git-{i}"
    argv = ["clone", "--quiet", "--depth", "1", "--single-branch", "--branch", "main", url]
    theirs, _ = timed(lambda: git(root, *argv, str(dest), env=env))
    shutil.rmtree(dest)
    if keep is None:
        shutil.rmtree(cache)
    return ours, theirs


# Runs of each repository per N: a run of 10 trivial notebooks takes 3-5 s here and varies by
# a second from one run to the next, so 2 of each cannot tell 1.05x from 1.25x; N=50 runs are
# longer and steadier.
REPEATS = {10: 4, 50: 3}


def _repeats(repeats: dict[int, int] | int | None, count: int) -> int:
    if isinstance(repeats, int):
        return repeats
    return (repeats or REPEATS).get(count, 2)


def run(
    report: Report,
    *,
    small_mb: float = 1,
    large_mb: float = 200,
    counts: tuple[int, ...] = (10, 50),
    repeats: dict[int, int] | int | None = None,
    cold_repeats: int = 2,
) -> dict:
    root = Path(tempfile.mkdtemp(prefix="nbops-bench-size-"))
    saved = dict(os.environ)
    try:
        genv = git_env(root / "home")
        repos, sizes = {}, {}
        for label, mb in (("small", small_mb), ("large", large_mb)):
            seconds, sizes[label] = timed(
                lambda label=label, mb=mb: _generate(root / label, mb, max(counts), genv)
            )
            repos[label] = (root / label).absolute().as_uri()
            print(
                f"  generated {label}: {sizes[label] / 1e6:.1f} MB at the commit in {seconds:.1f} s"
            )
        os.environ.update(
            NOTEBOOKOPS_ALLOW_LOCAL_REPOS="1", GIT_CONFIG_GLOBAL=genv["GIT_CONFIG_GLOBAL"]
        )

        cache = root / "checkouts"
        cold_ours, cold_git = [], []
        for i in range(cold_repeats):
            # The last cold clone fills the warm runs' cache for the large repository.
            keep = cache if i == cold_repeats - 1 else None
            ours, theirs = _cold_clone(repos["large"], root, i, genv, keep)
            cold_ours.append(ours)
            cold_git.append(theirs)
        s_co, s_cg = Sample(cold_ours), Sample(cold_git)
        r_cold = s_co.median / s_cg.median
        print(f"  cold, large: ActivityClone {s_co.fmt()}, git clone --depth 1 {s_cg.fmt()}")

        env = bench_env(
            NOTEBOOKOPS_CHECKOUT_DIR=str(cache), GIT_CONFIG_GLOBAL=genv["GIT_CONFIG_GLOBAL"]
        )
        raw: dict = {"sizes": sizes, "cold": {"ours": cold_ours, "git": cold_git}, "warm": {}}
        # One run of the small repository fills its checkout cache (the large one's was
        # filled by the last cold clone) and warms the machine: what follows is warm.
        _run(repos["small"], 1, root / "warm-small", env)
        for count in counts:
            rounds = _repeats(repeats, count)
            times: dict[str, list[float]] = {"small": [], "large": []}
            disks: dict[str, list[float]] = {"small": [], "large": []}
            sampler: dict[str, float] = {"small": 0.0, "large": 0.0}
            for i in range(rounds):
                for label in ("small", "large") if i % 2 == 0 else ("large", "small"):
                    seconds, peak, cpu = _run(
                        repos[label], count, root / f"n{count}-{label}-{i}", env
                    )
                    sampler[label] += cpu / rounds
                    times[label].append(seconds)
                    disks[label].append(peak)
                    shutil.rmtree(root / f"n{count}-{label}-{i}")
            st = {k: Sample(v) for k, v in times.items()}
            sd = {k: Sample([b / 1e6 for b in v], unit="MB") for k, v in disks.items()}
            r_time = st["large"].median / st["small"].median
            r_disk = sd["large"].median / sd["small"].median
            bound = 1.2 * (sizes["large"] / 1e6 + sd["small"].median)
            print(
                f"  N={count}: wall small {st['small'].fmt()}, large {st['large'].fmt()} "
                f"({r_time:.2f}x); peak disk small {sd['small'].fmt(1)}, large "
                f"{sd['large'].fmt(1)} ({r_disk:.2f}x); disk sampler's CPU per run small "
                f"{sampler['small']:.2f} s, large {sampler['large']:.2f} s"
            )
            report.add(
                "6 repo size",
                f"N={count}, warm: wall {large_mb:g} MB repo vs {small_mb:g} MB repo",
                st["large"].fmt(),
                st["small"].fmt(),
                f"{r_time:.2f}x",
                "<= 1.15x",
                r_time <= 1.15,
            )
            report.add(
                "6 repo size",
                f"N={count}: peak disk under the state folder, large vs small",
                sd["large"].fmt(1),
                sd["small"].fmt(1),
                f"{r_disk:.2f}x",
                f"<= 1.2 x (repo + small) = {bound:.0f} MB",
                sd["large"].median <= bound,
            )
            raw["warm"][count] = {"times": times, "disks": disks}
        cache_mb = disk_bytes(cache) / 1e6
        print(f"  checkout cache (one checkout per commit, .git included): {cache_mb:.0f} MB")
        report.add(
            "6 repo size",
            f"cold: ActivityClone vs git clone --depth 1, {sizes['large'] / 1e6:.0f} MB",
            s_co.fmt(),
            s_cg.fmt(),
            f"{r_cold:.2f}x",
            "<= 1.2x",
            r_cold <= 1.2,
        )
        raw["cacheBytes"] = cache_mb * 1e6
        return raw
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(root, ignore_errors=True)
