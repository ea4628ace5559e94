"""A process of its own that renders pages for its parent, warmed up before the first notebook
ends (`python -m notebookops.render_worker`, started by `Worker`).

Why a process: nbconvert's import and its first page cost about a second of CPU (its regular
expressions, templates and JSON schema are compiled once per process). In the app's process
that second holds the GIL that the orchestration, the activities and devhost need, and it
falls right after the first notebook finishes; here it runs on another core while the
notebooks run, and the parent's first page takes what a later page takes (milliseconds).

The worker renders exactly what notebookops.render_page renders in-process; the parent masks
the secrets it knows (the worker knows none) and replays the worker's log records and warnings
as its own, so pages, logs and their filtering stay what they were. Frames on stdin/stdout: an
8-byte big-endian length, then UTF-8 JSON. The worker ends when its stdin closes, that is when
its parent ends, however it ends.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import IO, Any

MODULE = "notebookops.render_worker"
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_HEADER = struct.Struct(">Q")
_CLOSE_SECONDS = 2.0
# A worker that does not answer in time is ended and the page is rendered in-process: a hung
# worker must never hold the monitor (and the pipeline waiting on it) for good. Generous: a
# notebook with large outputs takes long to render anywhere.
_READY_SECONDS = 120.0
_PAGE_SECONDS = 600.0

# Rendered once at start-up: it compiles what every page needs (templates, nbconvert's CSS
# selectors, the ipython3 lexer, the notebook schema), so the first real page does not.
_WARM_UP = {
    "nbformat": 4,
    "nbformat_minor": 5,
    "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python", "pygments_lexer": "ipython3"},
    },
    "cells": [
        {"cell_type": "markdown", "id": "m", "metadata": {}, "source": "# warm-up"},
        {
            "cell_type": "code",
            "id": "c",
            "metadata": {},
            "execution_count": 1,
            "source": "print(1)",
            "outputs": [{"output_type": "stream", "name": "stdout", "text": "1\n"}],
        },
    ],
}


class WorkerGone(Exception):
    """The worker cannot render (it never started, failed its start-up, or died)."""


class RenderFailed(Exception):
    """The worker could not render this notebook; the text is the one rendering here gives."""


def _send(stream: IO[bytes], message: Any) -> None:
    data = json.dumps(message).encode("utf-8")
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    """The next message, or None at the end of the stream."""
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        return None
    return json.loads(data)


def _receive_within(fd: int, seconds: float) -> Any:
    """The next message read from the pipe `fd` (unbuffered), None at its end; TimeoutError
    when it is not complete within `seconds`."""
    import select
    import time

    deadline = time.monotonic() + seconds

    def read(count: int) -> bytes:
        data = b""
        while len(data) < count:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no answer within {seconds:g} s")
            chunk = os.read(fd, count - len(data))
            if not chunk:
                break
            data += chunk
        return data

    header = read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(header)
    data = read(size)
    return json.loads(data) if len(data) == size else None


class Worker:
    """The parent's side: starts the process at once and waits for it only at the first page.
    Not thread-safe: notebookops.render calls it under its lock."""

    def __init__(self, command: list[str] | None = None) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
            command or [sys.executable, "-m", MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            # Not in the terminal's process group: Ctrl-C stops the parent, and the parent's
            # end (stdin closed) stops the worker.
            start_new_session=True,
        )
        self._ready = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def render(self, nb: dict[str, Any], path: str, state: str | None) -> str:
        """The page, unredacted. Raises RenderFailed for a notebook that cannot be rendered,
        WorkerGone when the worker cannot answer (it is then closed)."""
        process = self._process
        if process is None:
            raise WorkerGone("closed")
        assert process.stdin is not None and process.stdout is not None
        try:
            # Read unbuffered, with a deadline: the pipe is never read through its buffer.
            out = process.stdout.fileno()
            if not self._ready:
                hello = _receive_within(out, _READY_SECONDS)
                if not isinstance(hello, dict) or not hello.get("ready"):
                    why = hello.get("error") if isinstance(hello, dict) else None
                    raise WorkerGone(why or f"exit code {process.wait()}")
                self._ready = True
            _send(process.stdin, {"nb": nb, "path": path, "state": state})
            answer = _receive_within(out, _PAGE_SECONDS)
        except TimeoutError as exc:
            self.close(kill=True)
            raise WorkerGone(f"the render worker did not answer: {exc}") from None
        except (OSError, ValueError) as exc:
            self.close()
            raise WorkerGone(str(exc)) from None
        except WorkerGone:
            self.close()
            raise
        if not isinstance(answer, dict):
            self.close()
            raise WorkerGone("it ended while rendering")
        _replay(answer.get("logs") or [], answer.get("warnings") or [])
        if "error" in answer:
            raise RenderFailed(answer["error"])
        return answer["html"]

    def close(self, wait: bool = True, kill: bool = False) -> None:
        """End the worker (its stdin closes). `wait=False` at the parent's exit: the worker
        ends on its own, and the parent need not sit through its interpreter's shutdown.
        `kill`: a worker that stopped answering is killed outright."""
        process, self._process = self._process, None
        if process is None:
            return
        if kill:
            process.kill()
        for stream in (process.stdin, process.stdout):
            try:
                if stream:
                    stream.close()
            except OSError:
                pass
        if not wait:
            return
        try:
            process.wait(timeout=_CLOSE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _replay(logs: list[Any], caught: list[Any]) -> None:
    """The worker's log records and warnings, emitted here as if rendering had happened here."""
    for name, level, message in logs:
        logging.getLogger(name).log(level, "%s", message)
    for category, message in caught:
        warnings.warn(message, _warning_class(category), stacklevel=2)


def _warning_class(name: str) -> type[Warning]:
    """The warning's own class (`module.QualName`, e.g. nbformat's MissingIDFieldWarning), so
    filters on it still apply; UserWarning if this process cannot have it."""
    module, _, qualname = name.rpartition(".")
    try:
        kind: Any = importlib.import_module(module or "builtins")
        for part in qualname.split("."):
            kind = getattr(kind, part)
    except (ImportError, AttributeError):
        return UserWarning
    return kind if isinstance(kind, type) and issubclass(kind, Warning) else UserWarning


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[list[Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append([record.name, record.levelno, record.getMessage()])


def _qualified(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _render(job: dict[str, Any], collect: _Collect) -> dict[str, Any]:
    from notebookops import render_page

    collect.records = []
    with warnings.catch_warnings(record=True) as caught:
        try:
            answer: dict[str, Any] = {
                "html": render_page.page(job["nb"], job["path"], job["state"])
            }
        except Exception as exc:  # the parent reports it as rendering here would have
            answer = {"error": str(exc)}
    answer["logs"] = collect.records
    answer["warnings"] = [[_qualified(type(w.message)), str(w.message)] for w in caught]
    return answer


def main() -> int:
    frames_in, frames_out = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not land among the frames
    collect = _Collect()
    root = logging.getLogger()
    root.addHandler(collect)
    root.setLevel(logging.INFO)
    try:
        from notebookops import render_page

        render_page.page(_WARM_UP, "warm-up.ipynb", "succeeded")
    except Exception as exc:
        _send(frames_out, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    try:
        _send(frames_out, {"ready": True})
        while (job := _receive(frames_in)) is not None:
            _send(frames_out, _render(job, collect))
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
