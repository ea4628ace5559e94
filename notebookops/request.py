"""A Service Bus (or HTTP) message -> a validated RunRequest, or every problem with it at once.

The message body is the JSON of design.md "Contracts"; the pipeline callback values come from
the Service Bus application properties, else the body's ``devops`` object, else HTTP headers
(reference/devops-protocol.md §1.2, §6, §7). Error texts name the field and the offending value
and never contain the pipeline token.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import json
import keyword
import math
import os
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from notebookops.datacontract import decode_body
from notebookops.redact import MASK, is_secret_key, redact, redact_mapping

__all__ = [
    "BACKENDS",
    "CALLBACK_PROPERTIES",
    "Callback",
    "ComputeSpec",
    "NotebookEntry",
    "RequestError",
    "RunRequest",
    "inspect_message",
    "notebook_parameters",
    "parse_request",
    "read_callback",
]

CALLBACK_PROPERTIES = (
    "PlanUrl",
    "ProjectId",
    "HubName",
    "PlanId",
    "JobId",
    "TimelineId",
    "TaskInstanceName",
    "TaskInstanceId",
    "AuthToken",
)
BACKENDS = ("local", "azureml", "azureml-v1")
DEFAULT_BACKEND_ENV = "NOTEBOOKOPS_DEFAULT_BACKEND"
ALLOW_LOCAL_REPOS_ENV = "NOTEBOOKOPS_ALLOW_LOCAL_REPOS"

MAX_BODY_BYTES = 256 * 1024  # the Service Bus standard-tier message size
MAX_NOTEBOOKS = 500
MAX_TIMEOUT_MINUTES = 7 * 24 * 60
MAX_PARALLEL = 500
MAX_PARAMETER_DEPTH = 32
_SHOWN_VALUE_CHARS = 80
# The user part of a URL (scheme://USER@host) or of an scp-like or bare git address
# (USER@host:path, USER@host/path), wherever it is echoed in an error.
_URL_USER = re.compile(
    r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#\"]*@|(^|(?<=[\s\"\[,]))[^\s/?#\"]*@(?=[^\s\"/@]+[:/])"
)
MIN_SECRET_CHARS = 4

# Property name -> (Callback attribute, camelCase key in the body's devops object)
_CALLBACK_FIELDS: dict[str, tuple[str, str]] = {
    "PlanUrl": ("plan_url", "planUrl"),
    "ProjectId": ("project_id", "projectId"),
    "HubName": ("hub_name", "hubName"),
    "PlanId": ("plan_id", "planId"),
    "JobId": ("job_id", "jobId"),
    "TimelineId": ("timeline_id", "timelineId"),
    "TaskInstanceName": ("task_instance_name", "taskInstanceName"),
    "TaskInstanceId": ("task_instance_id", "taskInstanceId"),
    "AuthToken": ("auth_token", "authToken"),
    "BuildId": ("build_id", "buildId"),
}
_OPTIONAL_CALLBACK = ("TaskInstanceName", "BuildId")
_GUID_FIELDS = ("ProjectId", "PlanId", "JobId", "TimelineId", "TaskInstanceId")

_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_HUB_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_BUILD_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}", re.IGNORECASE)
# validate and run (notebookops.repo) refuse a short commit id with this same sentence.
FULL_COMMIT_RULE = (
    "must be a full commit id: 40 hex digits (64 for SHA-256); a short id cannot be fetched "
    "from a remote, so give the whole SHA (in Azure DevOps: $(Build.SourceVersion))"
)
_SCP_LIKE = re.compile(r"(?P<user>[A-Za-z0-9._~%-]+)@[A-Za-z0-9][A-Za-z0-9.-]*:[^-].*")
_DRIVE = re.compile(r"[A-Za-z]:")
_KERNEL = re.compile(r"[A-Za-z0-9._-]{1,128}")
_EXPERIMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,255}")
_RESOURCE_GROUP = re.compile(r"[-\w.()]{0,89}[-\w()]", re.ASCII)
_WORKSPACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{2,32}")
_REF_FORBIDDEN = set("~^:?*[\\")


class RequestError(ValueError):
    """A message that cannot run; ``errors`` holds one line per problem, each naming its field."""

    def __init__(self, errors: Iterable[str] | str) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("; ".join(self.errors))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errors,))


@dataclass(frozen=True, repr=False)
class Callback:
    """Where and how to report back to the waiting pipeline task."""

    plan_url: str
    project_id: str
    hub_name: str
    plan_id: str
    job_id: str
    timeline_id: str
    task_instance_id: str
    auth_token: str
    task_instance_name: str | None = None
    build_id: str | None = None

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{attr}={MASK!r}" if attr == "auth_token" else f"{attr}={getattr(self, attr)!r}"
            for attr, _ in _CALLBACK_FIELDS.values()
        )
        return f"Callback({shown})"

    def to_dict(self, *, mask_secrets: bool = False) -> dict[str, str]:
        out: dict[str, str] = {}
        for attr, camel in _CALLBACK_FIELDS.values():
            value = getattr(self, attr)
            if value is not None:
                out[camel] = MASK if mask_secrets and attr == "auth_token" else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Callback:
        problems = _Problems(_token_candidates(data))
        callback = _read_callback(None, data, None, problems)
        if callback is None and not problems.items:
            problems.add("devops", "holds none of the callback values")
        if problems.items:
            raise RequestError(problems.items)
        assert callback is not None
        return callback


def _masked_repr(obj: Any) -> str:
    """The dataclass repr with secret-looking parameter values (password, *_KEY...) masked."""
    parts = []
    for item in fields(obj):
        value = getattr(obj, item.name)
        if item.name == "parameters":
            value = redact_mapping(value)
        parts.append(f"{item.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


@dataclass(frozen=True, repr=False)
class NotebookEntry:
    """One notebook (or glob of notebooks) to run, relative to the repository root."""

    path: str
    parameters: dict[str, Any] = field(default_factory=dict)
    timeout_minutes: float | None = None
    allow_failure: bool = False
    kernel: str | None = None  # replaces compute.kernel/python for this entry (see ComputeSpec)
    python: str | None = None

    __repr__ = _masked_repr

    def to_dict(self) -> str | dict[str, Any]:
        if (
            not self.parameters
            and self.timeout_minutes is None
            and not self.allow_failure
            and self.kernel is None
            and self.python is None
        ):
            return self.path
        out: dict[str, Any] = {"path": self.path, "parameters": copy.deepcopy(self.parameters)}
        if self.timeout_minutes is not None:
            out["timeoutMinutes"] = self.timeout_minutes
        out["allowFailure"] = self.allow_failure
        for key, value in (("kernel", self.kernel), ("python", self.python)):
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True)
class ComputeSpec:
    """Where the notebooks run; target/environment/workspace mean something to Azure ML only.

    `kernel` is a Jupyter kernelspec name (every backend); `python` a Python environment on the
    host (local backend only): the notebook runs on an ipykernel started by that interpreter.
    """

    backend: str
    target: str | None = None
    environment: str | None = None
    experiment: str = "notebook-ci"
    workspace: dict[str, str] | None = None
    source_directory: str | None = None
    kernel: str | None = None
    python: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": self.backend}
        for key, value in (
            ("target", self.target),
            ("environment", self.environment),
            ("experiment", self.experiment),
            ("workspace", dict(self.workspace) if self.workspace is not None else None),
            ("sourceDirectory", self.source_directory),
            ("kernel", self.kernel),
            ("python", self.python),
        ):
            if value is not None:
                out[key] = value
        return out


@dataclass(frozen=True, kw_only=True, repr=False)
class RunRequest:
    """A validated message: what to clone, which notebooks to run where, whom to call back."""

    repository_url: str
    ref: str = "main"
    commit: str | None = None
    notebooks: tuple[NotebookEntry, ...]
    parameters: dict[str, Any] = field(default_factory=dict)
    compute: ComputeSpec = field(default_factory=lambda: ComputeSpec(backend="local"))
    timeout_minutes: float = 60
    fail_fast: bool = False
    max_parallel: int = 20
    # A parameter the notebook's parameters cell does not assign fails that notebook
    # (otherwise it is a warning in its result).
    strict_parameters: bool = False
    callback: Callback | None = None

    __repr__ = _masked_repr

    def to_dict(self, *, mask_secrets: bool = False) -> dict[str, Any]:
        """The design.md message shape; ``mask_secrets`` for anything a person may read."""
        out: dict[str, Any] = {
            "repository": {"url": self.repository_url, "ref": self.ref, "commit": self.commit},
            "notebooks": [entry.to_dict() for entry in self.notebooks],
            "parameters": copy.deepcopy(self.parameters),
            "compute": self.compute.to_dict(),
            "timeoutMinutes": self.timeout_minutes,
            "failFast": self.fail_fast,
            "maxParallel": self.max_parallel,
        }
        if self.strict_parameters:
            out["strictParameters"] = True
        if self.callback is not None:
            out["devops"] = self.callback.to_dict(mask_secrets=mask_secrets)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRequest:
        """Inverse of to_dict; reads no environment, so orchestrators may call it on replay."""
        request, _, errors = _inspect(
            data, None, None, default_backend="local", allow_local_repos=True, size_limit=False
        )
        if errors:
            raise RequestError(errors)
        assert request is not None
        return request


def notebook_parameters(request: RunRequest, entry: NotebookEntry) -> dict[str, Any]:
    """The parameters papermill injects: the global ones overlaid (not merged) by the entry's."""
    return copy.deepcopy({**request.parameters, **entry.parameters})


