"""A Service Bus (or HTTP) message -> a validated RunRequest, or every problem with it at once.

The body's shape and every field's rule are declared once, in notebookops.message (which the
JSON Schema is generated from). Here is what a schema cannot say: reading the body (size
limit, duplicate keys, NaN), the rules that depend on the app's settings or on two fields (the
default backend, the Azure ML environment form, ``python`` on the local backend only), the
callback values from the Service Bus application properties, else the body's ``devops``
object, else HTTP headers (reference/devops-protocol.md §1.2, §6, §7), and the one place that
turns pydantic's errors into lines that name the field and the offending value and never
contain the pipeline token.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import typing
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from notebookops.datacontract import decode_body
from notebookops.message import (
    BACKENDS,
    ERROR_TYPE,
    FULL_COMMIT_RULE,
    KERNEL_OR_PYTHON,
    MAX_NOTEBOOKS,
    NOTEBOOK_TAGS,
    Callback,
    ComputeSpec,
    NotebookEntry,
    RequestError,
    RunRequest,
    backend_rule,
)
from notebookops.message import json_type as _json_type
from notebookops.redact import MASK, is_secret_key, redact
from notebookops.repo_url import ALLOW_LOCAL_REPOS_ENV

__all__ = [
    "BACKENDS",
    "CALLBACK_PROPERTIES",
    "FULL_COMMIT_RULE",
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
DEFAULT_BACKEND_ENV = "NOTEBOOKOPS_DEFAULT_BACKEND"
MAX_BODY_BYTES = 256 * 1024  # the Service Bus standard-tier message size
_SHOWN_VALUE_CHARS = 80
# The user part of a URL (scheme://USER@host) or of an scp-like or bare git address
# (USER@host:path, USER@host/path), wherever it is echoed in an error.
_URL_USER = re.compile(
    r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#\"]*@|(^|(?<=[\s\"\[,]))[^\s/?#\"]*@(?=[^\s\"/@]+[:/])"
)

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
# What "is required" says more about, by field path.
_REQUIRED = {"notebooks": "is required: a list of notebook paths or glob patterns"}


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


# --- the whole message ----------------------------------------------------------------------


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
        dict(data),
        problems,
        default_backend=default_backend,
        backend_origin=backend_origin,
        allow_local_repos=allow_local_repos,
    )
    if problems.items or request is None:
        return None, callback, problems.items
    return request.with_callback(callback), callback, []


def _parse_message(
    data: dict[str, Any],
    problems: _Problems,
    *,
    default_backend: str,
    backend_origin: str,
    allow_local_repos: bool,
) -> RunRequest | None:
    message: RunRequest | None = None
    failed: set[str] = set()
    try:
        message = RunRequest.model_validate(
            data, by_alias=True, by_name=False, context={"allow_local_repos": allow_local_repos}
        )
    except ValidationError as exc:
        failed = _report(exc.errors(include_url=False), problems, RunRequest)
    backend = _backend(data, default_backend, backend_origin, problems)
    _cross_field_rules(data, backend, failed, problems)
    if message is None or problems.items:
        return None
    compute = (message.compute or ComputeSpec()).model_copy(update={"backend": backend})
    # The devops values live on as the request's callback (from whichever source won).
    return message.model_copy(update={"compute": compute, "devops": None})


def _backend(data: dict[str, Any], default: str, origin: str, problems: _Problems) -> str:
    """compute.backend, else the default from the app setting (checked against the registry)."""
    compute = data.get("compute")
    backend = compute.get("backend") if isinstance(compute, dict) else None
    if backend is not None:
        from notebookops.compute.registry import known_backends

        return backend if backend in known_backends() else "local"
    if default not in BACKENDS:
        from notebookops.compute.registry import known_backends

        if default not in known_backends():
            problems.add(f"compute.backend (default from {origin})", backend_rule(), default)
            return "local"
    return default


def _cross_field_rules(
    data: dict[str, Any], backend: str, failed: set[str], problems: _Problems
) -> None:
    """Rules that depend on the backend, which may come from the app's settings; each runs on
    the values that passed their own field's rule."""
    compute = data.get("compute") if isinstance(data.get("compute"), dict) else {}
    notebooks = data.get("notebooks")
    entries = [
        (f"notebooks[{i}]", e)
        for i, e in enumerate(notebooks[:MAX_NOTEBOOKS] if isinstance(notebooks, list) else [])
        if isinstance(e, dict)
    ]
    for path, obj in [("compute", compute), *entries]:
        kernel, python = obj.get("kernel"), obj.get("python")
        both = isinstance(kernel, str) and isinstance(python, str)
        if both and not failed & {f"{path}.kernel", f"{path}.python"}:
            problems.add(f"{path}.python", KERNEL_OR_PYTHON, python)
    environment = compute.get("environment")
    if (
        isinstance(environment, str)
        and "compute.environment" not in failed
        and backend in ("azureml", "azureml-v1")
    ):
        from notebookops.compute.azureml_common import parse_environment_ref

        try:
            parse_environment_ref(environment, backend)
        except ValueError as exc:
            problems.add("compute.environment", str(exc), environment)
    if backend == "local":
        return
    # A Python environment on the host means nothing to a remote backend.
    where = [("compute.python", compute.get("python"))] + [
        (f"{path}.python", entry.get("python")) for path, entry in entries
    ]
    for path, value in where:
        if isinstance(value, str) and path not in failed:
            problems.add(
                path,
                f"applies to the local backend only; on {backend} the notebook's packages "
                "come from compute.environment (kernel picks a kernelspec in it)",
                value,
            )


