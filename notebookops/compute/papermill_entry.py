"""Runs one notebook with papermill inside an Azure ML command job.

The `azureml` backend copies this file into the job's code folder and runs
`python _notebookops_papermill_entry.py --output-dir ${{outputs.notebook}} --job <base64 JSON>`.
Everything about the run (notebook path, parameters, kernel) travels as base64 JSON because
the command line is a shell string in which Azure ML also substitutes `${{...}}`: base64's
alphabet cannot break either, and JSON keeps every value's type (papermill's `-p` guesses
types and `-b` parses YAML, which turns `1e-05` into a string).

It needs only the standard library and papermill (with ipykernel) on the compute, and must
stay importable without papermill so the backend can share its encoding.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

ENTRY_FILE_NAME = "_notebookops_papermill_entry.py"
RESULT_FILE = "_notebookops_result.json"  # read back by the backend when the job fails early
JOB_FIELDS = ("notebook", "output", "parameters", "kernel", "environment")
REQUIRED_PACKAGES = ("papermill", "ipykernel")
EXIT_NOT_RUN = 3  # the notebook was not started; RESULT_FILE says why


def encode_job(job: dict[str, Any]) -> str:
    """Base64 of the job's JSON; `decode_job` gives back an equal dict."""
    text = json.dumps(job, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return base64.b64encode(text.encode("ascii")).decode("ascii")


def decode_job(value: str) -> dict[str, Any]:
    try:
        job = json.loads(base64.b64decode(value.encode("ascii"), validate=True))
    except (ValueError, UnicodeError) as exc:
        raise ValueError(f"--job is not base64 JSON: {exc}") from None
    if not isinstance(job, dict) or not isinstance(job.get("notebook"), str):
        raise ValueError(f"--job must be a JSON object with a 'notebook' string, got {job!r}")
    if not isinstance(job.get("output"), str) or "/" in job["output"]:
        raise ValueError(f"--job field 'output' must be a file name, got {job.get('output')!r}")
    if not isinstance(job.get("parameters", {}), dict):
        raise ValueError(f"--job field 'parameters' must be an object, got {job['parameters']!r}")
    return job


def _kernelspec(job: dict[str, Any], notebook: Path) -> tuple[str, str | None]:
    """(kernel name, language or None). `compute.kernel` wins; a kernelspec saved as a plain
    string is that kernel's name; notebooks saved without one are Python notebooks in practice."""
    try:
        with open(notebook, encoding="utf-8") as handle:
            metadata = json.load(handle).get("metadata") or {}
    except (OSError, ValueError, AttributeError):
        metadata = {}
    if not isinstance(metadata, dict):
        metadata = {}
    spec = metadata.get("kernelspec")
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict):
        spec = {}
    info = metadata.get("language_info")
    language = spec.get("language") or (info.get("name") if isinstance(info, dict) else None)
    language = str(language).strip().lower() if language else None
    name = job.get("kernel") or spec.get("name") or "python3"
    return str(name), language


def _report(output_dir: Path, reason: str, message: str, **details: Any) -> int:
    """Leave why the notebook did not run where the backend downloads outputs from."""
    output_dir.mkdir(parents=True, exist_ok=True)
    result = {"ok": False, "reason": reason, "message": message, **details}
    (output_dir / RESULT_FILE).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"notebookops: {message}", file=sys.stderr, flush=True)
    return EXIT_NOT_RUN


def _environment(job: dict[str, Any]) -> str:
    return str(job.get("environment") or "the job's environment")


def missing_packages() -> list[str]:
    return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]


def _ensure_kernelspec(name: str, language: str | None) -> str | None:
    """None when kernel `name` can run; else why not. A Python notebook saved on a laptop names
    a kernel ("conda-env-x-py") the image lacks: that name is pointed at this Python, as
    azureml-contrib-notebook's runner does, and said so. A kernel of another language is never
    replaced by Python: its cells would fail or, worse, mean something else."""
    from jupyter_client.kernelspec import KernelSpecManager

    if name in KernelSpecManager().find_kernel_specs():
        return None
    if language not in (None, "python"):
        return (
            f"the notebook's kernel {name!r} (language {language}) is not installed in the "
            "environment, and notebookops does not run it on Python; add that kernel to the "
            "environment's image, or set compute.kernel to a kernel the image has"
        )
    from ipykernel.kernelspec import install

    install(user=True, kernel_name=name, display_name=name)
    print(f"notebookops: kernel {name!r} is not installed; registered it for {sys.executable}")
    return None


def run(output_dir: str, job: dict[str, Any]) -> int:
    out = Path(output_dir).resolve()
    missing = missing_packages()
    if missing:
        return _report(
            out,
            "missingPackages",
            f"the environment {_environment(job)} lacks {' and '.join(missing)}, which "
            f"notebookops needs to run notebooks; add {' '.join(missing)} to its pip "
            "dependencies and register a new version",
            packages=missing,
            environment=job.get("environment"),
            python=sys.executable,
        )
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook = Path(job["notebook"]).resolve()
    output = out / job["output"]
    output.parent.mkdir(parents=True, exist_ok=True)
    kernel, language = _kernelspec(job, notebook)
    refused = _ensure_kernelspec(kernel, language)
    if refused:
        return _report(out, "missingKernel", refused, kernel=kernel, language=language)
    try:
        papermill.execute_notebook(
            str(notebook),
            str(output),
            parameters=job.get("parameters") or {},
            kernel_name=kernel,
            # Given, papermill need not read the kernelspec, which may be a bare string.
            language=language or "python",
            # The notebook sees its own folder, as in Jupyter and in the local backend.
            cwd=str(notebook.parent),
            log_output=True,
            progress_bar=False,
        )
    except PapermillExecutionError as exc:
        failure = _real_failure(output)
        if failure is None:
            print(f"allowed error in a cell tagged raises-exception: {exc.ename}", flush=True)
            return 0
        # The output notebook is saved with the failing cell; a non-zero exit fails the job.
        print(f"notebook failed: {failure}", flush=True)
        return 1
    return 0


def _real_failure(output: Path) -> str | None:
    """`ename: evalue` of the first error not in a cell tagged raises-exception, else None.

    nbclient lets such a cell fail and goes on, but papermill's final check still fails the
    notebook at it; the local backend follows nbclient (notebookops.notebook_errors), so the
    job does too. When every error was allowed, papermill's red markers are removed."""
    try:
        nb = json.loads(output.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "the executed notebook could not be read"
    marker = "papermill-error-cell-tag"
    for cell in nb.get("cells") or []:
        tags = set((cell.get("metadata") or {}).get("tags") or [])
        if cell.get("cell_type") != "code" or {"raises-exception", "skip-execution", marker} & tags:
            continue
        clean_exit = False
        for out in cell.get("outputs") or []:
            if out.get("output_type") != "error":
                continue
            if out.get("ename") == "SystemExit" and str(out.get("evalue", "")) in ("", "0"):
                clean_exit = True
                continue
            return f"{out.get('ename')}: {out.get('evalue')}"
        papermill = (cell.get("metadata") or {}).get("papermill") or {}
        if not clean_exit and papermill.get("exception"):
            return "CellExecutionError"
    nb["cells"] = [
        c
        for c in nb.get("cells") or []
        if marker not in ((c.get("metadata") or {}).get("tags") or [])
    ]
    output.write_text(json.dumps(nb, indent=1), encoding="utf-8")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--job", required=True, help="base64 JSON: notebook, output, parameters")
    args = parser.parse_args(argv)
    try:
        job = decode_job(args.job)
    except ValueError as exc:
        parser.error(str(exc))
    return run(args.output_dir, job)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