def parse_request(
    body: bytes | str | Mapping[str, Any],
    *,
    properties: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
    default_backend: str | None = None,
) -> RunRequest:
    """Validate a message; raises RequestError listing every problem found."""
    request, _, errors = inspect_message(
        body, properties=properties, headers=headers, default_backend=default_backend
    )
    if errors:
        raise RequestError(errors)
    assert request is not None
    return request


def inspect_message(
    body: object,
    *,
    properties: Mapping[str, Any] | None = None,
    headers: Mapping[str, Any] | None = None,
    default_backend: str | None = None,
    allow_local_repos: bool | None = None,
) -> tuple[RunRequest | None, Callback | None, list[str]]:
    """Never raises for bad input: (request or None, callback if readable, errors).

    The callback is returned even when the body is invalid so the pipeline can be told
    ``failed`` with the errors instead of waiting for its timeout. ``allow_local_repos``
    None reads the app setting; the command line passes True.
    """
    allow_local = allow_local_repos
    if allow_local is None:
        allow_local = os.environ.get(ALLOW_LOCAL_REPOS_ENV, "").strip() == "1"
    if default_backend is None:
        default_backend = os.environ.get(DEFAULT_BACKEND_ENV, "").strip() or None
        backend_origin = DEFAULT_BACKEND_ENV
    else:
        backend_origin = "default_backend"
    return _inspect(
        body,
        properties,
        headers,
        default_backend=default_backend or "local",
        backend_origin=backend_origin,
        allow_local_repos=allow_local,
        size_limit=True,
    )


