"""How a run sees the checkout, at a cost that grows with the notebook, not the repository.

The checkout cache (`repo.py`) holds one checkout per (url, commit), shared by every run.

- **Local runs** get a *view* (`stage_view`): real, private directories mirroring the checkout
  (without `.git`), each file a symlink to the shared checkout's file. A notebook reads any file
  of the repository by its relative path, creates and replaces files next to itself (the
  directories are its own: a replaced or deleted link changes only its view), and cannot write
  *through* a link: the shared files are made read-only, and where permission bits do not bind
  (root) the runner calls `protect_view` before it starts the kernel, which mounts the shared
  checkout read-only in the runner's own mount namespace (the kernel inherits it). Where that is
  impossible the view is replaced by a private copy, the old O(repository) cost, rather than
  letting one notebook change what another sees.
- **Large folders are linked whole** where that read-only mount protects them (root): a folder
  that is not on the way to the notebook and holds more than `LINK_WHOLE_ABOVE` files in its
  tree becomes one symlink to the shared folder. A view then costs the entries of the folders
  on the notebook's way plus the small folders, not one inode per file of the repository: on a
  filesystem where creating an inode costs a millisecond (seen here), 50 notebooks in a
  repository of 200 data files spent 10 s making links. Such a folder reads the same, is
  read-only (a write there fails with "Read-only file system"), and `os.walk` does not descend
  into it unless asked to follow links. Without root the shared folders stay writable to their
  owner, so every folder stays real.
- **Azure ML** gets one snapshot per (commit, sourceDirectory) (`shared_snapshot`): the folder the
  SDK uploads is the same path with the same content for every notebook of a commit, built once
  (hard links where the filesystem allows, else a copy), so the code is uploaded once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from notebookops.compute.base import PermanentBackendError, RunSpec

_IGNORED = frozenset({".git"})
_WRITE_BITS = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH


def resolve_source(spec: RunSpec) -> tuple[Path, str]:
    """The folder a run sees (the checkout, or `compute.sourceDirectory` in it) and the
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


# ------------------------------------------------------------------------------- local views


@dataclass(frozen=True)
class ViewStats:
    files: int
    directories: int
    linked_folders: int = 0


# A folder off the notebook's way with more files than this in its tree is linked whole (root).
LINK_WHOLE_ABOVE = 64


def stage_view(source: Path, dest: Path, notebook: str | None = None) -> ViewStats:
    """Build `dest` as a private view of the shared folder `source`: real directories, a symlink
    per file, the repository's own symlinks copied as they are, `.git` left out. The shared files
    are made read-only on the way (once per checkout in practice: later walks find them so).

    With `notebook` (its POSIX path inside `source`) and root, folders off its way that hold
    more than LINK_WHOLE_ABOVE files are one link each (see the module's docstring)."""
    source = Path(source).resolve()
    dest = Path(dest)
    dest.mkdir(parents=True)
    on_way: set[str] = set()
    sizes: dict[str, int] = {}
    if notebook is not None and os.geteuid() == 0:
        parts = PurePosixPath(notebook).parts[:-1]
        on_way = {"/".join(parts[:i]) for i in range(len(parts) + 1)}
        sizes = _tree_sizes(source)
    files = directories = linked = 0
    pending = [(source, dest, "")]
    while pending:
        src_dir, dst_dir, rel = pending.pop()
        with os.scandir(src_dir) as entries:
            for entry in entries:
                if entry.name in _IGNORED and src_dir == source:
                    continue
                target = os.path.join(dst_dir, entry.name)
                if entry.is_symlink():
                    os.symlink(os.readlink(entry.path), target)
                elif entry.is_dir(follow_symlinks=False):
                    inner = f"{rel}/{entry.name}" if rel else entry.name
                    if inner not in on_way and sizes.get(inner, 0) > LINK_WHOLE_ABOVE:
                        os.symlink(entry.path, target)
                        linked += 1
                        continue
                    os.mkdir(target)
                    directories += 1
                    pending.append((Path(entry.path), Path(target), inner))
                else:
                    mode = entry.stat(follow_symlinks=False).st_mode
                    if mode & _WRITE_BITS:
                        os.chmod(entry.path, stat.S_IMODE(mode) & ~_WRITE_BITS)
                    os.symlink(entry.path, target)
                    files += 1
    return ViewStats(files=files, directories=directories, linked_folders=linked)


_SIZES: dict[str, dict[str, int]] = {}


