"""Benchmark 7: one run of many trivial notebooks (500, the documented maximum) end to end.

`notebookops run` on the local backend with the default workers (the CPU count) and the default
`maxParallel` (20), in a child
process whose devhost is watched from outside (a Host subclass, as in bench/scale.py): the
largest history one generation reached, and the largest durable payload of each kind: the
orchestration input (carried by continue_as_new), custom status, activity inputs and outputs
and the orchestration output, in bytes of their JSON text. The parent measures the wall time
and the child's peak resident memory (`wait4`'s rusage: the host process, devhost and every
activity, since activities run in it; kernels and runners are detached and not counted).

Goals: every payload under 1 MB (the Durable Task Scheduler's limit per payload; Azure Storage
task hubs spill large messages to blobs, DTS refuses them), the custom status within 16 KB of
UTF-16 JSON (Durable Functions fails an orchestration whose status is larger), the largest
generation under 3N + 100 events, every notebook succeeded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PYTHON, Report, bench_env, git_env, sleep_notebook, write_repo

PAYLOAD_LIMIT = 1_000_000  # bytes, per payload (Durable Task Scheduler)
KINDS = (
    "orchestration input",
    "custom status",
    "activity input",
    "activity output",
    "orchestration output",
)


def _size(value: Any) -> int:
    if value is None:
        return 0
    text = value if isinstance(value, str) else json.dumps(value)
    return len(text.encode("utf-8"))


def _observed_host() -> type:
    from devhost import Host
    from devhost import events as ev
    from devhost.episode import custom_status_size

    class WatchedHost(Host):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.max_history = 0
            self.payloads = dict.fromkeys(KINDS, 0)
            self.status_utf16 = 0  # the custom status's own limit counts UTF-16 bytes

        def _note(self, kind: str, value: Any) -> None:
            self.payloads[kind] = max(self.payloads[kind], _size(value))

        def _commit(self, inst: Any, history: list, rows: list, res: Any, now: Any) -> None:
            closing = 1 if res.status in ("Completed", "Failed", "ContinuedAsNew") else 0
            self.max_history = max(self.max_history, len(history) + len(res.history) + closing)
            for event, _hidden in [*((e, False) for e in history[:1]), *res.history]:
                kind = event.get("EventType")
                if kind == ev.EXECUTION_STARTED:
                    self._note("orchestration input", event.get("Input"))
                elif kind == ev.TASK_SCHEDULED:
                    self._note("activity input", event.get("Input"))
                elif kind == ev.TASK_COMPLETED:
                    self._note("activity output", event.get("Result"))
            for item in res.work:
                self._note("activity input", item.input)
            if res.custom_status_set:
                self._note("custom status", res.custom_status)
                utf16 = custom_status_size(res.custom_status)
                self.status_utf16 = max(self.status_utf16, utf16)
            if res.continue_input is not None:
                self._note("orchestration input", res.continue_input)
            if res.status == "Completed":
                self._note("orchestration output", res.output)
            super()._commit(inst, history, rows, res, now)

        def __exit__(self, *exc: Any) -> Any:
            stats = {
                "maxHistory": self.max_history,
                "payloads": self.payloads,
                "customStatusUtf16": self.status_utf16,
            }
            Path(os.environ["NOTEBOOKOPS_BENCH_STATS"]).write_text(json.dumps(stats))
            return super().__exit__(*exc)

    return WatchedHost


def child(argv: list[str]) -> int:
    """`python -m bench.wide BODY OUT STATE`: `notebookops run` with a watched devhost."""
    import devhost

    devhost.Host = _observed_host()  # local_run imports Host from devhost when it runs
    from notebookops import local_run

    body, out, state = argv
    return local_run.run(body, None, out, state, workers=None, quiet=True)


def run(report: Report, *, notebooks: int = 500) -> dict:
    root = Path(tempfile.mkdtemp(prefix="nbops-bench-wide-"))
    try:
        genv = git_env(root / "home")
        files = {f"nb/t{i:03d}.ipynb": sleep_notebook(0, f"t{i}") for i in range(notebooks)}
        repo = write_repo(root / "repo", files, genv)
        body = root / "body.json"
        body.write_text(
            json.dumps(
                {
                    "repository": {"url": str(repo), "ref": "main"},
                    "notebooks": ["nb/*.ipynb"],
                    "compute": {"backend": "local"},
                    # maxParallel stays at its default (20): every submitted local notebook
                    # has a detached runner process (about 30 MB while it queues), so 500 in
                    # flight would hold some 15 GB on a 2-CPU machine for no gain in speed.
                    "timeoutMinutes": 60,
                }
            )
        )
        stats_file = root / "stats.json"
        env = bench_env(
            NOTEBOOKOPS_CHECKOUT_DIR=str(root / "checkouts"),
            GIT_CONFIG_GLOBAL=genv["GIT_CONFIG_GLOBAL"],
            NOTEBOOKOPS_BENCH_STATS=str(stats_file),
        )
        env.pop("NOTEBOOKOPS_LOCAL_WORKERS", None)  # the default: the CPU count
        argv = [PYTHON, "-m", "bench.wide", str(body), str(root / "out"), str(root / "state")]
        started = time.perf_counter()
        proc = subprocess.Popen(
            argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        output = proc.stdout.read() if proc.stdout else b""
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        text = output.decode(errors="replace")
        summary_path = root / "out" / "summary.json"
        if proc.returncode != 0 or not summary_path.is_file():
            raise RuntimeError(f"wide run exited {proc.returncode}:\n{text[-3000:]}")
        summary = json.loads(summary_path.read_text())
        stats = json.loads(stats_file.read_text())
        succeeded = summary["counts"]["succeeded"]
        workers = os.cpu_count() or 1
        per_notebook = wall / notebooks
        # Each notebook's own work is nothing, so everything per notebook is overhead; per
        # worker slot it is wall x workers / N.
        per_slot = wall * workers / notebooks
        peak_mb = usage.ru_maxrss / 1024  # kilobytes on Linux
        largest_kind = max(stats["payloads"], key=stats["payloads"].get)
        largest = stats["payloads"][largest_kind]
        bound = 3 * notebooks + 100
        print(f"  {notebooks} trivial notebooks, {workers} workers: {succeeded} succeeded")
        print(f"  wall {wall:.1f} s, {per_notebook:.3f} s per notebook ({per_slot:.2f} s per slot)")
        print(f"  host peak memory {peak_mb:.0f} MB; largest generation {stats['maxHistory']}")
        for kind in KINDS:
            print(f"    largest {kind:<20} {stats['payloads'][kind]:>9,} bytes")
        report.add(
            "7 wide",
            f"{notebooks} trivial notebooks, {workers} workers: wall, per notebook",
            f"{wall:.1f} s, {per_notebook:.3f} s/notebook",
            "",
            f"{per_slot:.2f} s per slot",
            "all succeed",
            succeeded == notebooks,
        )
        report.add(
            "7 wide",
            "host process peak memory (RSS)",
            f"{peak_mb:.0f} MB",
            "",
            "",
            "",
            None,
        )
        report.add(
            "7 wide",
            f"largest durable payload ({largest_kind})",
            f"{largest:,} bytes",
            "",
            f"{largest / PAYLOAD_LIMIT:.2f} of 1 MB",
            "< 1 MB each (DTS limit)",
            largest < PAYLOAD_LIMIT,
        )
        from devhost.episode import CUSTOM_STATUS_MAX_BYTES

        status_kb = stats["customStatusUtf16"] / 1024
        report.add(
            "7 wide",
            "largest custom status (UTF-16 JSON)",
            f"{status_kb:.1f} KB",
            "",
            "",
            "<= 16 KB (Durable Functions' limit)",
            stats["customStatusUtf16"] <= CUSTOM_STATUS_MAX_BYTES,
        )
        report.add(
            "7 wide",
            "largest history of one generation (events)",
            str(stats["maxHistory"]),
            "",
            "",
            f"< 3N+100 = {bound}",
            stats["maxHistory"] < bound,
        )
        return {
            "wall": wall,
            "succeeded": succeeded,
            "peakRssBytes": usage.ru_maxrss * 1024,
            **stats,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(child(sys.argv[1:]))