def read_callback(
    properties: Mapping[str, Any] | None,
    body: Mapping[str, Any] | None,
    headers: Mapping[str, Any] | None,
) -> Callback | None:
    """Callback values from properties, else the body's devops, else headers; None if absent.

    Raises RequestError when the chosen source is incomplete or holds invalid values.
    """
    devops = body.get("devops") if isinstance(body, Mapping) else None
    problems = _Problems(_token_candidates(properties, devops, headers))
    callback = _read_callback(properties, devops, headers, problems)
    if problems.items:
        raise RequestError(problems.items)
    return callback


# --- problems ------------------------------------------------------------------------------

_NOTHING = object()


class _Problems:
    """Collects error lines; every line is redacted before it is stored."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.items: list[str] = []
        self.secrets: list[str] = list(secrets)

    def add(self, path: str, problem: str, value: object = _NOTHING) -> None:
        line = f"{path}: {problem}"
        if value is not _NOTHING:
            line += f", got {self.show(value)}"
        self.items.append(redact(line, self.secrets))

    def show(self, value: object) -> str:
        if isinstance(value, str):
            text = json.dumps(redact(value, self.secrets), ensure_ascii=False)
        elif value is None or isinstance(value, bool | int | float):
            text = json.dumps(value)
        elif isinstance(value, Mapping | list | tuple):
            try:
                text = json.dumps(value, ensure_ascii=False, default=repr)
            except (ValueError, TypeError, RecursionError):
                text = f"a {type(value).__name__}"
            text = redact(text, self.secrets)
        else:
            text = f"a {type(value).__name__}"
        # A URL with a user part may carry a token in any field, not only repository.url.
        text = _URL_USER.sub(lambda m: (m[1] or "") + MASK + "@", text)
        if len(text) > _SHOWN_VALUE_CHARS:
            text = text[: _SHOWN_VALUE_CHARS - 1] + "…"
        return text


def _join(path: str, key: object) -> str:
    # Keys come from the message too: keep each error on one line and of readable length.
    name = key if isinstance(key, str) else repr(key)
    if not name.isprintable() or len(name) > 60:
        name = json.dumps(name[:60])
    return f"{path}.{name}" if path else name


def _token_candidates(*sources: object) -> list[str]:
    """Every value under a secret-looking key, valid or not, so no error text can echo it."""
    found: list[str] = []
    for source in sources:
        if isinstance(source, Mapping):
            for key, value in source.items():
                if is_secret_key(key) and value is not None:
                    found.append(value if isinstance(value, str) else str(value))
    return found


# --- body loading ---------------------------------------------------------------------------


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {json.dumps(key)} in a JSON object")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_JSON = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)


def _load_body(body: object, problems: _Problems, size_limit: bool) -> Mapping[str, Any] | None:
    if isinstance(body, Mapping):
        if size_limit:
            try:
                size = len(json.dumps(body, default=str).encode("utf-8", errors="replace"))
            except (ValueError, TypeError, RecursionError):
                size = 0  # the field checks report what cannot be serialized
            if size > MAX_BODY_BYTES:
                problems.add(
                    "body", f"is {size} bytes as JSON, more than the {MAX_BODY_BYTES}-byte limit"
                )
                return None
        return body
    if isinstance(body, str):
        body = body.encode("utf-8", errors="surrogatepass")
    if not isinstance(body, bytes | bytearray | memoryview):
        problems.add("body", f"must be bytes, text or a mapping, got a {type(body).__name__}")
        return None
    raw = bytes(body)
    if size_limit and len(raw) > MAX_BODY_BYTES:
        problems.add("body", f"is {len(raw)} bytes, more than the {MAX_BODY_BYTES}-byte limit")
        return None
    try:
        text = decode_body(raw).decode("utf-8")
    except ValueError as exc:
        problems.add("body", str(exc))
        return None
    if not text.strip():
        problems.add("body", "is empty; expected a JSON object")
        return None
    try:
        data = _JSON.decode(text)
    except RecursionError:
        problems.add("body", "JSON is nested too deeply")
        return None
    except ValueError as exc:
        problems.add("body", f"is not valid JSON: {exc}")
        return None
    if not isinstance(data, dict):
        problems.add("body", f"must be a JSON object, got a JSON {_json_type(data)}")
        return None
    return data


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if value is None:
        return "null"
    return "object" if isinstance(value, Mapping) else type(value).__name__


# --- the whole message ----------------------------------------------------------------------

_TOP_KEYS = (
    "repository",
    "notebooks",
    "parameters",
    "compute",
    "timeoutMinutes",
    "failFast",
    "maxParallel",
    "strictParameters",
    "devops",
)


def _inspect(
    body: object,
    properties: Mapping[str, Any] | None,
    headers: Mapping[str, Any] | None,
    *,
    default_backend: str,
    allow_local_repos: bool,
    size_limit: bool,
    backend_origin: str = "default_backend",
) -> tuple[RunRequest | None, Callback | None, list[str]]:
    problems = _Problems(_token_candidates(properties, headers))
    for name, source in (("properties", properties), ("headers", headers)):
        if source is not None and not isinstance(source, Mapping):
            problems.add(name, f"must be a mapping, got a {type(source).__name__}")
    properties = properties if isinstance(properties, Mapping) else None
    headers = headers if isinstance(headers, Mapping) else None

    data = _load_body(body, problems, size_limit)
    devops = data.get("devops") if data is not None else None
    problems.secrets += _token_candidates(devops)
    callback = _read_callback(properties, devops, headers, problems)
    if data is None:
        return None, callback, problems.items

    request = _parse_message(
        data,
        callback,
        problems,
        default_backend=default_backend,
        backend_origin=backend_origin,
        allow_local_repos=allow_local_repos,
    )
    if problems.items:
        return None, callback, problems.items
    return request, callback, []


def _unknown_keys(
    obj: Mapping[Any, Any], allowed: Iterable[str], path: str, problems: _Problems
) -> None:
    allowed = tuple(allowed)
    for key in obj:
        if key not in allowed:
            hint = ""
            if isinstance(key, str) and key in _CALLBACK_FIELDS and not path:
                hint = ' (callback values go in the "devops" object or the message properties)'
            elif isinstance(key, str):
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.75)
                hint = f' (did you mean "{close[0]}"?)' if close else ""
            problems.add(
                _join(path, key), f"unknown field{hint}; allowed fields: {', '.join(allowed)}"
            )


def _parse_message(
    data: Mapping[str, Any],
    callback: Callback | None,
    problems: _Problems,
    *,
    default_backend: str,
    backend_origin: str,
    allow_local_repos: bool,
) -> RunRequest | None:
    _unknown_keys(data, _TOP_KEYS, "", problems)
    url, ref, commit = _parse_repository(data.get("repository"), problems, allow_local_repos)
    notebooks = _parse_notebooks(data.get("notebooks"), problems)
    parameters = _optional(data, "parameters", "", problems, _parameters, {})
    compute = _parse_compute(data.get("compute"), problems, default_backend, backend_origin)
    timeout = _optional(data, "timeoutMinutes", "", problems, _minutes, 60)
    fail_fast = _optional(data, "failFast", "", problems, _boolean, False)
    max_parallel = _optional(data, "maxParallel", "", problems, _max_parallel, 20)
    strict_parameters = _optional(data, "strictParameters", "", problems, _boolean, False)
    _python_needs_local(compute, notebooks, problems)
    if problems.items:
        return None
    return RunRequest(
        repository_url=url,
        ref=ref,
        commit=commit,
        notebooks=notebooks,
        parameters=parameters,
        compute=compute,
        timeout_minutes=timeout,
        fail_fast=fail_fast,
        max_parallel=max_parallel,
        strict_parameters=strict_parameters,
        callback=callback,
    )


_Check = Callable[[Any, str, _Problems], Any]


def _optional(
    obj: Mapping[str, Any], key: str, path: str, problems: _Problems, check: _Check, default: Any
) -> Any:
    value = obj.get(key)
    if value is None:
        return default
    return check(value, _join(path, key), problems)


def _require_object(value: object, path: str, problems: _Problems) -> Mapping[str, Any] | None:
    if value is None:
        problems.add(path, "is required")
        return None
    if not isinstance(value, Mapping):
        problems.add(path, f"must be an object, got a JSON {_json_type(value)}")
        return None
    return value


# --- field checks: each returns the clean value (or None) and adds its problems -------------


def _boolean(value: Any, path: str, problems: _Problems) -> bool | None:
    if not isinstance(value, bool):
        problems.add(path, "must be true or false", value)
        return None
    return value


def _in_range(value: Any, low: float, high: float, *, low_open: bool = False) -> bool:
    """A JSON number within [low, high] (or (low, high]), compared before any float().

    Python ints are unbounded, so float(10**400) would raise OverflowError; a comparison of
    an int with a float is exact and never raises. 1e999 decodes to inf and -0.0 is not
    above 0, so neither passes.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return (low < value if low_open else low <= value) and value <= high


