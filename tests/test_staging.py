"""Staging: a run's view of the checkout costs links, not bytes, and stays isolated.

The properties a notebook relies on, each checked on real files (and, end to end, on real
kernels through the local backend): it reads any file of the repository by its relative path,
writes next to itself, and never changes what another notebook or a later run sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import nbformat
import pytest

from notebookops.compute import RunSpec, get_backend, run_key, staging
from notebookops.compute.base import PermanentBackendError
from tests.test_compute_local import finish, runs_dir, tree_digest, write_notebook

__all__ = ["runs_dir"]  # the fixture, imported for its side effects on the environment

ROOT = Path(__file__).resolve().parents[1]


def disk_bytes(root: Path) -> int:
    """Bytes allocated on disk under `root`, symlinks and folders included (du's count)."""
    total = os.lstat(root).st_blocks * 512
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / ".git" / "objects").mkdir(parents=True)
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    (root / "data" / "table.csv").write_text("x\n41\n")
    (root / "nb").mkdir()
    (root / "nb" / "notes.txt").write_text("original notes\n")
    (root / "nb" / "deep" / "er").mkdir(parents=True)
    (root / "nb" / "deep" / "er" / "leaf.txt").write_text("leaf\n")
    (root / "nb" / "table-link.csv").symlink_to("../data/table.csv")
    return root


def test_a_view_reads_every_file_through_links_and_costs_no_file_bytes(checkout, tmp_path):
    view = tmp_path / "view"
    started = time.perf_counter()
    stats = staging.stage_view(checkout, view)
    elapsed = time.perf_counter() - started

    assert stats.files == 4 and stats.directories == 4
    assert not (view / ".git").exists()
    assert tree_digest(view) == {k: v for k, v in tree_digest(checkout).items() if ".git" not in k}
    # The repository's own symlink stays a relative symlink and resolves inside the view.
    assert os.readlink(view / "nb" / "table-link.csv") == "../data/table.csv"
    assert (view / "nb" / "table-link.csv").read_text() == "x\n41\n"
    # 8 MB of data in the checkout; the view is folders and symlinks only.
    assert disk_bytes(view) < 64 * 1024, disk_bytes(view)
    assert elapsed < 1.0
    # The shared files are read-only from now on.
    assert not os.stat(checkout / "data" / "big.bin").st_mode & 0o222


PROBE = textwrap.dedent(
    """
    import json, os, subprocess, sys
    from pathlib import Path
    from notebookops.compute.staging import protect_view
    view, source = Path(sys.argv[1]), Path(sys.argv[2])
    result = {"protection": protect_view(view, source)}
    os.chdir(view / "nb")
    def attempt(name, fn):
        try:
            fn()
            result[name] = "ok"
        except OSError as exc:
            result[name] = type(exc).__name__
    attempt("overwrite", lambda: open("../data/table.csv", "w").write("changed\\n"))
    attempt("append", lambda: open("notes.txt", "a").write("more\\n"))
    attempt("os.open", lambda: os.write(os.open("../data/big.bin", os.O_WRONLY), b"x"))
    shell = subprocess.run(["sh", "-c", "echo shell > ../data/table.csv"], capture_output=True)
    result["shell"] = shell.returncode
    attempt("new file", lambda: Path("result.txt").write_text("mine\\n"))
    attempt("new folder", lambda: (Path("made") / "x.txt").parent.mkdir())
    def replace():
        Path("notes.tmp").write_text("replaced notes\\n")
        os.replace("notes.tmp", "notes.txt")
    attempt("replace", replace)
    attempt("delete", lambda: os.remove("deep/er/leaf.txt"))
    result["notes"] = Path("notes.txt").read_text()
    print(json.dumps(result))
    """
)


