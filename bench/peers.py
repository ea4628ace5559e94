"""The peer tools a user would pick instead, each in its own venv with only what it needs.

A benchmark against nbmake run inside this project's venv measures nbmake plus our pytest
plugins and configuration; a user who picked nbmake has a venv with nbmake, pytest-xdist and
ipykernel only. So each peer gets a venv created here from its own requirement list, cached
between runs under `NOTEBOOKOPS_BENCH_CACHE` (default `~/.cache/notebookops-bench`), keyed by
that list and the Python version, and rebuilt only when either changes. Peers run with an
environment that names neither this project's venv nor its sources.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import VENV_BIN

PEERS: dict[str, list[str]] = {
    "nbmake": ["nbmake~=1.5", "pytest-xdist~=3.8", "ipykernel~=6.29"],
    "papermill": ["papermill~=2.6", "ipykernel~=6.29"],
}
CACHE_ENV = "NOTEBOOKOPS_BENCH_CACHE"


def _cache() -> Path:
    configured = os.environ.get(CACHE_ENV, "").strip()
    return Path(configured) if configured else Path.home() / ".cache" / "notebookops-bench"


def venv_path(tool: str) -> Path:
    key = hashlib.sha256("\n".join([platform.python_version(), *PEERS[tool]]).encode()).hexdigest()[
        :12
    ]
    return _cache() / f"{tool}-{key}"


def python(tool: str) -> Path:
    """The peer venv's interpreter, creating the venv first when it is not cached."""
    venv = venv_path(tool)
    ready = venv / ".ready"
    if not ready.is_file():
        if venv.exists():
            shutil.rmtree(venv)  # a half-built venv from an interrupted run
        venv.parent.mkdir(parents=True, exist_ok=True)
        print(f"  creating the {tool} venv ({', '.join(PEERS[tool])}) in {venv}", flush=True)
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *PEERS[tool]],
            check=True,
        )
        ready.write_text("\n".join(PEERS[tool]) + "\n")
    return venv / "bin" / "python"


def env(tool: str) -> dict[str, str]:
    """The peer's environment: its venv first on PATH (the `python3` kernelspec ipykernel
    installs runs `python` from PATH), this project's venv and sources nowhere."""
    bin_dir = str(python(tool).parent)
    ours = {str(VENV_BIN), str(Path(sys.executable).parent)}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p not in ours]
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME") and not k.startswith("PYTEST_")
    }
    clean["PATH"] = os.pathsep.join([bin_dir, *path])
    clean["VIRTUAL_ENV"] = str(Path(bin_dir).parent)
    clean.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return clean
