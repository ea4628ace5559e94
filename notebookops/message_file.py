"""A message body read from a file by `run` and `validate`, the same way for both.

The command line stands in for the pipeline on one machine, so a relative
``repository.url`` means a folder next to the message file, and local repositories are
allowed (the deployed app never allows them). Keeping this in one place is what makes
`validate FILE` and `run FILE` agree about the same file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "UsageError",
    "command_line_settings",
    "inspect_message_file",
    "read_message_file",
    "read_properties",
    "resolve_local_url",
]

ALLOW_LOCAL_REPOS_ENV = "NOTEBOOKOPS_ALLOW_LOCAL_REPOS"
DEFAULT_BACKEND_ENV = "NOTEBOOKOPS_DEFAULT_BACKEND"


class UsageError(Exception):
    """A problem with the command line or its files: reported on stderr, exit code 2."""


def _read_json_object(path: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path} must hold a JSON object")
    return data


def read_properties(path: str | None) -> dict[str, Any] | None:
    """The application properties a --properties file stands in for (Service Bus message)."""
    return None if path is None else _read_json_object(path, "properties file")


def command_line_settings() -> None:
    """What `run` and `validate` both assume: local repositories allowed, local backend."""
    os.environ[ALLOW_LOCAL_REPOS_ENV] = "1"
    os.environ.setdefault(DEFAULT_BACKEND_ENV, "local")


def inspect_message_file(path: str | Path, properties: dict[str, Any] | None) -> tuple[Any, ...]:
    """(request, callback, errors) for a message file, as `run` sees it; OSError if unreadable.

    Local repositories are allowed without touching the environment, so calling this
    in-process (tests, `validate`) changes no setting of the caller.
    """
    from notebookops.request import inspect_message

    return inspect_message(read_message_file(path), properties=properties, allow_local_repos=True)


def read_message_file(path: str | Path) -> bytes:
    """The body of a message file, with a relative repository.url made absolute."""
    body_file = Path(path)
    return resolve_local_url(body_file.read_bytes(), body_file.resolve().parent)


def resolve_local_url(body: bytes, base: Path) -> bytes:
    """A relative repository.url in a message file means a folder next to that file.

    Anything that is not plainly a relative path (a scheme, an absolute path, an scp-like
    ``user@host:path``, a leading ``-``) is left for validation to judge.
    """
    from notebookops.datacontract import decode_body

    try:
        data = json.loads(decode_body(body))
    except ValueError:
        return body  # let validation report it
    repo = data.get("repository") if isinstance(data, dict) else None
    url = repo.get("url") if isinstance(repo, dict) else None
    if (
        isinstance(url, str)
        and url
        and "://" not in url
        and not url.startswith(("/", "-"))
        and "@" not in url.split("/")[0]
        and ":" not in url.split("/")[0]
        and url.isprintable()
    ):
        repo["url"] = str((base / url).resolve())
        return json.dumps(data).encode()
    return body
