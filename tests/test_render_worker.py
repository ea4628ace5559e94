"""Pages rendered by the render worker process, and nbconvert's compiled templates kept on disk.

The worker must be invisible: the same page as rendering in the app's process, the same
secrets masked, the same log records, one bad notebook failing alone, and rendering going on
in the app's process when the worker is gone. The template cache must be used, and a damaged,
stale or unsafe cache must cost only a compile.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import marshal
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_output

from notebookops import redact, render, render_page
from notebookops.render_worker import RenderFailed, Worker
from tests.test_render import _execute, _notebook

ROOT = Path(__file__).resolve().parent.parent
# A 1x1 PNG: nbconvert warns about an image without alternative text.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> dict:
    """A notebook papermill really ran: markdown, output, an image without alt text, an error."""
    tmp = tmp_path_factory.mktemp("worker")
    source = _notebook(
        tmp,
        [
            new_markdown_cell("# Worker <i>page</i>"),
            new_code_cell("print('hello')"),
            new_code_cell(
                "import base64\nfrom IPython.display import Image, display\n"
                f"display(Image(data=base64.b64decode({PNG!r}), format='png'))"
            ),
            new_code_cell("raise KeyError('gone')"),
        ],
    )
    return json.loads(_execute(source).read_text())


@pytest.fixture
def worker():
    started = Worker()
    yield started
    started.close()


@pytest.fixture
def fresh_render(monkeypatch):
    """notebookops.render as a process that has not prewarmed: no worker yet."""
    monkeypatch.setattr(render, "_worker", [])
    monkeypatch.setattr(render, "_held", [])
    yield render
    for started in render._worker:
        if started is not None:
            started.close()


@pytest.mark.slow
def test_the_worker_renders_the_page_this_process_renders(executed, worker):
    here = render_page.page(executed, "nb/worker.ipynb", "failed")
    assert worker.render(executed, "nb/worker.ipynb", "failed") == here
    assert 'id="notebookops-summary"' in here and "KeyError" in here
    # A second page from the same worker, the same as here too.
    assert worker.render(executed, "nb/again.ipynb", None) == render_page.page(
        executed, "nb/again.ipynb", None
    )


@pytest.mark.slow
def test_worker_pages_are_masked_here_and_its_log_records_are_logged_here(
    executed, fresh_render, caplog
):
    secret = "w0rker-s3cret-that-the-worker-never-knew"
    nb = json.loads(json.dumps(executed))
    (hello,) = [c for c in nb["cells"] if "hello" in "".join(c["source"])]
    hello["outputs"][0]["text"] = f"token {secret}\n"
    fresh_render.prewarm()
    (started,) = fresh_render._worker
    redact.register_secret(secret)
    try:
        with caplog.at_level(logging.WARNING):
            page = fresh_render.render_html(nb, "nb/secret.ipynb", "failed")
    finally:
        redact.forget_secret(secret)
    assert started.pid and fresh_render._worker == [started]  # rendered by the worker
    assert secret not in page and "token ***" in page
    alt = [r for r in caplog.records if "Alternative text is missing" in r.getMessage()]
    assert alt and alt[0].name == "traitlets" and alt[0].levelno == logging.WARNING


@pytest.mark.slow
def test_the_worker_s_warnings_are_raised_here_with_their_own_class(fresh_render):
    from nbformat.warnings import MissingIDFieldWarning

    nb = _simple()
    del nb["cells"][0]["id"]  # nbformat warns, in this process or in the worker alike
    nb["nbformat_minor"] = 5
    with pytest.warns(MissingIDFieldWarning):
        render_page.page(json.loads(json.dumps(nb)), "no-id.ipynb", "succeeded")
    fresh_render.prewarm()
    with pytest.warns(MissingIDFieldWarning, match="missing an id"):
        fresh_render.render_html(json.loads(json.dumps(nb)), "no-id.ipynb", "succeeded")
    assert fresh_render._worker[0] is not None  # the worker rendered it


@pytest.mark.slow
def test_a_notebook_the_worker_cannot_render_fails_alone(executed, fresh_render, tmp_path):
    fresh_render.prewarm()
    (started,) = fresh_render._worker
    broken = tmp_path / "broken.ipynb"
    broken.write_text(json.dumps({"cells": "not a list", "metadata": {}}))
    with pytest.raises(Exception) as here:
        render_page.page(json.loads(broken.read_text()), "broken.ipynb", "failed")
    with pytest.raises(RenderFailed) as there:
        started.render(json.loads(broken.read_text()), "broken.ipynb", "failed")
    assert str(there.value) == str(here.value)
    assert "outputHtml" not in fresh_render.describe_output(broken, "broken.ipynb", "failed")
    good = tmp_path / "good.ipynb"
    good.write_text(json.dumps(executed))
    assert fresh_render.describe_output(good, "good.ipynb", "failed")["outputHtml"]
    assert fresh_render._worker == [started]  # the same worker rendered it


@pytest.mark.slow
def test_pages_are_rendered_here_once_the_worker_is_gone(executed, fresh_render, caplog):
    fresh_render.prewarm()
    (started,) = fresh_render._worker
    fresh_render.render_html(executed, "nb/first.ipynb")
    os.kill(started.pid, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="notebookops.render"):
        page = fresh_render.render_html(executed, "nb/after.ipynb", "failed")
    assert page == redact.redact_known(render_page.page(executed, "nb/after.ipynb", "failed"))
    assert any("render worker ended" in r.getMessage() for r in caplog.records)
    assert fresh_render._worker == [None]
    fresh_render.prewarm()  # a gone worker is not started again
    assert fresh_render._worker == [None]


# A worker that says it is ready, then never answers a page (as a hung nbconvert would).
_SILENT_AFTER_READY = (
    "import json, os, struct, sys, time\n"
    "data = json.dumps({'ready': True}).encode()\n"
    "sys.stdout.buffer.write(struct.pack('>Q', len(data)) + data); sys.stdout.flush()\n"
    "time.sleep(300)\n"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, limit",
    [("import time; time.sleep(300)", "_READY_SECONDS"), (_SILENT_AFTER_READY, "_PAGE_SECONDS")],
    ids=["never ready", "silent on a page"],
)
def test_a_worker_that_stops_answering_is_killed_and_the_page_rendered_here(
    executed, fresh_render, monkeypatch, caplog, script, limit
):
    """A hung worker must not hold the monitor, and the pipeline waiting on it, for good."""
    from notebookops import render_worker

    monkeypatch.setattr(render_worker, limit, 1.5)
    silent = Worker([sys.executable, "-c", script])
    fresh_render._worker.append(silent)
    pid = silent.pid
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="notebookops.render"):
        page = fresh_render.render_html(executed, "nb/slow.ipynb", "failed")
    assert time.monotonic() - started < 30
    assert page == redact.redact_known(render_page.page(executed, "nb/slow.ipynb", "failed"))
    assert any("did not answer" in r.getMessage() for r in caplog.records)
    assert fresh_render._worker == [None]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the silent worker was not ended")


@pytest.mark.slow
def test_the_worker_ends_with_its_parent(tmp_path):
    """The worker outlives no parent: not one that returns, not one that is killed."""
    script = (
        "import sys\n"
        "from notebookops import render\n"
        "render.prewarm()\n"
        "print(render._worker[0].pid, flush=True)\n"
        "if sys.argv[1] == 'render':\n"
        "    from nbformat.v4 import new_notebook, new_code_cell\n"
        "    import json, nbformat\n"
        "    nb = json.loads(nbformat.writes(new_notebook(cells=[new_code_cell('1')])))\n"
        "    assert 'notebookops-summary' in render.render_html(nb, 'a.ipynb')\n"
        "else:\n"
        "    import os, signal\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for how in ("render", "killed"):
        done = subprocess.run(
            [sys.executable, "-c", script, how], env=env, capture_output=True, text=True
        )
        pid = int(done.stdout.split()[0])
        assert _gone(pid), f"render worker {pid} still running after its parent ({how}) ended"


def _gone(pid: int, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":  # ended; its parent is gone, so only init can reap it
            return True
        time.sleep(0.1)
    return False


def test_prewarm_starts_one_worker_however_often_it_is_called(fresh_render):
    fresh_render.prewarm()
    fresh_render.prewarm()  # a second submit starts nothing more
    assert len(fresh_render._worker) == 1 and fresh_render._worker[0].pid


def test_a_held_prewarm_waits_for_the_caller_that_holds_it(fresh_render):
    """`notebookops run` holds the prewarm: submit's call starts no worker (its second of CPU
    would compete with the first kernels); the command's own call, once a notebook runs, does."""
    fresh_render.hold_prewarm()
    fresh_render.prewarm()
    assert fresh_render._worker == []
    fresh_render.prewarm(now=True)
    assert len(fresh_render._worker) == 1 and fresh_render._worker[0].pid