def probe(view: Path, source: Path, script: str = PROBE) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", script, str(view), str(source)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_writes_through_a_view_never_reach_the_shared_checkout_nor_another_view(checkout, tmp_path):
    before = tree_digest(checkout)
    first, second = tmp_path / "first", tmp_path / "second"
    staging.stage_view(checkout, first)
    staging.stage_view(checkout, second)

    result = probe(first, checkout)

    expected = "read-only mount" if os.geteuid() == 0 else "permissions"
    assert result["protection"] == expected
    # Writing into a shared file fails loudly (read-only file system, or permission denied)...
    for name in ("overwrite", "append", "os.open"):
        assert result[name] in ("OSError", "PermissionError"), result
    assert result["shell"] != 0
    # ...while everything a notebook does next to itself works, privately.
    for name in ("new file", "new folder", "replace", "delete"):
        assert result[name] == "ok", result
    assert result["notes"] == "replaced notes\n"
    assert (first / "nb" / "result.txt").read_text() == "mine\n"

    assert tree_digest(checkout) == before
    assert (second / "nb" / "notes.txt").read_text() == "original notes\n"
    assert (second / "data" / "table.csv").read_text() == "x\n41\n"
    assert not (second / "nb" / "result.txt").exists()
    assert (second / "nb" / "deep" / "er" / "leaf.txt").exists()
    # The protection lived in the probe's own mount namespace: this process may still write.
    probe_file = tmp_path / "after.txt"
    probe_file.write_text("ok")
    assert probe_file.read_text() == "ok"


def test_without_mount_privileges_root_gets_a_private_copy_instead(checkout, tmp_path, monkeypatch):
    """Replaces staging's own mount call (our code, not an SDK) with the failure a container
    without CAP_SYS_ADMIN gives; permission bits do not bind root, so the view must become a
    copy rather than let writes reach the shared checkout."""
    view = tmp_path / "view"
    staging.stage_view(checkout, view)

    def refused(path):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(staging, "_mount_read_only", refused)
    monkeypatch.setattr(staging.os, "geteuid", lambda: 0)
    assert staging.protect_view(view, checkout) == "private copy"
    assert not (view / "data" / "table.csv").is_symlink()
    (view / "data" / "table.csv").write_text("changed\n")
    assert (checkout / "data" / "table.csv").read_text() == "x\n41\n"
    assert not (view / ".git").exists()


@pytest.fixture
def wide_checkout(tmp_path: Path) -> Path:
    """A repository with one folder of many small files beside the notebooks' folders."""
    root = tmp_path / "wide"
    (root / ".git").mkdir(parents=True)
    many = root / "data" / "many"
    many.mkdir(parents=True)
    for i in range(staging.LINK_WHOLE_ABOVE + 1):
        (many / f"part-{i:03d}.csv").write_text(f"{i}\n")
    (root / "outputs").mkdir()
    (root / "outputs" / ".gitkeep").write_text("")
    (root / "nb").mkdir()
    (root / "nb" / "a.ipynb").write_text("{}")
    (root / "top.ipynb").write_text("{}")
    return root


def entries(view: Path) -> int:
    return sum(len(dirs) + len(names) for _, dirs, names in os.walk(view))