def _minutes(value: Any, path: str, problems: _Problems) -> float | None:
    if not _in_range(value, 0, MAX_TIMEOUT_MINUTES, low_open=True):
        problems.add(
            path, f"must be a positive number of minutes, at most {MAX_TIMEOUT_MINUTES}", value
        )
        return None
    return value


def _max_parallel(value: Any, path: str, problems: _Problems) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PARALLEL:
        problems.add(path, f"must be a whole number from 1 to {MAX_PARALLEL}", value)
        return None
    return value


def _has_control_chars(text: str) -> bool:
    return any(ord(char) < 0x20 or ord(char) == 0x7F for char in text)


def _plain_string(value: Any, path: str, problems: _Problems, max_len: int = 255) -> str | None:
    if not isinstance(value, str) or not value.strip():
        problems.add(path, "must be a non-empty string", value)
        return None
    if len(value) > max_len or _has_control_chars(value):
        problems.add(
            path, f"must be at most {max_len} characters without control characters", value
        )
        return None
    return value


def _parameters(value: Any, path: str, problems: _Problems) -> dict[str, Any] | None:
    if not isinstance(value, Mapping):
        problems.add(path, f"must be an object, got a JSON {_json_type(value)}", value)
        return None
    before = len(problems.items)
    for key in value:
        if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key):
            problems.add(
                _join(path, key),
                "parameter names must be valid Python identifiers (papermill injects them as "
                "variables)",
            )
    # Iterative, so deeply nested input cannot exhaust the interpreter stack.
    stack: list[tuple[Any, str, int]] = [(item, _join(path, k), 1) for k, item in value.items()]
    while stack:
        item, item_path, depth = stack.pop()
        if depth > MAX_PARAMETER_DEPTH:
            problems.add(item_path, f"is nested more than {MAX_PARAMETER_DEPTH} levels deep")
        elif isinstance(item, Mapping):
            for key, child in item.items():
                if not isinstance(key, str):
                    problems.add(_join(item_path, key), "object keys must be strings")
                stack.append((child, _join(item_path, key), depth + 1))
        elif isinstance(item, list | tuple):
            stack.extend((child, f"{item_path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            problems.add(item_path, "must be a finite number", item)
        elif item is not None and not isinstance(item, str | int | float | bool):
            problems.add(item_path, f"must be a JSON value, got a {type(item).__name__}")
    if len(problems.items) > before:
        return None
    return json.loads(json.dumps(value))


def _relative_path(value: Any, path: str, problems: _Problems, *, notebook: bool) -> str | None:
    if not isinstance(value, str) or not value:
        problems.add(path, "must be a non-empty path string", value)
        return None
    segments = value.split("/")
    problem = None
    if len(value) > 1024:
        problem = "must be at most 1024 characters"
    elif _has_control_chars(value):
        problem = "must not contain NUL or control characters"
    elif "\\" in value:
        problem = "must use / as the separator, not \\"
    elif value.startswith("/"):
        problem = "must be relative to the repository root, not absolute"
    elif _DRIVE.match(value):
        problem = "must be relative to the repository root, not start with a drive letter"
    elif ".." in segments:
        problem = "must stay inside the repository (no .. segments)"
    elif value.startswith("-"):
        problem = "must not start with -"
    elif notebook and not value.endswith(".ipynb"):
        problem = "must end with .ipynb (glob patterns too)"
    if problem:
        problems.add(path, problem, value)
        return None
    return value


def _notebook_path(value: Any, path: str, problems: _Problems) -> str | None:
    return _relative_path(value, path, problems, notebook=True)


def _parse_notebooks(value: Any, problems: _Problems) -> tuple[NotebookEntry, ...]:
    if value is None:
        problems.add("notebooks", "is required: a list of notebook paths or glob patterns")
        return ()
    if not isinstance(value, list | tuple):
        problems.add("notebooks", f"must be a list, got a JSON {_json_type(value)}", value)
        return ()
    if not 1 <= len(value) <= MAX_NOTEBOOKS:
        problems.add("notebooks", f"must hold 1 to {MAX_NOTEBOOKS} entries, got {len(value)}")
        return ()
    entries: list[NotebookEntry] = []
    for index, item in enumerate(value):
        path = f"notebooks[{index}]"
        if isinstance(item, str):
            clean = _notebook_path(item, path, problems)
            if clean is not None:
                entries.append(NotebookEntry(path=clean))
            continue
        if not isinstance(item, Mapping):
            problems.add(path, "must be a path string or an object with a path", item)
            continue
        _unknown_keys(
            item,
            ("path", "parameters", "timeoutMinutes", "allowFailure", "kernel", "python"),
            path,
            problems,
        )
        if item.get("path") is None:
            problems.add(f"{path}.path", "is required")
            clean = None
        else:
            clean = _notebook_path(item["path"], f"{path}.path", problems)
        parameters = _optional(item, "parameters", path, problems, _parameters, {})
        timeout = _optional(item, "timeoutMinutes", path, problems, _minutes, None)
        allow_failure = _optional(item, "allowFailure", path, problems, _boolean, False)
        kernel, python = _kernel_choice(item, path, problems)
        if clean is not None and parameters is not None and allow_failure is not None:
            entries.append(NotebookEntry(clean, parameters, timeout, allow_failure, kernel, python))
    return tuple(entries)


def _parse_repository(
    value: Any, problems: _Problems, allow_local: bool
) -> tuple[str, str, str | None]:
    repo = _require_object(value, "repository", problems)
    if repo is None:
        return "", "main", None
    _unknown_keys(repo, ("url", "ref", "commit"), "repository", problems)
    url = _repository_url(repo.get("url"), "repository.url", problems, allow_local)
    ref = _optional(repo, "ref", "repository", problems, _git_ref, "main")
    commit = _optional(repo, "commit", "repository", problems, _commit, None)
    return url or "", ref or "main", commit


def _repository_url(value: Any, path: str, problems: _Problems, allow_local: bool) -> str | None:
    """The URL git is given, or None; the rules are listed in README "The message".

    Every refusal shows the URL with its user part masked, and nothing here lets a value that
    git could read as an option (a leading ``-`` in a host, user or path) through.
    """
    if value is None:
        problems.add(path, "is required")
        return None
    if not isinstance(value, str) or not value:
        problems.add(path, "must be a non-empty string", value)
        return None
    shown = _mask_url_user(value)
    if (
        len(value) > 2048
        or any(char.isspace() for char in value)
        or _has_control_chars(value)
        or _has_control_chars(unquote(value))
    ):
        problems.add(path, "must be at most 2048 characters without spaces or control characters")
        return None
    lower = value.lower()
    if lower.startswith(("https://", "ssh://", "http://")):
        return _network_url(value, shown, path, problems)
    scp = _SCP_LIKE.fullmatch(value)
    if scp:
        if scp["user"].startswith("-") or "%" in scp["user"]:
            problems.add(path, "has a user name git could read as an option or a credential", shown)
            return None
        return value
    if lower.startswith("file://") or value.startswith("/"):
        if not allow_local:
            problems.add(
                path,
                f"local repositories are allowed only when {ALLOW_LOCAL_REPOS_ENV}=1",
                shown,
            )
            return None
        if lower.startswith("file://"):
            parts = urlsplit(value)
            if parts.netloc not in ("", "localhost"):
                problems.add(path, "file:// URL must not name a host", shown)
                return None
            if not parts.path:
                problems.add(path, "file:// URL has no path", shown)
                return None
        return value
    if "@" in value.split("/")[0] and ":" in value.split("@")[0]:
        problems.add(path, _CREDENTIALS_IN_URL, shown)
        return None
    problems.add(path, "must be an https:// URL, ssh://host/path or git@host:path", shown)
    return None


_CREDENTIALS_IN_URL = (
    "must not embed credentials (a token, user name or password); the app authenticates to "
    "git on its own (NOTEBOOKOPS_GIT_TOKEN or the pipeline token)"
)


def _mask_url_user(value: str) -> str:
    """The URL as errors show it: anything before the host's ``@`` replaced by the mask."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value
    authority, slash, tail = rest.partition("/")
    if "@" not in authority:
        return value
    masked = MASK + authority[authority.rindex("@") :] + slash + tail
    return f"{scheme}://{masked}" if sep else masked


def _network_url(value: str, shown: str, path: str, problems: _Problems) -> str | None:
    try:
        parts = urlsplit(value)
        host, user, password = parts.hostname, parts.username, parts.password
    except ValueError:
        problems.add(path, "is not a valid URL (check the brackets around an IPv6 address)", shown)
        return None
    if user is not None or password is not None:
        userinfo = parts.netloc.rpartition("@")[0]
        # The shown URL is masked already; these also mask any other echo of the parts (a
        # one-letter user name would mask every such letter in the line, so short ones not).
        candidates = {userinfo, unquote(userinfo), user, password, unquote(password or "")}
        problems.secrets.extend(s for s in candidates if s and len(s) >= MIN_SECRET_CHARS)
        scheme = parts.scheme.lower()
        if password is None and scheme == "ssh" and _SSH_USER.fullmatch(user or ""):
            pass  # ssh://git@host/path: the account name, authenticated by a key
        elif password is None and _is_devops_org_user(parts):
            # https://org@dev.azure.com/org/...: Azure DevOps' own clone URL names the
            # organization, not a credential; it is taken out so git never asks for it.
            value = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        else:
            problems.add(path, _CREDENTIALS_IN_URL, shown)
            return None
    if value.lower().startswith("http://"):
        problems.add(path, "must use https:// (or ssh), not http://", shown)
        return None
    if not host:
        problems.add(path, "has no host name", shown)
        return None
    if not _host_name_ok(host, parts.netloc):
        problems.add(path, "must name a host of letters, digits, dots and dashes", shown)
        return None
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        problems.add(path, "must have a port from 1 to 65535", shown)
        return None
    if parts.path.lstrip("/").startswith("-"):
        problems.add(path, "must not have a path that begins with -", shown)
        return None
    return value


_SSH_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")


def _host_name_ok(host: str, netloc: str) -> bool:
    if "[" in netloc:
        try:
            return ipaddress.ip_address(host).version == 6
        except ValueError:
            return False
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in host.split("."))


def _is_devops_org_user(parts: Any) -> bool:
    first = parts.path.lstrip("/").split("/")[0]
    return (parts.hostname or "") == "dev.azure.com" and (parts.username or "").lower() == (
        unquote(first).lower()
    )


def _git_ref(value: Any, path: str, problems: _Problems) -> str | None:
    if not isinstance(value, str) or not value:
        problems.add(path, "must be a non-empty git ref name", value)
        return None
    components = value.split("/")
    unsafe = (
        len(value) > 255
        or value.startswith("-")
        or value == "@"
        or ".." in value
        or "@{" in value
        or "//" in value
        or value.endswith(("/", ".", ".lock"))
        or any(char.isspace() or char in _REF_FORBIDDEN for char in value)
        or _has_control_chars(value)
        or any(component.startswith(".") for component in components)
    )
    if unsafe:
        problems.add(
            path,
            "must be a safe git ref name (no spaces, control characters, '..', '@{', "
            "~^:?*[\\ or leading '-')",
            value,
        )
        return None
    return value


def _commit(value: Any, path: str, problems: _Problems) -> str | None:
    if not isinstance(value, str) or not _COMMIT.fullmatch(value):
        problems.add(path, FULL_COMMIT_RULE, value)
        return None
    return value.lower()


def _parse_compute(
    value: Any, problems: _Problems, default_backend: str, backend_origin: str
) -> ComputeSpec:
    compute: Mapping[str, Any] = {}
    if value is not None:
        checked = _require_object(value, "compute", problems)
        compute = checked or {}
    allowed = (
        "backend",
        "target",
        "environment",
        "experiment",
        "workspace",
        "sourceDirectory",
        "kernel",
        "python",
    )
    _unknown_keys(compute, allowed, "compute", problems)
    backend = compute.get("backend")
    backend_path = "compute.backend"
    if backend is None:
        backend, backend_path = default_backend, f"compute.backend (default from {backend_origin})"
    # The registry is the list of backends, so a registered backend is a valid name too.
    from notebookops.compute.registry import known_backends

    names = known_backends()
    if backend not in names:
        problems.add(backend_path, f"must be one of {', '.join(names)}", backend)
        backend = "local"
    target = _optional(compute, "target", "compute", problems, _plain_string, None)
    environment = _optional(compute, "environment", "compute", problems, _plain_string, None)
    _azureml_environment_form(environment, backend, problems)
    experiment = _optional(compute, "experiment", "compute", problems, _experiment, "notebook-ci")
    workspace = _optional(compute, "workspace", "compute", problems, _workspace, None)
    source_dir = _optional(compute, "sourceDirectory", "compute", problems, _source_dir, None)
    kernel, python = _kernel_choice(compute, "compute", problems)
    return ComputeSpec(
        backend=backend,
        target=target,
        environment=environment,
        experiment=experiment or "notebook-ci",
        workspace=workspace,
        source_directory=source_dir,
        kernel=kernel,
        python=python,
    )


def _kernel_choice(
    obj: Mapping[str, Any], path: str, problems: _Problems
) -> tuple[str | None, str | None]:
    """`kernel` and `python` of the message's compute or of one notebook entry: one or neither."""
    kernel = _optional(obj, "kernel", path, problems, _kernel_name, None)
    python = _optional(obj, "python", path, problems, _python_path, None)
    if kernel is not None and python is not None:
        problems.add(
            _join(path, "python"),
            "cannot be combined with kernel: name a kernelspec or a Python environment, not both",
            python,
        )
    return kernel, python


def _python_needs_local(
    compute: ComputeSpec, notebooks: tuple[NotebookEntry, ...], problems: _Problems
) -> None:
    """A Python environment on the host means nothing to a remote backend."""
    if compute.backend == "local":
        return
    where = [("compute.python", compute.python)] + [
        (f"notebooks[{i}].python", entry.python) for i, entry in enumerate(notebooks)
    ]
    for path, value in where:
        if value is not None:
            problems.add(
                path,
                f"applies to the local backend only; on {compute.backend} the notebook's packages "
                "come from compute.environment (kernel picks a kernelspec in it)",
                value,
            )


def _kernel_name(value: Any, path: str, problems: _Problems) -> str | None:
    if not isinstance(value, str) or not _KERNEL.fullmatch(value):
        problems.add(
            path,
            "must be a Jupyter kernelspec name (1-128 letters, digits, '.', '_' or '-', as "
            "`jupyter kernelspec list` shows them)",
            value,
        )
        return None
    return value


def _python_path(value: Any, path: str, problems: _Problems) -> str | None:
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or len(value) > 1024
        or _has_control_chars(value)
    ):
        problems.add(
            path,
            "must be the absolute path of a Python virtual environment (its folder) or of its "
            "python executable on the host running the local backend",
            value,
        )
        return None
    return value


def _azureml_environment_form(environment: str | None, backend: str, problems: _Problems) -> None:
    """An Azure ML environment reference the service cannot resolve fails here, with the forms
    that work, rather than at submit time for every notebook."""
    if environment is None or backend not in ("azureml", "azureml-v1"):
        return
    from notebookops.compute.azureml_common import parse_environment_ref

    try:
        parse_environment_ref(environment, backend)
    except ValueError as exc:
        problems.add("compute.environment", str(exc), environment)


def _experiment(value: Any, path: str, problems: _Problems) -> str | None:
    if not isinstance(value, str) or not _EXPERIMENT.fullmatch(value):
        problems.add(
            path,
            "must be 1-256 letters, digits, _ or -, starting with a letter or digit",
            value,
        )
        return None
    return value


def _source_dir(value: Any, path: str, problems: _Problems) -> str | None:
    return _relative_path(value, path, problems, notebook=False)


def _workspace(value: Any, path: str, problems: _Problems) -> dict[str, str] | None:
    if not isinstance(value, Mapping):
        problems.add(path, f"must be an object, got a JSON {_json_type(value)}", value)
        return None
    keys = ("subscriptionId", "resourceGroup", "name")
    _unknown_keys(value, keys, path, problems)
    checks = {
        "subscriptionId": (_GUID, "must be a subscription GUID"),
        "resourceGroup": (_RESOURCE_GROUP, "must be a resource group name (1-90 characters)"),
        "name": (_WORKSPACE_NAME, "must be a workspace name (3-33 letters, digits, _ or -)"),
    }
    out: dict[str, str] = {}
    for key, (pattern, problem) in checks.items():
        item = value.get(key)
        if item is None:
            problems.add(_join(path, key), "is required")
        elif not isinstance(item, str) or not pattern.fullmatch(item):
            problems.add(_join(path, key), problem, item)
        else:
            out[key] = item
    return out if len(out) == len(keys) else None


# --- callback -------------------------------------------------------------------------------


def _callback_source(
    name: str, source: Mapping[str, Any], *, case_sensitive: bool, problems: _Problems
) -> dict[str, tuple[str, Any]]:
    """Canonical property name -> (field path for errors, value) for the keys present."""
    by_lower = {prop.lower(): prop for prop in _CALLBACK_FIELDS}
    found: dict[str, tuple[str, Any]] = {}
    for key, value in source.items():
        if not isinstance(key, str):
            continue
        prop = key if case_sensitive else by_lower.get(key.lower())
        if prop not in _CALLBACK_FIELDS:
            continue
        path = f"{name}.{key}"
        if prop in found:
            problems.add(path, f"repeats {found[prop][0]} (keys differ only in case)")
            continue
        found[prop] = (path, value)
    return found


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _read_callback(
    properties: Mapping[str, Any] | None,
    devops: Any,
    headers: Mapping[str, Any] | None,
    problems: _Problems,
) -> Callback | None:
    sources: list[dict[str, tuple[str, Any]]] = []
    if isinstance(properties, Mapping):
        sources.append(
            _callback_source("properties", properties, case_sensitive=True, problems=problems)
        )
    if devops is not None:
        if not isinstance(devops, Mapping):
            problems.add("devops", f"must be an object, got a JSON {_json_type(devops)}", devops)
        else:
            allowed = [camel for _, camel in _CALLBACK_FIELDS.values()]
            lowered = {camel.lower() for camel in allowed}
            unknown = {k: v for k, v in devops.items() if str(k).lower() not in lowered}
            _unknown_keys(unknown, allowed, "devops", problems)
            sources.append(
                _callback_source("devops", devops, case_sensitive=False, problems=problems)
            )
    if isinstance(headers, Mapping):
        sources.append(
            _callback_source("headers", headers, case_sensitive=False, problems=problems)
        )

    chosen = next(
        (
            source
            for source in sources
            if any(_present(value) for prop, (_, value) in source.items() if prop != "BuildId")
        ),
        None,
    )
    if chosen is None:
        return None
    build_id = next(
        (source["BuildId"] for source in sources if _present(source.get("BuildId", ("", None))[1])),
        None,
    )
    values = {prop: entry for prop, entry in chosen.items() if prop != "BuildId"}
    if build_id is not None:
        values["BuildId"] = build_id

    required = [p for p in _CALLBACK_FIELDS if p not in _OPTIONAL_CALLBACK]
    missing = [p for p in required if p not in values or not _present(values[p][1])]
    origin = next(iter(values.values()))[0].split(".")[0]
    if missing:
        problems.add(
            origin,
            "callback values are incomplete (the pipeline cannot be called back), missing "
            + ", ".join(missing),
        )
    # An empty optional value (TaskInstanceName of an unnamed task) simply means absent.
    to_check = {prop: entry for prop, entry in values.items() if _present(entry[1])}
    clean: dict[str, str] = {}
    for prop, (path, value) in to_check.items():
        checked = _callback_value(prop, value, path, problems)
        if checked is not None:
            clean[_CALLBACK_FIELDS[prop][0]] = checked
    if missing or len(clean) != len(to_check):
        return None
    return Callback(**clean)


def _callback_value(prop: str, value: Any, path: str, problems: _Problems) -> str | None:
    if isinstance(value, uuid.UUID):
        value = str(value)
    if prop == "BuildId" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if prop == "AuthToken":
        # The token is never shown, not even when it is malformed.
        if (
            not isinstance(value, str)
            or any(char.isspace() for char in value)
            or _has_control_chars(value)
            or len(value) > 16384
        ):
            problems.add(path, "must be a token string without spaces (value not shown)")
            return None
        return value
    if not isinstance(value, str):
        problems.add(path, f"must be a string, got a {_json_type(value)}")
        return None
    hint = " (an unexpanded pipeline variable?)" if value.startswith("$(") else ""
    if prop in _GUID_FIELDS:
        if not _GUID.fullmatch(value):
            problems.add(path, f"must be a GUID{hint}", value)
            return None
        return value.lower()
    if prop == "PlanUrl":
        return _plan_url(value, path, problems, hint)
    if prop == "HubName":
        if not _HUB_NAME.fullmatch(value):
            problems.add(path, f"must be a hub name such as build or release{hint}", value)
            return None
        return value
    if prop == "BuildId":
        if not _BUILD_ID.fullmatch(value):
            problems.add(path, f"must be a build id{hint}", value)
            return None
        return value
    return _plain_string(value, path, problems, max_len=1024)


def _plan_url(value: str, path: str, problems: _Problems, hint: str) -> str | None:
    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.password
    except ValueError:
        ok = False
    if not ok or any(char.isspace() for char in value) or _has_control_chars(value):
        problems.add(
            path, f"must be an http(s) URL such as https://dev.azure.com/org/{hint}", value
        )
        return None
    return value
