"""Prewarmed kernels (local_pool.py) on real kernels: one notebook each, in its own folder, and
nothing left behind when nobody claims them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nbformat
import psutil
import pytest

from notebookops.compute import get_backend, local_kernelserver, local_pool
from tests.test_compute_local import (
    finish,
    make_spec,
    runs_dir,
    tree_digest,
    wait_for,
    write_notebook,
)

__all__ = ["runs_dir"]  # the fixture


def alive(pid: int) -> bool:
    return local_pool._alive(pid)


def offered(runs: Path, count: int) -> list[dict]:
    pool = runs / local_pool.POOL_DIR
    found = wait_for(
        lambda: len(offers := sorted(pool.glob("*.json"))) >= count and offers,
        60,
        f"{count} pool kernels offered",
    )
    return [json.loads(p.read_text()) for p in found]


@pytest.fixture
def cached_checkout(tmp_path: Path, monkeypatch) -> Path:
    """A checkout inside the checkout cache, where ActivityClone puts them."""
    cache = tmp_path / "checkouts"
    monkeypatch.setenv("NOTEBOOKOPS_CHECKOUT_DIR", str(cache))
    root = cache / "0123abc"
    (root / "nb").mkdir(parents=True)
    (root / "data.csv").write_text("x\n41\n")
    return root


PROBE = (
    "import json, os\n"
    "secret = 42\n"
    "try:\n"
    "    open('../data.csv', 'w').write('changed')\n"
    "    wrote = 'allowed'\n"
    "except OSError as exc:\n"
    "    wrote = type(exc).__name__\n"
    "print(json.dumps({'pid': os.getpid(), 'cwd': os.getcwd(), 'wrote': wrote,"
    " 'data': open('../data.csv').read(), 'leaked': 'secret' in globals()}))"
)


@pytest.mark.slow
def test_a_prewarmed_kernel_runs_exactly_one_notebook_in_its_folder(
    cached_checkout, runs_dir, tmp_path
):
    write_notebook(cached_checkout / "nb" / "a.ipynb", "print('first')", PROBE)
    write_notebook(
        cached_checkout / "nb" / "b.ipynb",
        "print('first')",
        PROBE.replace("secret = 42\n", ""),
    )
    before = tree_digest(cached_checkout)
    backend = get_backend("local")
    pool = backend.prewarm(1)
    [record] = offered(runs_dir, 1)

    a = backend.submit(make_spec(cached_checkout, "nb/a.ipynb"))
    assert finish(backend, a).state == "succeeded"
    b = backend.submit(make_spec(cached_checkout, "nb/b.ipynb"))
    assert finish(backend, b).state == "succeeded"

    def printed(handle):
        out = backend.fetch_output(handle, tmp_path / f"{handle.run_id}.ipynb")
        cells = nbformat.read(out, as_version=4).cells
        return cells, json.loads(cells[-1].outputs[0].text)

    cells_a, got_a = printed(a)
    _, got_b = printed(b)
    run_a = Path(a.data["runDir"])
    # A adopted the pool kernel, B (no offer left) started a fresh one: never shared.
    assert json.loads((run_a / "pool-kernel.json").read_text())["pid"] == record["pid"]
    assert got_a["pid"] == record["pid"] and got_b["pid"] != record["pid"]
    assert not (Path(b.data["runDir"]) / "pool-kernel.json").exists()
    # The adopted kernel works in the notebook's folder, as a fresh start there does, and
    # moving it there left no trace in the notebook (execution counts start at 1).
    assert got_a["cwd"] == str(run_a / "work" / "nb")
    assert [c.execution_count for c in cells_a] == [1, 2]
    assert got_a["data"] == "x\n41\n" and got_b["leaked"] is False
    # The pool kernel's view is protected like a runner's own (for root: a read-only mount).
    assert got_a["wrote"] in ("OSError", "PermissionError")
    assert tree_digest(cached_checkout) == before
    wait_for(lambda: not alive(record["pid"]), 30, "the adopted kernel to exit")
    pool.withdraw()
    # Its parent removes the connection file once it sees the kernel gone (within a second).
    pool_dir = runs_dir / local_pool.POOL_DIR
    wait_for(lambda: not list(pool_dir.glob("*.connection")), 10, "the connection file removed")


def _parent_module(pid: int) -> str:
    cmdline = psutil.Process(pid).parent().cmdline()
    return cmdline[cmdline.index("-m") + 1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "prewarm, parent",
    [
        (local_pool.prewarm, local_pool.POOL_MODULE),
        (local_kernelserver.prewarm, local_kernelserver.MODULE),
    ],
    ids=["pool processes", "kernel server"],
)
def test_kernels_nobody_claims_expire_or_are_withdrawn(runs_dir, tmp_path, prewarm, parent):
    prewarm(runs_dir, 1, idle_seconds=1.0)
    [expiring] = offered(runs_dir, 1)
    assert _parent_module(expiring["pid"]) == parent
    wait_for(lambda: not alive(expiring["pid"]), 30, "the idle kernel to stop")
    pool_dir = runs_dir / local_pool.POOL_DIR
    wait_for(lambda: not list(pool_dir.glob("*.json")), 10, "the offer to go")

    pool = prewarm(runs_dir, 2, idle_seconds=600)
    records = offered(runs_dir, 2)
    pool.withdraw()
    for record in records:
        wait_for(lambda r=record: not alive(r["pid"]), 30, "a withdrawn kernel to stop")
    assert not pool.offers()
    wait_for(lambda: not list(pool_dir.glob("*.connection")), 10, "connection files removed")


@pytest.mark.slow
def test_a_kernel_of_another_name_or_outside_the_cache_is_not_adopted(
    cached_checkout, runs_dir, tmp_path
):
    pool = local_pool.prewarm(runs_dir, 1, kernel_name="python3", idle_seconds=600)
    try:
        [record] = offered(runs_dir, 1)
        assert local_pool.claim(runs_dir, "ir", cached_checkout, tmp_path / "x.json") is None
        if os.geteuid() == 0:  # only a kernel whose read-only mount covers the checkout
            outside = tmp_path / "elsewhere"
            outside.mkdir()
            assert local_pool.claim(runs_dir, "python3", outside, tmp_path / "x.json") is None
        taken = local_pool.claim(runs_dir, "python3", cached_checkout, tmp_path / "x.json")
        assert taken == record and (tmp_path / "x.json").is_file()
        assert local_pool.claim(runs_dir, "python3", cached_checkout, tmp_path / "y.json") is None
    finally:
        pool.withdraw()
        os.killpg(record["pid"], 9) if alive(record["pid"]) else None
    deadline = time.monotonic() + 30
    while alive(record["pid"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(record["pid"])
