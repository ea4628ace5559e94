"""Benchmarks 1 (local throughput) and 5 (one notebook end to end).

1. N notebooks that each sleep S seconds and print, run by `python -m notebookops run` (local
   backend, 2 workers) against `pytest --nbmake -n 2` on the same notebooks, in interleaved
   rounds (at least 9 by default: nbmake's times are bimodal when a kernel start stalls), and
   against the floor: the notebooks' own work divided by the workers plus one kernel start,
   measured in each round. Then a sequential `papermill` CLI loop (fewer rounds: it is slow and
   steady) and the per-notebook overhead with 1 worker (wall time minus the notebooks' own
   sleep, divided by their number).
5. One trivial notebook: `python -m notebookops run` against one `papermill` CLI run.

Peers run from their own venvs (bench/peers.py), never from this project's. The variants of one
round run back to back, so each round sees the same machine load.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from bench import peers
from bench.common import (
    PYTHON,
    Report,
    Sample,
    bench_env,
    git_env,
    run_cmd,
    sleep_notebook,
    write_repo,
)


def _message(repo: Path, notebooks: list[str], folder: Path, max_parallel: int) -> Path:
    body = {
        "repository": {"url": str(repo), "ref": "main"},
        "notebooks": notebooks,
        "compute": {"backend": "local"},
        "timeoutMinutes": 30,
        "maxParallel": max_parallel,
    }
    path = folder / f"body-{len(notebooks)}.json"
    path.write_text(json.dumps(body))
    return path


def _ours(
    body: Path, out: Path, workers: int, env: dict[str, str], slow_after: float | None = None
) -> float:
    """One `notebookops run`; past `slow_after` seconds its progress lines are printed (when
    each notebook's start and end were seen says whether a runner or the orchestration
    stalled)."""
    if out.exists():
        shutil.rmtree(out)
    elapsed, proc = run_cmd(
        [
            PYTHON,
            "-m",
            "notebookops",
            "run",
            str(body),
            "--out",
            str(out),
            "--workers",
            str(workers),
        ],
        env=env,
        cwd=body.parent,
    )
    summary = json.loads((out / "summary.json").read_text())
    if summary["result"] != "succeeded":
        raise RuntimeError(f"notebookops run did not succeed:\n{proc.stdout[-3000:]}")
    if slow_after is not None and elapsed > slow_after:
        print(f"  slow run ({elapsed:.2f} s); what it printed:", flush=True)
        for line in proc.stdout.splitlines():
            if line.startswith("["):  # the timed progress lines
                print(f"    {line}", flush=True)
    return elapsed


def _baseline_cmd(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    """A baseline command, run again once if it fails (kernel starts race for ports); the time
    of the run that succeeded is the one reported."""
    try:
        return run_cmd(argv, env=env, cwd=cwd)[0]
    except RuntimeError as exc:
        print(f"  baseline failed once, retrying: {str(exc).splitlines()[0]}", flush=True)
        return run_cmd(argv, env=env, cwd=cwd)[0]


def _papermill_loop(paths: list[Path], out: Path) -> float:
    out.mkdir(parents=True, exist_ok=True)
    python, env = str(peers.python("papermill")), peers.env("papermill")
    total = 0.0
    for path in paths:
        total += _baseline_cmd(
            [python, "-m", "papermill", "--no-progress-bar", str(path), str(out / path.name)],
            env,
            path.parent,
        )
    return total


def _nbmake(paths: list[Path], workers: int | None, cwd: Path) -> float:
    argv = [str(peers.python("nbmake")), "-m", "pytest", "-q", "--nbmake", "-p", "no:cacheprovider"]
    argv += ["-n", str(workers)] if workers else ["-p", "no:xdist"]
    return _baseline_cmd([*argv, *map(str, paths)], peers.env("nbmake"), cwd)


KERNEL_START = """
import time
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name="python3")
started = time.perf_counter()
km.start_kernel(extra_arguments=["--HistoryManager.hist_file=:memory:"])
client = km.blocking_client()
client.start_channels()
client.wait_for_ready(timeout=60)
print(time.perf_counter() - started)
client.stop_channels()
km.shutdown_kernel(now=True)
"""


def kernel_start(env: dict[str, str], cwd: Path) -> float:
    """One python3 kernel start, from launch until it answers (what a floor must include once)."""
    _, proc = run_cmd([PYTHON, "-c", KERNEL_START], env=env, cwd=cwd)
    return float(proc.stdout.strip().splitlines()[-1])


def run_throughput(
    report: Report,
    *,
    notebooks: int = 8,
    sleep: float = 1.0,
    rounds: int = 9,
    loop_rounds: int = 1,
    single_worker_rounds: int = 2,
):
    root = Path(tempfile.mkdtemp(prefix="nbops-bench-tp-"))
    try:
        env = bench_env(NOTEBOOKOPS_CHECKOUT_DIR=str(root / "checkouts"))
        genv = git_env(root / "home")
        env["GIT_CONFIG_GLOBAL"] = genv["GIT_CONFIG_GLOBAL"]
        files = {f"nb/n{i}.ipynb": sleep_notebook(sleep, f"done {i}") for i in range(notebooks)}
        repo = write_repo(root / "repo", files, genv)
        paths = [repo / rel for rel in files]
        body = _message(repo, list(files), root, max_parallel=notebooks)
        own = notebooks * sleep
        workers = 2
        peers.python("nbmake"), peers.python("papermill")  # venvs built before any timing
        runs: dict[str, list[float]] = {
            k: [] for k in ("ours2", "nbmake2", "kernel", "loop", "ours1")
        }
        for i in range(rounds):
            slow = 2 * min(runs["ours2"]) if runs["ours2"] else None
            runs["ours2"].append(_ours(body, root / "out", workers, env, slow_after=slow))
            runs["nbmake2"].append(_nbmake(paths, workers, root))
            runs["kernel"].append(kernel_start(env, root))
            if i < loop_rounds:
                runs["loop"].append(_papermill_loop(paths, root / "pm" / str(i)))
            if i < single_worker_rounds:
                runs["ours1"].append(_ours(body, root / "out", 1, env))
            print(
                f"  round {i + 1}/{rounds}: "
                + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in runs.items() if len(v) == i + 1),
                flush=True,
            )
        s = {k: Sample(v) for k, v in runs.items()}
        over = {k: Sample([(t - own) / notebooks for t in runs[k]]) for k in ("ours1", "loop")}
        floor = own / workers + s["kernel"].median
        r_floor = s["ours2"].median / floor
        r_nb = s["ours2"].median / s["nbmake2"].median
        r_loop = s["ours2"].median / s["loop"].median
        print(f"  {notebooks} x {sleep:g} s notebooks, {workers} workers:")
        print(f"    notebookops run      {s['ours2'].fmt()}")
        print(
            f"    floor                {floor:.2f} s = {own:g} s / {workers} + one kernel start "
            f"{s['kernel'].fmt()}   ours/floor {r_floor:.2f}x"
        )
        print(f"    pytest --nbmake -n 2 {s['nbmake2'].fmt()}   ours/nbmake {r_nb:.2f}x")
        print(f"    papermill loop       {s['loop'].fmt()}   ours/loop {r_loop:.2f}x")
        print("  per-notebook overhead, 1 worker (wall - own time) / notebooks:")
        print(f"    notebookops run      {over['ours1'].fmt(3)}")
        print(f"    papermill loop       {over['loop'].fmt(3)}")
        tag = f"{notebooks}x{sleep:g}s"
        report.add(
            "1 throughput",
            f"wall, {tag}, {workers} workers vs the floor (work/workers + 1 kernel start)",
            s["ours2"].fmt(),
            f"{floor:.2f} s",
            f"{r_floor:.2f}x",
            "<= 1.25x",
            r_floor <= 1.25,
        )
        report.add(
            "1 throughput",
            f"wall, {tag}, {workers} workers vs nbmake -n 2 (own venv, {rounds} rounds)",
            s["ours2"].fmt(),
            s["nbmake2"].fmt(),
            f"{r_nb:.2f}x",
            "<= 0.75x",
            r_nb <= 0.75,
        )
        report.add(
            "1 throughput",
            f"wall, {tag}, vs sequential papermill loop",
            s["ours2"].fmt(),
            s["loop"].fmt(),
            f"{r_loop:.2f}x",
            "faster (< 1x)",
            r_loop < 1.0,
        )
        # The sequential baseline is the papermill loop (one notebook at a time, like one
        # worker); a sequential nbmake run would cost 2 more minutes per `make bench`.
        ratio_o = over["ours1"].median / over["loop"].median
        report.add(
            "1 throughput",
            "per-notebook overhead, 1 worker vs papermill loop",
            over["ours1"].fmt(3),
            over["loop"].fmt(3),
            f"{ratio_o:.2f}x",
            "<= 0.5 s",
            over["ours1"].median <= 0.5,
        )
        return {
            "runs": runs,
            "floor": floor,
            "overhead": {k: v.values for k, v in over.items()},
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_single(report: Report, *, repeats: int = 5):
    root = Path(tempfile.mkdtemp(prefix="nbops-bench-one-"))
    try:
        env = bench_env(NOTEBOOKOPS_CHECKOUT_DIR=str(root / "checkouts"))
        genv = git_env(root / "home")
        env["GIT_CONFIG_GLOBAL"] = genv["GIT_CONFIG_GLOBAL"]
        files = {"trivial.ipynb": sleep_notebook(0, "hello")}
        repo = write_repo(root / "repo", files, genv)
        body = _message(repo, list(files), root, max_parallel=1)
        ours, pm = [], []
        for i in range(repeats):
            ours.append(_ours(body, root / "out", 1, env))
            pm.append(_papermill_loop([repo / "trivial.ipynb"], root / "pm" / str(i)))
        s_ours, s_pm = Sample(ours), Sample(pm)
        extra = Sample([o - p for o, p in zip(ours, pm, strict=True)])
        print(f"  notebookops run  {s_ours.fmt()}")
        print(f"  papermill CLI    {s_pm.fmt()}")
        print(f"  extra per repetition {extra.fmt()}")
        diff = s_ours.median - s_pm.median
        report.add(
            "5 one notebook",
            "notebookops run vs papermill CLI, trivial notebook",
            s_ours.fmt(),
            s_pm.fmt(),
            f"{s_ours.median / s_pm.median:.2f}x, +{diff:.2f} s",
            "<= +1.0 s",
            diff <= 1.0,
        )
        return {"ours": ours, "papermill": pm}
    finally:
        shutil.rmtree(root, ignore_errors=True)
