"""The one way a backend copies a checkout for a run: without `.git`, symlinks kept, and
writable, because a run (and azureml-contrib-notebook's runner config) writes next to its
notebook while the cached checkout it comes from must stay untouched."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path


def stage_copy(source: Path, dest: Path) -> None:
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    # A read-only checkout gives a read-only copy; the run owns its copy, so make it writable.
    for folder, dirs, names in os.walk(dest):
        for name in [*dirs, *names]:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode) and not mode & stat.S_IWUSR:
                os.chmod(path, mode | stat.S_IWUSR)