WIDE_PROBE = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from notebookops.compute.staging import protect_view
    view, source = Path(sys.argv[1]), Path(sys.argv[2])
    protect_view(view, source)
    result = {"read": (view / "data/many/part-007.csv").read_text()}
    for name, path in (("linked", "data/many/mine.csv"), ("small", "outputs/mine.csv")):
        try:
            (view / path).write_text("mine")
            result[name] = "ok"
        except OSError as exc:
            result[name] = exc.strerror
    print(json.dumps(result))
    """
)


def test_a_large_folder_off_the_notebooks_way_costs_one_link_and_stays_read_only(
    wide_checkout, tmp_path
):
    """Where root's read-only mount protects the shared checkout, a folder of more than
    LINK_WHOLE_ABOVE files that is not on the way to the notebook is linked whole: the view no
    longer costs an inode per file of the repository. Without root every folder stays real."""
    before = tree_digest(wide_checkout)
    view = tmp_path / "view"
    stats = staging.stage_view(wide_checkout, view, "nb/a.ipynb")
    # Every file reads the same through the view by its relative path, however it is linked.
    committed = {k: v for k, v in tree_digest(wide_checkout).items() if ".git" not in k}
    assert {rel: hashlib.sha256((view / rel).read_bytes()).hexdigest() for rel in committed} == (
        committed
    )
    assert not (view / ".git").exists()
    if os.geteuid() != 0:
        assert stats.linked_folders == 0 and not (view / "data").is_symlink()
        return
    assert stats.linked_folders == 1
    # The outermost folder off the notebook's way that is large is the link.
    assert (view / "data").is_symlink()
    assert not (view / "outputs").is_symlink() and not (view / "nb").is_symlink()
    assert entries(view) < 12, sorted(os.listdir(view))

    result = probe(view, wide_checkout, WIDE_PROBE)
    assert result == {"read": "7\n", "linked": "Read-only file system", "small": "ok"}
    assert tree_digest(wide_checkout) == before
    assert (view / "outputs" / "mine.csv").read_text() == "mine"


def test_the_folders_on_the_way_to_the_notebook_stay_real_however_large(wide_checkout, tmp_path):
    inside = staging.stage_view(wide_checkout, tmp_path / "inside", "data/many/part-001.csv")
    assert not (tmp_path / "inside" / "data" / "many").is_symlink()
    assert inside.linked_folders == 0
    # A notebook at the top: its own folder is real, a large subfolder of it is still linked.
    top = staging.stage_view(wide_checkout, tmp_path / "top", "top.ipynb")
    assert (tmp_path / "top" / "data").is_symlink() == (os.geteuid() == 0)
    assert (top.linked_folders == 1) == (os.geteuid() == 0)
    # Removing a view removes its links, never what they point to.
    shutil.rmtree(tmp_path / "top")
    assert len(os.listdir(wide_checkout / "data" / "many")) == staging.LINK_WHOLE_ABOVE + 1


@pytest.mark.slow
def test_notebooks_on_real_kernels_share_nothing_they_write(checkout, runs_dir, tmp_path):
    """Two notebooks of one run and a later run of the first one, on the local backend."""
    write_notebook(
        checkout / "nb" / "writer.ipynb",
        "import json, os, hashlib\n"
        "size = len(open('../data/big.bin', 'rb').read())\n"
        "value = int(open('../data/table.csv').read().split()[1]) + 1\n"
        "open('written-by-run.txt', 'w').write('scratch')\n"
        "try:\n"
        "    open('../data/table.csv', 'w').write('changed')\n"
        "    overwrite = 'allowed'\n"
        "except OSError as exc:\n"
        "    overwrite = type(exc).__name__\n"
        "open('notes.tmp', 'w').write('mine')\n"
        "os.replace('notes.tmp', 'notes.txt')\n"
        "print(json.dumps({'size': size, 'value': value, 'overwrite': overwrite,"
        " 'notes': open('notes.txt').read(), 'leaf': open('deep/er/leaf.txt').read()}))",
    )
    write_notebook(
        checkout / "nb" / "reader.ipynb",
        "import json, os, time\n"
        "deadline = time.time() + 60\n"
        f"while not os.path.exists({str(tmp_path / 'writer-done')!r}) and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        "print(json.dumps({'table': open('../data/table.csv').read(),"
        " 'notes': open('notes.txt').read(), 'scratch': os.path.exists('written-by-run.txt')}))",
    )
    before = tree_digest(checkout)
    backend = get_backend("local")

    def spec(notebook: str, instance: str) -> RunSpec:
        return RunSpec(
            run_key=run_key(instance, notebook),
            instance_id=instance,
            notebook=notebook,
            checkout=str(checkout),
            commit="0123abc",
            compute={"backend": "local"},
        )

    def printed(handle) -> dict:
        out = backend.fetch_output(handle, tmp_path / f"{handle.run_id}.ipynb")
        return json.loads(nbformat.read(out, as_version=4).cells[-1].outputs[0].text)

    reader = backend.submit(spec("nb/reader.ipynb", "inst-1"))
    writer = backend.submit(spec("nb/writer.ipynb", "inst-1"))
    assert finish(backend, writer).state == "succeeded"
    (tmp_path / "writer-done").touch()
    assert finish(backend, reader).state == "succeeded"
    later = backend.submit(spec("nb/writer.ipynb", "inst-2"))
    assert finish(backend, later).state == "succeeded"

    wrote = printed(writer)
    assert wrote["size"] == 8 * 1024 * 1024 and wrote["value"] == 42
    assert wrote["overwrite"] in ("OSError", "PermissionError")
    assert wrote["notes"] == "mine" and wrote["leaf"] == "leaf\n"
    assert printed(reader) == {"table": "x\n41\n", "notes": "original notes\n", "scratch": False}
    assert printed(later) == {**wrote}  # the later run saw the repository, not the first run
    assert tree_digest(checkout) == before
    # Each run folder holds links and outputs, not another 8 MB of data.
    for handle in (reader, writer, later):
        assert disk_bytes(Path(handle.data["runDir"]) / "work") < 256 * 1024


# -- Azure ML snapshots ------------------------------------------------------------------------


def ml_spec(checkout: Path, notebook: str, commit: str = "0123abc", **compute) -> RunSpec:
    return RunSpec(
        run_key=run_key("inst", notebook),
        instance_id="inst",
        notebook=notebook,
        checkout=str(checkout),
        commit=commit,
        compute={"backend": "azureml", **compute},
    )


def test_one_snapshot_per_commit_and_source_directory(checkout, tmp_path):
    (checkout / "nb" / "b.ipynb").write_text("{}")
    (checkout / "nb" / "a.ipynb").write_text("{}")
    entry = tmp_path / "entry.py"
    entry.write_text("print('entry')\n")
    root = tmp_path / "work"

    a = staging.shared_snapshot(ml_spec(checkout, "nb/a.ipynb"), root, {"entry.py": entry})
    b = staging.shared_snapshot(ml_spec(checkout, "nb/b.ipynb"), root, {"entry.py": entry})
    assert a.path == b.path and a.key == b.key
    assert (a.notebook, b.notebook) == ("nb/a.ipynb", "nb/b.ipynb")
    assert (a.path / "entry.py").read_text() == "print('entry')\n"
    assert not (a.path / ".git").exists()
    assert (a.path / "data" / "table.csv").read_text() == "x\n41\n"
    # Hard links on one filesystem: the snapshot costs no file bytes either.
    big = (a.path / "data" / "big.bin").stat()
    assert big.st_ino == (checkout / "data" / "big.bin").stat().st_ino

    sub = staging.shared_snapshot(
        ml_spec(checkout, "nb/a.ipynb", sourceDirectory="nb"), root, {"entry.py": entry}
    )
    other = staging.shared_snapshot(ml_spec(checkout, "nb/a.ipynb", commit="fed987"), root)
    assert len({a.path, sub.path, other.path}) == 3
    assert sub.notebook == "a.ipynb" and not (sub.path / "data").exists()
    entry.write_text("print('changed entry')\n")  # new entry script bytes: a new snapshot
    changed = staging.shared_snapshot(ml_spec(checkout, "nb/a.ipynb"), root, {"entry.py": entry})
    assert changed.path != a.path
    assert sorted(p.name for p in (root / "snapshots").iterdir()) == sorted(
        {a.key, sub.key, other.key, changed.key}
    )


def test_concurrent_submits_build_the_snapshot_once(checkout, tmp_path):
    root = tmp_path / "work"
    results, errors = [], []

    def build(name: str) -> None:
        try:
            results.append(staging.shared_snapshot(ml_spec(checkout, name), root))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    (checkout / "nb" / "a.ipynb").write_text("{}")
    threads = [threading.Thread(target=build, args=("nb/a.ipynb",)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({r.path for r in results}) == 1
    assert [p.name for p in (root / "snapshots").iterdir()] == [results[0].key]  # no leftovers
    staging.remove_snapshot(results[0])
    assert not results[0].path.exists()


def test_snapshot_refuses_bad_paths_naming_them(checkout, tmp_path):
    (checkout / "nb" / "a.ipynb").write_text("{}")
    with pytest.raises(PermanentBackendError, match=r"'nb/missing.ipynb' does not exist"):
        staging.shared_snapshot(ml_spec(checkout, "nb/missing.ipynb"), tmp_path)
    with pytest.raises(PermanentBackendError, match=r"compute.sourceDirectory.*'\.\./up'"):
        staging.shared_snapshot(ml_spec(checkout, "nb/a.ipynb", sourceDirectory="../up"), tmp_path)
    with pytest.raises(PermanentBackendError, match=r"extra file name.*'sub/entry.py'"):
        staging.shared_snapshot(
            ml_spec(checkout, "nb/a.ipynb"), tmp_path, {"sub/entry.py": checkout / "x"}
        )