# --- pydantic's errors as lines -------------------------------------------------------------


def _report(
    errors: list[Any],
    problems: _Problems,
    model: type[BaseModel],
    paths: Mapping[str, str] | None = None,
) -> set[str]:
    """pydantic's errors as lines ``path: problem[, got value]``; returns their paths.

    ``paths`` maps a top-level field to the path a person wrote it at (a callback value read
    from ``properties.PlanUrl``, say); otherwise the path is the field's in the message.
    """
    for error in errors:  # the parts of a URL's user part, before any line is written
        problems.secrets += (error.get("ctx") or {}).get("secrets", [])
    # An object's unknown keys first, as a reader scans the message from the top.
    errors.sort(key=lambda e: not (e["type"] == "extra_forbidden" and len(e["loc"]) == 1))
    failed: set[str] = set()
    for error in errors:
        loc = _without_tags(error["loc"])
        if paths is not None and loc and loc[0] in paths:
            path = _path((paths[loc[0]], *loc[1:]))
        else:
            path = _path(loc)
        failed.add(path)
        kind, value, ctx = error["type"], error["input"], error.get("ctx") or {}
        if kind == ERROR_TYPE:
            if ctx.get("show", True):
                problems.add(path, ctx.get("message", error["msg"]), ctx.get("shown", value))
            else:
                problems.add(path, ctx.get("message", error["msg"]))
        elif kind == "missing":
            problems.add(path, _REQUIRED.get(path, "is required"))
        elif kind == "extra_forbidden":
            key = loc[-1]
            _unknown_key(path, key, _field_names(model, loc[:-1]), problems)
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            problems.add(path, f"must be an object, got a JSON {_json_type(value)}")
        else:  # a rule worded by pydantic itself: none is expected, but say what it says
            problems.add(path, error["msg"][:1].lower() + error["msg"][1:], value)
    return failed


def _without_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The path a person wrote: without the name of the union branch (notebooks[0].entry.x)."""
    return tuple(
        part
        for i, part in enumerate(loc)
        if not (i and isinstance(loc[i - 1], int) and part in NOTEBOOK_TAGS)
    )


def _path(loc: Iterable[Any]) -> str:
    path = ""
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, part)
    return path


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The message keys of the object at ``loc`` (the model found by walking its fields)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = next(
            (f for name, f in current.model_fields.items() if (f.alias or name) == part), None
        )
        current = _model_in(field.annotation) if field is not None else None
        if current is None:
            return []
    names = [f.alias or name for name, f in current.model_fields.items()]
    return [name for name in names if name != "$schema"]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _unknown_key(path: str, key: object, allowed: list[str], problems: _Problems) -> None:
    hint = ""
    if isinstance(key, str) and key in _CALLBACK_FIELDS and "." not in path:
        hint = ' (callback values go in the "devops" object or the message properties)'
    elif isinstance(key, str):
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.75)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
    problems.add(path, f"unknown field{hint}; allowed fields: {', '.join(allowed)}")


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
            for key in devops:
                if str(key).lower() not in lowered:
                    _unknown_key(_join("devops", key), key, allowed, problems)
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
    present = {prop: entry for prop, entry in values.items() if _present(entry[1])}
    clean = {_CALLBACK_FIELDS[prop][0]: _plain(prop, value) for prop, (_, value) in present.items()}
    paths = {_CALLBACK_FIELDS[prop][0]: path for prop, (path, _) in present.items()}
    try:
        callback = Callback.model_validate(clean, by_alias=False, by_name=True)
    except ValidationError as exc:
        # A missing value is reported above, once, as "incomplete".
        rest = [e for e in exc.errors(include_url=False) if e["type"] != "missing"]
        _report(rest, problems, Callback, paths)
        return None
    return None if missing else callback


def _plain(prop: str, value: Any) -> Any:
    """Service Bus may hand a GUID property as a UUID and a build id as a number."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if prop == "BuildId" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value
