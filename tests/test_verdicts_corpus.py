"""Verdicts on a corpus of notebooks nobody here wrote, compared with papermill's own.

The corpus holds what third-party notebooks bring: papermill's error markers committed from
an earlier run, cells tagged `raises-exception` and `skip-execution`, a loop that never ends,
an R kernelspec, a kernelspec stored as a string, nbformat 3, invalid JSON, a missing path,
notebooks queued behind slow ones with the default maxParallel, and a notebook that needs a
package only another virtual environment has. One `notebookops run` (the command a user
types, real kernels, 2 workers) runs them all; papermill's API then runs each file on its own
in the same environment, and every verdict (state, cell of the committed notebook, ename)
must match papermill's, or differ for a reason README.md documents (DIFFERENCES below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from tests.gitrepos import file_url, make_repo

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}
LOOP_SECONDS = 3  # the never-ending notebook's timeoutMinutes, in seconds
MARKER = "papermill-error-cell-tag"


def _nb(*cells: Any, kernelspec: Any = KERNELSPEC) -> str:
    nb = json.loads(nbformat.writes(new_notebook(cells=list(cells))))
    if kernelspec is not None:
        nb["metadata"]["kernelspec"] = kernelspec  # written as JSON: nbformat refuses a string
    return json.dumps(nb, indent=1)


def _code(source: str, *tags: str) -> Any:
    cell = new_code_cell(source)
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def _marker(text: str) -> Any:
    cell = new_markdown_cell(text)
    cell.metadata["tags"] = [MARKER]
    return cell


def _v3(*sources: str) -> str:
    """nbformat 3 as IPython 2 wrote it: worksheets, a heading cell, and no kernelspec."""
    cells = [{"cell_type": "heading", "level": 1, "metadata": {}, "source": "Old notebook"}]
    cells += [
        {
            "cell_type": "code",
            "collapsed": False,
            "input": s,
            "language": "python",
            "metadata": {},
            "outputs": [],
        }
        for s in sources
    ]
    return json.dumps(
        {
            "metadata": {"name": ""},
            "nbformat": 3,
            "nbformat_minor": 0,
            "worksheets": [{"cells": cells, "metadata": {}}],
        }
    )


SLEEPER = _nb(_code("import time\ntime.sleep(2)\nprint('done')"))

FILES: dict[str, str] = {
    "plain/pass.ipynb": _nb(new_markdown_cell("# ok"), _code("x = 40 + 2\nprint(x)")),
    "plain/fail.ipynb": _nb(
        new_markdown_cell("# fails"),
        _code("x = 1"),
        _code("raise ValueError('bad input\\nsecond line of the message')"),
        _code("print('never')"),
    ),
    # Saved from an earlier failed papermill run: two markers committed, which papermill
    # strips before it runs (the executed copy is two cells shorter than the repo's).
    "markers/saved-failure.ipynb": _nb(
        _marker("An Exception was encountered at 'In [2]'."),
        new_markdown_cell("# report"),
        _code("divisor = 1", "parameters"),
        _code("ratio = 10 / divisor"),
        _marker("Execution using papermill encountered an exception here and stopped:"),
        _code("assert ratio < 5, f'ratio {ratio} too high'"),
    ),
    "tags/expected-error.ipynb": _nb(
        _code("1 / 0", "raises-exception"),
        _code("print('went on')"),
    ),
    "tags/real-error-later.ipynb": _nb(
        _code("{}['missing']", "raises-exception"),
        _code("raise SystemError('skipped, never runs')", "skip-execution"),
        _code("undefined_name + 1"),
    ),
    "loop/forever.ipynb": _nb(_code("x = 0"), _code("while True:\n    x += 1")),
    "kernels/r.ipynb": _nb(
        _code("print('hello from R')"),
        kernelspec={"name": "ir", "display_name": "R", "language": "R"},
    ),
    "kernels/string-kernelspec.ipynb": _nb(_code("print(1)"), kernelspec="python3"),
    "formats/v3.ipynb": _v3("a = 1", "print(a)", "a.missing_attribute"),
    "kernels/no-kernelspec.ipynb": _nb(_code("print('no kernelspec', x)"), kernelspec=None),
    "formats/broken.ipynb": '{"cells": [{"cell_type": "code",',
    "env/needs-package.ipynb": _nb(
        _code("import nbops_corpus_only\nprint(nbops_corpus_only.VALUE)")
    ),
    "env/needs-package-default.ipynb": _nb(
        _code("import nbops_corpus_only\nprint(nbops_corpus_only.VALUE)")
    ),
    "queue/slow-1.ipynb": SLEEPER,
    "queue/slow-2.ipynb": SLEEPER,
    "queue/slow-3.ipynb": SLEEPER,
}
MISSING = "plain/not-committed.ipynb"

# Where notebookops and papermill disagree on purpose; README.md ("Verdicts compared with
# papermill") gives the same reasons. Keys: notebook -> the fields that differ.
DIFFERENCES: dict[str, dict[str, tuple[Any, Any]]] = {
    # nbclient (and nbmake) let a raises-exception cell fail and go on; papermill's final check
    # still fails the notebook at that cell.
    "tags/expected-error.ipynb": {
        "state": ("succeeded", "failed"),
        "cellIndex": (None, 0),
        "ename": (None, "ZeroDivisionError"),
    },
    "tags/real-error-later.ipynb": {"cellIndex": (2, 0), "ename": ("NameError", "KeyError")},
    # Every limit is reported as TimeoutError; papermill lets nbclient's CellTimeoutError out.
    "loop/forever.ipynb": {"ename": ("TimeoutError", "CellTimeoutError")},
    # The clone names what is wrong with the file instead of a parser's or reader's exception.
    "kernels/string-kernelspec.ipynb": {"ename": ("InvalidNotebook", "AttributeError")},
    "formats/broken.ipynb": {"ename": ("InvalidNotebook", "NotJSONError")},
    MISSING: {"ename": ("NotebookNotFound", "FileNotFoundError")},
    # A notebook that names no kernel runs on python3; papermill refuses to guess.
    "kernels/no-kernelspec.ipynb": {
        "state": ("succeeded", "failed"),
        "ename": (None, "ValueError"),
    },
}


@pytest.fixture(scope="module")
def other_env(tmp_path_factory) -> Path:
    """A virtual environment with a package the app's own Python lacks.

    `--without-pip` and a .pth file that adds the app's site-packages (for ipykernel) make it in
    a fraction of a second, with no download: the package is a module written here.
    """
    env = tmp_path_factory.mktemp("other-env") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "app-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (site / "nbops_corpus_only.py").write_text("VALUE = 'only in the other environment'\n")
    return env


def _message(repo: Path, env: Path) -> dict[str, Any]:
    notebooks: list[Any] = sorted(
        p
        for p in FILES
        if not p.startswith(("loop/", "env/needs-package.", "markers/", "kernels/no-"))
    )
    notebooks += [
        {"path": "loop/forever.ipynb", "timeoutMinutes": LOOP_SECONDS / 60},
        {"path": "markers/saved-failure.ipynb", "parameters": {"divisor": 1}},
        {"path": "env/needs-package.ipynb", "python": str(env)},
        # No kernelspec, no language: the parameters are still written in the kernel's.
        {"path": "kernels/no-kernelspec.ipynb", "parameters": {"x": 1}},
        MISSING,
    ]
    for index, entry in enumerate(notebooks):
        if isinstance(entry, str) and entry.startswith("queue/"):
            # Each runs in 2 s; queued behind the others with the default maxParallel, they
            # must not be timed out by the time they waited.
            notebooks[index] = {"path": entry, "timeoutMinutes": 0.1}
    return {
        "repository": {"url": file_url(repo), "ref": "main"},
        "notebooks": notebooks,
        "compute": {"backend": "local"},
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, other_env) -> dict[str, Any]:
    """`notebookops run` on the whole corpus and, meanwhile, papermill on each file."""
    root = tmp_path_factory.mktemp("corpus")
    gitconfig = root / "gitconfig"
    gitconfig.write_text("")
    repo = make_repo(root / "repo", FILES)
    body = root / "body.json"
    body.write_text(json.dumps(_message(repo, other_env)))
    env = {
        **os.environ,
        "GIT_CONFIG_GLOBAL": str(gitconfig),
        "NOTEBOOKOPS_CHECKOUT_DIR": str(root / "checkouts"),
    }
    command = [sys.executable, "-m", "notebookops", "run", str(body)]
    command += ["--out", str(root / "out"), "--workers", "2", "-q"]
    started = time.monotonic()
    with open(root / "stdout", "w+") as stdout:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True
        )
        try:
            theirs = _papermill_all(repo, other_env, root / "papermill")
            returncode = process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
        stdout.seek(0)
        output = stdout.read()
    return {
        "repo": repo,
        "out": root / "out",
        "returncode": returncode,
        "stdout": output,
        "summary": json.loads((root / "out" / "summary.json").read_text()),
        "papermill": theirs,
        "seconds": time.monotonic() - started,
    }


def _ours(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for nb in summary["notebooks"]:
        error = nb.get("error") or {}
        out[nb["path"]] = {
            "state": nb["state"],
            "cellIndex": error.get("cellIndex"),
            "ename": error.get("ename") if nb["state"] != "succeeded" else None,
        }
    return out


def _committed_index(path: Path, source: str) -> int | None:
    """Where `source` is in the committed notebook (as nbformat 4): papermill's own numbering
    counts the cells it inserted, so its error is located by the failing cell's text."""
    nb = nbformat.reads(path.read_text(), as_version=4)
    matches = [i for i, cell in enumerate(nb.cells) if cell.source == source]
    assert len(matches) <= 1, f"ambiguous cell source in {path}"
    return matches[0] if matches else None