# --------------------------------------------------------------------------- template cache


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    folder = tmp_path / "templates"
    monkeypatch.setenv(render_page.CACHE_DIR_SETTING, str(folder))
    render_page.exporter.cache_clear()
    yield folder
    render_page.exporter.cache_clear()


def _simple() -> dict:
    cell = new_code_cell("print(1)", id="simple")
    cell.outputs = [new_output("stream", name="stdout", text="1\n")]
    return json.loads(nbformat.writes(nbformat.v4.new_notebook(cells=[cell])))


def _page_and_compiles() -> tuple[str, int]:
    """A page from a new exporter (as a new process builds), and how many templates Jinja
    compiled for it. Counting wraps the environment's compile on this one instance: Jinja
    offers no hook that says whether a template came from the bytecode cache."""
    render_page.exporter.cache_clear()
    environment = render_page.exporter().environment
    compile_template = environment.compile
    compiled = []

    def counting(*args, **kwargs):
        compiled.append(args[1] if len(args) > 1 else kwargs.get("name"))
        return compile_template(*args, **kwargs)

    environment.compile = counting
    return render_page.page(_simple(), "cached.ipynb", "succeeded"), len(compiled)


def test_compiled_templates_are_kept_on_disk_and_loaded_instead_of_compiled(cache_dir):
    first, compiled = _page_and_compiles()
    assert compiled > 3  # the lab template and the templates it extends
    entries = sorted(cache_dir.iterdir())
    assert len(entries) == compiled
    assert not list(cache_dir.glob("*.tmp"))  # written by rename, nothing half-written left
    assert cache_dir.stat().st_mode & 0o777 == 0o700
    again, compiled_again = _page_and_compiles()
    assert compiled_again == 0 and again == first


