"""`python -m bench [--only NAMES] [--tiny] [--json FILE]`: run the benchmarks, print a table.

Names: throughput (1), scale (2), startup (3), clone (4), single (5), repo-size (6), wide (7), push (8).
`--tiny` runs each on a tiny size with few repetitions (the smoke test's mode: figures are then
not meaningful, only the machinery is checked). Peer tools run from their own venvs, built on
first use and cached (bench/peers.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime

from bench.common import Report, table

GOAL_KEYS = ("bench", "what", "ours", "baseline", "ratio", "goal", "verdict")
ORDER = ["startup", "scale", "clone", "single", "throughput", "repo-size", "wide", "push"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default=",".join(ORDER), help="comma-separated benchmarks")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--json", help="also write every raw figure to this file")
    parser.add_argument(
        "--wide", type=int, default=500, help="notebooks in benchmark 7 (default 500)"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(ORDER)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    report = Report()
    raw: dict = {}
    began = time.perf_counter()
    _compile_own_code()
    print(
        f"notebookops benchmarks, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {platform.platform()}"
    )
    for name in ORDER:
        if name not in names:
            continue
        print(f"\n== {name} ==", flush=True)
        started = time.perf_counter()
        raw[name] = _run(name, report, args.tiny, args.wide)
        print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
        if args.json:  # after every benchmark, so an interrupted run keeps what it measured
            _write_json(args.json, report, raw, began)
    print()
    header = ["bench", "what", "ours (median [min..max])", "baseline", "ratio", "goal", ""]
    print(table([g.row() for g in report.goals], header))
    for note in report.notes:
        print(f"note: {note}")
    print(f"\ntotal {time.perf_counter() - began:.0f} s")
    if args.json:
        _write_json(args.json, report, raw, began)
    return 0


def _compile_own_code() -> None:
    """Byte-compile this checkout's own modules before anything is timed. The peers' code was
    compiled when pip installed it, and a user's Python writes `__pycache__` on its first
    run; a machine with PYTHONDONTWRITEBYTECODE set (this one) would otherwise compile our
    modules again in every process of every run, which no user pays."""
    import compileall
    import re

    from bench.common import ROOT

    compileall.compile_dir(str(ROOT), rx=re.compile(r"/\.(venv|git)/"), quiet=1)


def _write_json(path: str, report: Report, raw: dict, began: float) -> None:
    document = {
        "cpus": os.cpu_count(),
        "seconds": round(time.perf_counter() - began),
        "goals": [dict(zip(GOAL_KEYS, g.row(), strict=True)) for g in report.goals],
        "notes": report.notes,
        "results": raw,
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1, default=str)


def _run(name: str, report: Report, tiny: bool, wide_notebooks: int = 500):
    if name == "startup":
        from bench import startup

        return startup.run(report, repeats=2 if tiny else 10)
    if name == "scale":
        from bench import scale

        # 3 repetitions below N=500 (5 before issue 17): make bench must fit in 12 minutes
        # with benchmarks 6 and 7 added.
        return scale.run(report, sizes=(3,) if tiny else (10, 100, 500), tiny=tiny)
    if name == "clone":
        from bench import clone

        if tiny:
            return clone.run(report, commits=30, megabytes=1, repeats=1)
        return clone.run(report)
    if name == "single":
        from bench import throughput

        return throughput.run_single(report, repeats=1 if tiny else 3)
    if name == "throughput":
        from bench import throughput

        if tiny:
            return throughput.run_throughput(
                report, notebooks=2, sleep=0.1, rounds=1, loop_rounds=1, single_worker_rounds=1
            )
        return throughput.run_throughput(report)
    if name == "repo-size":
        from bench import reposize

        if tiny:
            return reposize.run(
                report, small_mb=0.05, large_mb=2, counts=(2,), repeats=1, cold_repeats=1
            )
        return reposize.run(report)
    if name == "wide":
        from bench import wide

        return wide.run(report, notebooks=3 if tiny else wide_notebooks)
    if name == "push":
        from bench import push

        return push.run(report, notebooks=3, max_minutes=3) if tiny else push.run(report)
    raise AssertionError(name)


if __name__ == "__main__":
    sys.exit(main())