def _papermill(repo: Path, rel: str, out: Path, **options: Any) -> dict[str, Any]:
    """papermill's verdict on one notebook, in this process (sequentially: cwd is a chdir).

    A kernel that fails to start before any cell ran (a port race with the run going on
    beside it) is started once more, as the local runner does: that is noise, not a verdict.
    """
    for attempt in (1, 2):
        verdict, start_failure = _papermill_once(repo / rel, out, options)
        if not start_failure or attempt == 2:
            return verdict
    raise AssertionError("unreachable")


def _papermill_once(
    source: Path, out: Path, options: dict[str, Any]
) -> tuple[dict[str, Any], bool]:
    import papermill
    from papermill.exceptions import PapermillExecutionError
    from zmq.error import ZMQBaseError

    started: list[str] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        papermill.execute_notebook(
            str(source),
            str(out),
            progress_bar=False,
            cwd=str(source.parent),
            on_cell_start=lambda cell, cell_index: started.append(cell.source),
            **options,
        )
    except PapermillExecutionError as exc:
        verdict = {
            "state": "failed",
            "cellIndex": _committed_index(source, exc.source),
            "ename": exc.ename,
        }
        return verdict, False
    except Exception as exc:  # papermill lets everything else out as it is
        timed_out = isinstance(exc, TimeoutError)
        cell = _committed_index(source, started[-1]) if started and timed_out else None
        verdict = {
            "state": "timedOut" if timed_out else "failed",
            "cellIndex": cell,
            "ename": type(exc).__name__,
        }
        start_errors = (ZMQBaseError, RuntimeError, TimeoutError, ConnectionError)
        return verdict, not started and isinstance(exc, start_errors)
    return {"state": "succeeded", "cellIndex": None, "ename": None}, False