def _header_size(data: bytes) -> int:
    """Where the compiled code starts in an entry: after Jinja's magic and the checksum."""
    from jinja2.bccache import bc_magic

    stream = io.BytesIO(data)
    stream.read(len(bc_magic))
    pickle.load(stream)  # noqa: S301 (an entry this test just had Jinja write)
    return stream.tell()


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"",
        lambda data: data[:20],  # the header, half of it
        lambda data: data[: len(data) // 2],  # a truncated body
        lambda data: b"\x00garbage" * 50,
        lambda data: data[:40] + bytes(len(data) - 40),  # the checksum and body zeroed
        lambda data: data[: _header_size(data)] + marshal.dumps("not code"),
    ],
    ids=["empty", "half-header", "truncated", "garbage", "zeroed", "not-code"],
)
def test_a_damaged_cache_entry_is_compiled_again_and_rewritten(cache_dir, damage):
    first, _ = _page_and_compiles()
    for entry in cache_dir.iterdir():
        entry.write_bytes(damage(entry.read_bytes()))
    again, compiled = _page_and_compiles()
    assert again == first and compiled > 0
    _, compiled_after = _page_and_compiles()
    assert compiled_after == 0  # the damaged entries were replaced


def test_a_stale_cache_is_not_loaded(cache_dir, monkeypatch):
    """Entries written by another Jinja, nbconvert or interpreter are keyed apart."""
    _page_and_compiles()
    monkeypatch.setattr(render_page, "_CACHE_FORMAT", "other")
    _, compiled = _page_and_compiles()
    assert compiled > 0


def test_a_cache_folder_others_can_write_to_is_not_used(cache_dir, caplog):
    cache_dir.mkdir(mode=0o700)
    cache_dir.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="notebookops.render_page"):
        page, compiled = _page_and_compiles()
    assert compiled > 0 and not list(cache_dir.iterdir())
    assert "template cache" in caplog.text and "notebookops-summary" in page
    _, compiled = _page_and_compiles()
    assert compiled > 0  # every process compiles, none reads what others could have planted


def test_a_cache_that_cannot_be_written_only_costs_the_compile(cache_dir):
    """Every entry's name taken by a folder: nothing can be read or written there (even by
    root, whom a read-only folder would not stop)."""
    first, _ = _page_and_compiles()
    for entry in cache_dir.iterdir():
        entry.unlink()
        entry.mkdir()
    page, compiled = _page_and_compiles()
    assert page == first and compiled > 0
    assert all(entry.is_dir() for entry in cache_dir.iterdir())
    assert not list(cache_dir.glob("*.tmp"))
