"""Every benchmark of bench/ on a tiny size, so that they cannot rot (`make bench` runs them on
their real sizes). Only the machinery is checked: tiny figures say nothing about the goals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_benchmark_runs_on_a_tiny_size_and_prints_its_table(tmp_path):
    raw = tmp_path / "raw.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--json", str(raw)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    for bench in (
        "1 throughput",
        "2 scale",
        "3 start-up",
        "4 clone",
        "5 one notebook",
        "6 repo size",
        "7 wide",
    ):
        assert f"| {bench}" in out, out[-4000:]
    assert "ratio" in out and "[" in out  # figures with their baseline and spread
    import json

    results = json.loads(raw.read_text())["results"]
    assert set(results) == {
        "startup",
        "scale",
        "clone",
        "single",
        "throughput",
        "repo-size",
        "wide",
    }
    scale = results["scale"]["3"]
    # The observer's largest generation equals what devhost stored for the one-generation
    # baseline, and the real app needed more than one activity per notebook.
    baseline = scale["baseline"][0]
    assert baseline["finished"] is True
    assert baseline["maxHistory"] == baseline["storedHistory"] > 0
    assert scale["ours"][0]["activities"] >= 3
    # The floor includes a kernel start measured in the run; the peers ran from their own
    # venvs, not this project's.
    throughput = results["throughput"]
    assert min(throughput["runs"]["kernel"]) > 0 and throughput["floor"] > 0.1
    assert "(own venv" in out
    wide = results["wide"]
    assert wide["succeeded"] == 3 and 0 < wide["maxHistory"] < 3 * 3 + 100
    assert all(0 < wide["payloads"][k] < 1_000_000 for k in wide["payloads"])
    assert wide["peakRssBytes"] > 10_000_000
    size = results["repo-size"]
    assert size["sizes"]["large"] > 10 * size["sizes"]["small"]
    # Views, not copies: two runs of the 2 MB repository take far less than 2 MB each.
    assert max(size["warm"]["2"]["disks"]["large"]) < 2_000_000