def _papermill_all(repo: Path, other_env: Path, out: Path) -> dict[str, dict[str, Any]]:
    # papermill runs the other environment's notebook on a kernelspec for that interpreter,
    # the way a person would register it (`python -m ipykernel install --name ...`).
    jupyter = out / "jupyter"
    spec = jupyter / "kernels" / "corpus-env"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [
                    str(other_env / "bin" / "python"),
                    "-m",
                    "ipykernel_launcher",
                    "-f",
                    "{connection_file}",
                ],
                "display_name": "corpus env",
                "language": "python",
            }
        )
    )
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(jupyter)
    try:
        verdicts = {}
        for rel in sorted(FILES):
            options: dict[str, Any] = {}
            if rel.startswith("queue/") and rel != "queue/slow-1.ipynb":
                continue  # the same file as slow-1: the same verdict, 2 s each saved
            if rel == "loop/forever.ipynb":
                options["execution_timeout"] = LOOP_SECONDS
            if rel == "markers/saved-failure.ipynb":
                options["parameters"] = {"divisor": 1}
            if rel == "kernels/no-kernelspec.ipynb":
                options["parameters"] = {"x": 1}
            if rel == "env/needs-package.ipynb":
                options["kernel_name"] = "corpus-env"
            if rel == "formats/v3.ipynb":
                # nbformat 3 names no kernel: papermill refuses it unless told one, as `-k`
                # does (notebookops runs it on python3, like kernels/no-kernelspec.ipynb).
                options["kernel_name"] = "python3"
            verdicts[rel] = _papermill(repo, rel, out / rel, **options)
        for n in (2, 3):
            verdicts[f"queue/slow-{n}.ipynb"] = verdicts["queue/slow-1.ipynb"]
        verdicts[MISSING] = _papermill(repo, MISSING, out / MISSING)
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old
    return verdicts


