"""The one way a backend copies a checkout for a run: without `.git`, symlinks kept, and
writable, because a run (and azureml-contrib-notebook's runner config) writes next to its
notebook while the cached checkout it comes from must stay untouched."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path, PurePosixPath

from notebookops.compute.base import PermanentBackendError, RunSpec


def resolve_source(spec: RunSpec) -> tuple[Path, str]:
    """The folder a run copies (the checkout, or `compute.sourceDirectory` in it) and the
    notebook's POSIX path inside that folder; bad paths are permanent errors naming them."""
    checkout = Path(spec.checkout)
    if not checkout.is_absolute() or not checkout.is_dir():
        raise PermanentBackendError(
            f"checkout must be an existing absolute folder, got {spec.checkout!r}"
        )
    source_dir = spec.compute.get("sourceDirectory") or "."
    notebook = PurePosixPath(spec.notebook)
    for name, value in (
        ("notebook", notebook),
        ("compute.sourceDirectory", PurePosixPath(source_dir)),
    ):
        if value.is_absolute() or ".." in value.parts:
            raise PermanentBackendError(
                f"{name} must be a path inside the checkout, got {str(value)!r}"
            )
    try:
        inner = notebook.relative_to(PurePosixPath(source_dir))
    except ValueError:
        raise PermanentBackendError(
            f"notebook {spec.notebook!r} is not inside compute.sourceDirectory {source_dir!r}"
        ) from None
    source_root = checkout / source_dir
    if not (source_root / inner).is_file():
        raise PermanentBackendError(
            f"notebook {spec.notebook!r} does not exist in the checkout at commit {spec.commit!r}"
        )
    return source_root, inner.as_posix()


def stage_copy(source: Path, dest: Path) -> None:
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    # A read-only checkout gives a read-only copy; the run owns its copy, so make it writable.
    for folder, dirs, names in os.walk(dest):
        for name in [*dirs, *names]:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode) and not mode & stat.S_IWUSR:
                os.chmod(path, mode | stat.S_IWUSR)
