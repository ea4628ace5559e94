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
import json
import os
import sys
from pathlib import Path
from typing import Any

ENTRY_FILE_NAME = "_notebookops_papermill_entry.py"
JOB_FIELDS = ("notebook", "output", "parameters", "kernel")


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


def _kernel_name(job: dict[str, Any], notebook: Path) -> str:
    if job.get("kernel"):
        return str(job["kernel"])
    try:
        with open(notebook, encoding="utf-8") as handle:
            metadata = json.load(handle).get("metadata") or {}
    except (OSError, ValueError, AttributeError):
        metadata = {}
    # Notebooks saved without a kernelspec are Python notebooks in practice.
    return (metadata.get("kernelspec") or {}).get("name") or "python3"


def _ensure_kernelspec(name: str) -> None:
    """Notebooks saved on a laptop name kernels ("conda-env-x-py") the job's image lacks; point
    such a name at this Python, as azureml-contrib-notebook's runner does."""
    from jupyter_client.kernelspec import KernelSpecManager

    if name in KernelSpecManager().find_kernel_specs():
        return
    from ipykernel.kernelspec import install

    install(user=True, kernel_name=name, display_name=name)
    print(f"installed kernelspec {name!r} for {sys.executable}", flush=True)


def run(output_dir: str, job: dict[str, Any]) -> int:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook = Path(job["notebook"]).resolve()
    output = Path(output_dir).resolve() / job["output"]
    output.parent.mkdir(parents=True, exist_ok=True)
    kernel = _kernel_name(job, notebook)
    _ensure_kernelspec(kernel)
    try:
        papermill.execute_notebook(
            str(notebook),
            str(output),
            parameters=job.get("parameters") or {},
            kernel_name=kernel,
            # The notebook sees its own folder, as in Jupyter and in the local backend.
            cwd=str(notebook.parent),
            log_output=True,
            progress_bar=False,
        )
    except PapermillExecutionError as exc:
        # The output notebook is saved with the failing cell; a non-zero exit fails the job.
        print(f"notebook failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}", flush=True)
        return 1
    return 0


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