def test_every_verdict_matches_papermill_or_differs_for_a_documented_reason(corpus):
    papermill_verdicts = corpus["papermill"]
    ours = _ours(corpus["summary"])
    assert set(ours) == set(papermill_verdicts), corpus["stdout"][-3000:]
    report = []
    for path in sorted(ours):
        mine, theirs = dict(ours[path]), dict(papermill_verdicts[path])
        for field, (expected_ours, expected_theirs) in DIFFERENCES.get(path, {}).items():
            # A documented difference must still be the one documented.
            if (mine[field], theirs[field]) == (expected_ours, expected_theirs):
                mine[field] = theirs[field] = "documented"
        if mine != theirs:
            report.append(f"{path}: ours {ours[path]} papermill {papermill_verdicts[path]}")
    assert not report, "\n".join(report)


def test_the_corpus_run_reflects_its_bad_notebooks_and_says_why(corpus):
    summary, out = corpus["summary"], corpus["out"]
    by_path = {nb["path"]: nb for nb in summary["notebooks"]}
    assert summary["result"] == "failed" and summary["errors"] == []
    assert corpus["returncode"] == 1
    # Every notebook has a verdict; the bad ones say what is wrong and how to fix it.
    assert by_path["kernels/r.ipynb"]["error"]["ename"] == "NoSuchKernel"
    assert "No such kernel named 'ir'" in by_path["kernels/r.ipynb"]["message"]
    assert "compute.kernel" in by_path["kernels/r.ipynb"]["message"]
    assert "compute.python" in by_path["kernels/r.ipynb"]["message"]
    assert "metadata.kernelspec 'python3'" in by_path["kernels/string-kernelspec.ipynb"]["message"]
    assert "invalid JSON" in by_path["formats/broken.ipynb"]["message"]
    assert "not found at commit" in by_path[MISSING]["message"]
    env_nb = by_path["env/needs-package.ipynb"]
    assert env_nb["state"] == "succeeded"
    executed = nbformat.read(out / env_nb["outputNotebook"], as_version=4)
    assert "only in the other environment" in executed.cells[0].outputs[0]["text"]
    default_nb = by_path["env/needs-package-default.ipynb"]
    assert default_nb["error"]["ename"] == "ModuleNotFoundError"
    # The multi-line value is one line in the table, whole in the summary.
    failing = by_path["plain/fail.ipynb"]
    assert failing["error"]["evalue"] == "bad input\nsecond line of the message"
    assert "ValueError: bad input … (cell 2)" in corpus["stdout"]
    # The executed copy of a notebook whose tagged cell raised carries no red markers that
    # would blame that cell; the one that failed later points at the real failure.
    expected = nbformat.read(
        out / by_path["tags/expected-error.ipynb"]["outputNotebook"], as_version=4
    )
    assert not [c for c in expected.cells if MARKER in c.metadata.get("tags", [])]
    later = nbformat.read(
        out / by_path["tags/real-error-later.ipynb"]["outputNotebook"], as_version=4
    )
    tags = [c.metadata.get("tags", []) for c in later.cells]
    assert [MARKER in t for t in tags] == [True, False, False, True, False]
    assert later.cells[4].source == "undefined_name + 1"