def _tree_sizes(source: Path) -> dict[str, int]:
    """Files (and links) in the tree of every folder of `source` (POSIX path inside it ->
    count), `.git` left out; no stat calls. Kept per checkout: checkouts of the cache never
    change, and an outdated count could only make a folder real that might have been linked
    (a view's content is always read afresh)."""
    key = str(source)
    if key in _SIZES:
        return _SIZES[key]
    folders: list[tuple[str, list[str], int]] = []
    for folder, dirs, names in os.walk(source):
        rel = os.path.relpath(folder, source).replace(os.sep, "/")
        rel = "" if rel == "." else rel
        if not rel:
            dirs[:] = [d for d in dirs if d not in _IGNORED]
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        folders.append((rel, [d for d in dirs if d not in links], len(names) + len(links)))
    sizes: dict[str, int] = {}
    for rel, subdirs, own in reversed(folders):  # children before their parents
        sizes[rel] = own + sum(sizes.get(f"{rel}/{d}" if rel else d, 0) for d in subdirs)
    if len(_SIZES) >= 8:
        _SIZES.pop(next(iter(_SIZES)))
    _SIZES[key] = sizes
    return sizes


def stage_copy(source: Path, dest: Path) -> None:
    """A private, writable copy of `source` without `.git` (symlinks kept): the fallback view."""
    shutil.copytree(source, dest, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    # The shared checkout's files are read-only; the run owns its copy, so make it writable.
    for folder, dirs, names in os.walk(dest):
        for name in [*dirs, *names]:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode) and not mode & stat.S_IWUSR:
                os.chmod(path, mode | stat.S_IWUSR)


def protect_view(view: Path, source: Path) -> str:
    """Make sure nothing run from here can write through `view`'s links into `source`.

    Call it in the process that then starts the kernel, while it is single-threaded: for root
    it enters a private mount namespace in which `source` is read-only. Returns how the shared
    files are protected: "permissions" (not root: the read-only bits bind), "read-only mount",
    or "private copy" (root without mount privileges: `view` was replaced by a copy).
    """
    if os.geteuid() != 0:
        return "permissions"
    try:
        _mount_read_only(Path(source).resolve())
        return "read-only mount"
    except OSError as exc:
        print(
            f"cannot mount the shared checkout read-only ({exc}); running on a private copy",
            flush=True,
        )
    shutil.rmtree(view)
    stage_copy(source, view)
    return "private copy"


_CLONE_NEWNS = 0x00020000
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


def _mount_read_only(path: Path) -> None:
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "mount namespaces need Linux")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)

    def check(result: int, what: str) -> None:
        if result != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"{what}: {os.strerror(code)}")

    check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Private first, so the read-only bind mount does not propagate back to the host.
    check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    raw = os.fsencode(path)
    check(libc.mount(raw, raw, None, _MS_BIND | _MS_REC, None), f"bind mount {path}")
    check(
        libc.mount(None, raw, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None),
        f"remount {path} read-only",
    )


# ---------------------------------------------------------------------------- Azure ML snapshots


@dataclass(frozen=True)
class Snapshot:
    """The folder to upload for one (commit, sourceDirectory) and a notebook's path inside it."""

    path: Path
    notebook: str
    key: str


def snapshot_key(spec: RunSpec, extra_files: Mapping[str, Path] | None = None) -> str:
    """Same for every notebook of one (commit, sourceDirectory, extra files' names and bytes)."""
    digest = hashlib.sha256()
    source_dir = PurePosixPath(spec.compute.get("sourceDirectory") or ".").as_posix()
    digest.update(f"{spec.commit}\0{source_dir}\0".encode())
    for name in sorted(extra_files or {}):
        digest.update(f"{name}\0".encode())
        digest.update(hashlib.sha256(Path(extra_files[name]).read_bytes()).digest())
    return digest.hexdigest()[:24]


def shared_snapshot(
    spec: RunSpec, root: Path, extra_files: Mapping[str, Path] | None = None
) -> Snapshot:
    """The upload folder of `spec`'s (commit, sourceDirectory) under `root`, built on first use.

    `extra_files` (name in the snapshot -> file) are added at its top, e.g. the entry script
    every job runs. Every notebook of the commit gets the same path with the same bytes, so the
    SDK's content hash and upload happen once; the folder is shared: never write into it. Safe
    across threads and processes: it is built in a temporary folder and renamed into place.
    """
    source_root, inner = resolve_source(spec)
    extra = dict(extra_files or {})
    for name in extra:
        if PurePosixPath(name).name != name or name in (".", ".."):
            raise PermanentBackendError(f"extra file name must be a plain file name, got {name!r}")
    key = snapshot_key(spec, extra)
    final = Path(root) / "snapshots" / key
    if final.is_dir():
        return Snapshot(path=final, notebook=inner, key=key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        shutil.copytree(
            source_root,
            tmp / "tree",
            symlinks=True,
            ignore=shutil.ignore_patterns(*_IGNORED),
            copy_function=_link_or_copy,
        )
        for name, path in extra.items():
            shutil.copyfile(path, tmp / "tree" / name)
        try:
            os.rename(tmp / "tree", final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise  # otherwise another submit built the same snapshot first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Snapshot(path=final, notebook=inner, key=key)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links refused: a copy costs more but works
        shutil.copy2(src, dst)


def remove_snapshot(snapshot: Snapshot) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(snapshot.path)
