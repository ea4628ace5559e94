"""The message, declared once: pydantic models of the body and of the callback values.

Each field's type carries its rule: the constraint pydantic checks, the text an error prints
after the field path (``Rule``), and what the JSON Schema says about it, so validation, error
messages and ``schemas/message.schema.json`` (``make schema``) come from one declaration.
What depends on more than the body (the app settings, the backend registry, where the
callback values come from) is in request.py, which also turns pydantic's errors into lines.

Importing this module builds nothing (``defer_build``); the first validation does.
"""

from __future__ import annotations

import copy
import json
import keyword
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    Tag,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic_core import InitErrorDetails, PydanticCustomError, core_schema

from notebookops.redact import MASK

__all__ = [
    "BACKENDS",
    "ERROR_TYPE",
    "Callback",
    "ComputeSpec",
    "NotebookEntry",
    "Repository",
    "RequestError",
    "RunRequest",
    "Workspace",
    "message_schema",
    "refusal",
]

BACKENDS = ("local", "azureml", "azureml-v1")
MAX_NOTEBOOKS = 500
MAX_TIMEOUT_MINUTES = 7 * 24 * 60
MAX_PARALLEL = 500
MAX_PARAMETER_DEPTH = 32
# validate and run (notebookops.repo) refuse a short commit id with this same sentence.
FULL_COMMIT_RULE = (
    "must be a full commit id: 40 hex digits (64 for SHA-256); a short id cannot be fetched "
    "from a remote, so give the whole SHA (in Azure DevOps: $(Build.SourceVersion))"
)
ERROR_TYPE = "notebookops"  # the pydantic error type of every refusal worded here
_CONTROL = r"[\x00-\x1f\x7f]"


class RequestError(ValueError):
    """A message that cannot run; ``errors`` holds one line per problem, each naming its field."""

    def __init__(self, errors: Iterable[str] | str) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("; ".join(self.errors))

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.errors,))


def _validated(model: type[Any], data: Any, where: str) -> Any:
    """``model`` from its own to_dict(): for values this app wrote, so no value is echoed
    (request.py words the errors of a message a person wrote)."""
    try:
        return model.model_validate(
            data, by_alias=True, by_name=False, context={"allow_local_repos": True}
        )
    except ValidationError as exc:
        raise RequestError(
            ".".join([where, *map(str, error["loc"])]).lstrip(".") + ": " + error["msg"]
            for error in exc.errors(include_url=False)
        ) from None


def refusal(message: str, *, shown: Any = None, show: bool = True, **extra: Any) -> Exception:
    """The error one rule raises: request.py prints ``path: message, got <shown or input>``."""
    context = {"message": message, "show": show, **extra}
    if shown is not None:
        context["shown"] = shown
    return PydanticCustomError(ERROR_TYPE, "{message}", context)


# --- rules: a field type's constraints and the words for them ------------------------------

Message = str | Callable[[Any], str]  # a fixed text, or one made from the refused value


@dataclass(frozen=True)
class Refuse:
    """A value in which ``pattern`` is found is refused with ``message`` (schema: not pattern)."""

    pattern: str
    message: Message

    def fails(self, value: str) -> bool:
        return re.search(self.pattern, value) is not None

    def schema(self) -> dict[str, Any]:
        return {"not": {"pattern": self.pattern}}


@dataclass(frozen=True)
class Require:
    """The whole value must match ``pattern`` (schema: pattern ^(?:...)$)."""

    pattern: str
    message: Message

    def fails(self, value: str) -> bool:
        return re.fullmatch(self.pattern, value) is None

    def schema(self) -> dict[str, Any]:
        return {"pattern": f"^(?:{self.pattern})$"}


@dataclass(frozen=True)
class MaxLength:
    length: int
    message: Message

    def fails(self, value: str) -> bool:
        return len(value) > self.length

    def schema(self) -> dict[str, Any]:
        return {"maxLength": self.length}


@dataclass(frozen=True)
class Rule:
    """Annotated metadata: ``message`` when the type or its constraints fail, then ``checks``
    in order (the first that fails words the error). Errors inside the value (an item of a
    list, a field of an object) pass through untouched.

    ``keep_int`` keeps a whole JSON number an int where the type is float (30 stays 30).
    """

    message: Message
    checks: tuple[Refuse | Require | MaxLength, ...] = ()
    show: bool | Callable[[Any], bool] = True
    keep_int: bool = False

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_wrap_validator_function(self._validate, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> dict[str, Any]:
        out = handler(schema)
        for check in self.checks:
            fragment = check.schema()
            if "maxLength" in fragment:
                out.update(fragment)
            else:
                out.setdefault("allOf", []).append(fragment)
        return out

    def _refuse(self, message: Message, value: Any) -> Exception:
        text = message(value) if callable(message) else message
        show = self.show(value) if callable(self.show) else self.show
        return refusal(text, show=show)

    def _validate(self, value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            out = handler(value)
        except ValidationError as exc:
            if any(not error["loc"] for error in exc.errors()):
                raise self._refuse(self.message, value) from None
            raise
        for check in self.checks:
            if check.fails(out):
                raise self._refuse(check.message, value)
        return value if self.keep_int and type(value) is int else out


def json_type(value: object) -> str:
    """What a value is called in JSON, for "got a JSON array"."""
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


def _text(max_len: int) -> Rule:
    longer = f"must be at most {max_len} characters without control characters"
    return Rule(
        "must be a non-empty string",
        (Refuse(r"^\s*$", "must be a non-empty string"), MaxLength(max_len, longer)),
    )


def _with_hint(problem: str) -> Callable[[Any], str]:
    """Callback values: a ``$(Var)`` that the pipeline did not expand says so."""

    def message(value: Any) -> str:
        unexpanded = isinstance(value, str) and value.startswith("$(")
        return problem + (" (an unexpanded pipeline variable?)" if unexpanded else "")

    return message


def _relative_path(notebook: bool) -> Rule:
    checks: list[Refuse | Require | MaxLength] = [
        MaxLength(1024, "must be at most 1024 characters"),
        Refuse(_CONTROL, "must not contain NUL or control characters"),
        Refuse(r"\\", "must use / as the separator, not \\"),
        Refuse(r"^/", "must be relative to the repository root, not absolute"),
        Refuse(
            r"^[A-Za-z]:", "must be relative to the repository root, not start with a drive letter"
        ),
        Refuse(r"(^|/)\.\.(/|$)", "must stay inside the repository (no .. segments)"),
        Refuse(r"^-", "must not start with -"),
    ]
    if notebook:
        checks.append(Require(r".*\.ipynb", "must end with .ipynb (glob patterns too)"))
    return Rule("must be a non-empty path string", tuple(checks))


_GUID = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_SAFE_REF = (
    "must be a safe git ref name (no spaces, control characters, '..', '@{', "
    "~^:?*[\\ or leading '-')"
)

_UNSAFE_REF = (
    r"^-",
    r"^@$",
    r"\.\.",
    r"@\{",
    r"//",
    r"(/|\.|\.lock)$",
    r"[\s~^:?*\[\\]",
    _CONTROL,
    r"(^|/)\.",
)

Flag = Annotated[bool, Rule("must be true or false")]
Minutes = Annotated[
    float,
    # gt/le are compared before any float(): a 400-digit int or 1e999 (inf) is refused, and
    # -0 is not above 0.
    Field(gt=0, le=MAX_TIMEOUT_MINUTES, allow_inf_nan=False),
    Rule(f"must be a positive number of minutes, at most {MAX_TIMEOUT_MINUTES}", keep_int=True),
]
Parallel = Annotated[
    int, Field(ge=1, le=MAX_PARALLEL), Rule(f"must be a whole number from 1 to {MAX_PARALLEL}")
]
Text = Annotated[str, _text(255)]
NotebookPath = Annotated[str, Field(min_length=1), _relative_path(notebook=True)]
SourceDirectory = Annotated[str, Field(min_length=1), _relative_path(notebook=False)]
GitRef = Annotated[
    str,
    Field(min_length=1),
    Rule(
        "must be a non-empty git ref name",
        (
            *(Refuse(pattern, _SAFE_REF) for pattern in _UNSAFE_REF),
            MaxLength(255, _SAFE_REF),
        ),
    ),
]
Commit = Annotated[
    str,
    Rule(FULL_COMMIT_RULE, (Require("[0-9a-fA-F]{40}|[0-9a-fA-F]{64}", FULL_COMMIT_RULE),)),
    AfterValidator(str.lower),
]
_KERNEL_RULE = (
    "must be a Jupyter kernelspec name (1-128 letters, digits, '.', '_' or '-', as "
    "`jupyter kernelspec list` shows them)"
)
Kernel = Annotated[str, Rule(_KERNEL_RULE, (Require("[A-Za-z0-9._-]{1,128}", _KERNEL_RULE),))]
_PYTHON_RULE = (
    "must be the absolute path of a Python virtual environment (its folder) or of its "
    "python executable on the host running the local backend"
)
PythonPath = Annotated[
    str,
    Rule(
        _PYTHON_RULE,
        (
            Require("/.*", _PYTHON_RULE),
            MaxLength(1024, _PYTHON_RULE),
            Refuse(_CONTROL, _PYTHON_RULE),
        ),
    ),
]
_EXPERIMENT_RULE = "must be 1-256 letters, digits, _ or -, starting with a letter or digit"
Experiment = Annotated[
    str, Rule(_EXPERIMENT_RULE, (Require("[A-Za-z0-9][A-Za-z0-9_-]{0,255}", _EXPERIMENT_RULE),))
]
_URL_TEXT = "must be at most 2048 characters without spaces or control characters"


def _registered_backend(value: str) -> str:
    # The registry is the list of backends, so a registered backend is a valid name too.
    from notebookops.compute.registry import known_backends

    if value not in known_backends():
        raise refusal(backend_rule(value))
    return value


def backend_rule(_value: Any = None) -> str:
    from notebookops.compute.registry import known_backends

    return f"must be one of {', '.join(known_backends())}"


Backend = Annotated[
    str,
    Rule(backend_rule),
    AfterValidator(_registered_backend),
    Field(json_schema_extra={"enum": list(BACKENDS)}),
]


def _checked_url(value: str, info: ValidationInfo) -> str:
    from notebookops.repo_url import UrlRefused, check_repository_url

    allow_local = bool((info.context or {}).get("allow_local_repos"))
    try:
        return check_repository_url(value, allow_local=allow_local)
    except UrlRefused as exc:
        raise refusal(exc.problem, shown=exc.shown, secrets=exc.secrets) from None


RepositoryUrl = Annotated[
    str,
    Field(min_length=1),
    Rule(
        "must be a non-empty string",
        (MaxLength(2048, _URL_TEXT), Refuse(r"[\s\x00-\x1f\x7f]", _URL_TEXT)),
        show=False,
    ),
    AfterValidator(_checked_url),
]


def _parameter_problems(value: dict[Any, Any]) -> list[InitErrorDetails]:
    """Names papermill can inject, JSON values only, at most MAX_PARAMETER_DEPTH deep."""
    problems: list[InitErrorDetails] = []

    def add(loc: tuple[Any, ...], message: str, item: Any, show: bool = False) -> None:
        problems.append(InitErrorDetails(type=refusal(message, show=show), loc=loc, input=item))

    for key in value:
        if not isinstance(key, str) or not key.isidentifier() or keyword.iskeyword(key):
            add(
                (key if isinstance(key, str) else repr(key),),
                "parameter names must be valid Python identifiers (papermill injects them as "
                "variables)",
                key,
            )
    # Iterative, so deeply nested input cannot exhaust the interpreter stack.
    stack: list[tuple[Any, tuple[Any, ...]]] = [(item, (k,)) for k, item in value.items()]
    while stack:
        item, loc = stack.pop()
        if len(loc) > MAX_PARAMETER_DEPTH:
            add(loc, f"is nested more than {MAX_PARAMETER_DEPTH} levels deep", item)
        elif isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    add((*loc, repr(key)), "object keys must be strings", key)
                stack.append((child, (*loc, key)))
        elif isinstance(item, list | tuple):
            stack.extend((child, (*loc, i)) for i, child in enumerate(item))
        elif isinstance(item, float) and not math.isfinite(item):
            add(loc, "must be a finite number", item, show=True)
        elif item is not None and not isinstance(item, str | int | float | bool):
            add(loc, f"must be a JSON value, got a {type(item).__name__}", item)
    return problems


def _json_parameters(value: dict[Any, Any]) -> dict[str, Any]:
    problems = _parameter_problems(value)
    if problems:
        raise ValidationError.from_exception_data("parameters", problems)
    return json.loads(json.dumps(value))


# Schema side of the names: what is plainly not a Python identifier (a JSON Schema cannot say
# "identifier" for every Unicode letter, so it refuses only the sure cases).
_NOT_IDENTIFIER = r"^[0-9]|[\s!-/:-@\[-^`{-~]"
Parameters = Annotated[
    dict[Any, Any],
    Rule(lambda value: f"must be an object, got a JSON {json_type(value)}"),
    AfterValidator(_json_parameters),
    Field(
        json_schema_extra={
            "propertyNames": {
                "not": {"anyOf": [{"pattern": _NOT_IDENTIFIER}, {"enum": keyword.kwlist}]}
            }
        }
    ),
]


# --- the models -----------------------------------------------------------------------------


class _Model(BaseModel):
    """camelCase in the message, snake_case in Python; null means absent (the default)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        regex_engine="python-re",
        defer_build=True,
        hide_input_in_errors=False,
    )

    @model_validator(mode="before")
    @classmethod
    def _null_means_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # An unknown key stays, null or not, to be reported.
            known = {field.alias or name for name, field in cls.model_fields.items()}
            return {k: v for k, v in data.items() if v is not None or k not in known}
        return data


# Both kernel and python given (as strings) is refused (request.py checks it beside the other
# rules on two fields, so it is reported with every other problem).
KERNEL_OR_PYTHON = (
    "cannot be combined with kernel: name a kernelspec or a Python environment, not both"
)
_ONE_OF_KERNEL_PYTHON = {
    "not": {
        "required": ["kernel", "python"],
        "properties": {"kernel": {"type": "string"}, "python": {"type": "string"}},
    }
}


class Repository(_Model):
    url: RepositoryUrl = Field(
        description="https, ssh:// or git@host:path; no credentials (the app authenticates)"
    )
    ref: GitRef | None = Field("main", description="branch, tag, refs/... or HEAD")
    commit: Commit | None = Field(None, description="a full commit id instead of ref's tip")


class NotebookEntry(_Model):
    """One notebook (or glob of notebooks) to run, relative to the repository root."""

    model_config = ConfigDict(json_schema_extra=_ONE_OF_KERNEL_PYTHON)

    path: NotebookPath
    parameters: Parameters | None = Field(default_factory=dict)
    timeout_minutes: Minutes | None = Field(None, description="this notebook's execution limit")
    allow_failure: Flag | None = False
    kernel: Kernel | None = Field(None, description="replaces compute.kernel for this entry")
    python: PythonPath | None = Field(None, description="replaces compute.python for this entry")

    def __repr_args__(self) -> Any:
        from notebookops.redact import redact_mapping

        for name, value in super().__repr_args__():
            yield name, redact_mapping(value) if name == "parameters" else value

    def to_dict(self) -> str | dict[str, Any]:
        if self == NotebookEntry(path=self.path):
            return self.path
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _notebook_item(value: Any) -> str | None:
    if isinstance(value, str):
        return "path"
    return "entry" if isinstance(value, dict) else None


def _as_entry(value: str | NotebookEntry) -> NotebookEntry:
    return NotebookEntry(path=value) if isinstance(value, str) else value


NOTEBOOK_TAGS = ("path", "entry")  # the union's branch names, which error paths leave out
NotebookItem = Annotated[
    Union[Annotated[NotebookPath, Tag("path")], Annotated[NotebookEntry, Tag("entry")]],  # noqa: UP007 -- a tagged union reads clearer spelled out
    Discriminator(
        _notebook_item,
        custom_error_type=ERROR_TYPE,
        custom_error_message="must be a path string or an object with a path",
    ),
    AfterValidator(_as_entry),
]
Notebooks = Annotated[
    list[NotebookItem],
    Field(min_length=1, max_length=MAX_NOTEBOOKS),
    Rule(
        lambda value: (
            f"must hold 1 to {MAX_NOTEBOOKS} entries, got {len(value)}"
            if isinstance(value, list)
            else f"must be a list, got a JSON {json_type(value)}"
        ),
        show=lambda value: not isinstance(value, list),
    ),
]


class Workspace(_Model):
    subscription_id: Annotated[
        str,
        Rule("must be a subscription GUID", (Require(_GUID, "must be a subscription GUID"),)),
    ]
    resource_group: Annotated[
        str,
        Rule(
            "must be a resource group name (1-90 characters)",
            (
                Require(
                    r"[-A-Za-z0-9_.()]{0,89}[-A-Za-z0-9_()]",
                    "must be a resource group name (1-90 characters)",
                ),
            ),
        ),
    ]
    name: Annotated[
        str,
        Rule(
            "must be a workspace name (3-33 letters, digits, _ or -)",
            (
                Require(
                    "[A-Za-z0-9][A-Za-z0-9_-]{2,32}",
                    "must be a workspace name (3-33 letters, digits, _ or -)",
                ),
            ),
        ),
    ]


class ComputeSpec(_Model):
    """Where the notebooks run; target/environment/workspace mean something to Azure ML only.

    `kernel` is a Jupyter kernelspec name (every backend); `python` a Python environment on the
    host (local backend only): the notebook runs on an ipykernel started by that interpreter.
    """

    model_config = ConfigDict(json_schema_extra=_ONE_OF_KERNEL_PYTHON)

    backend: Backend | None = Field(
        None, description="default: app setting NOTEBOOKOPS_DEFAULT_BACKEND, else local"
    )
    target: Text | None = Field(None, description="Azure ML compute target")
    environment: Text | None = Field(None, description="Azure ML environment reference")
    experiment: Experiment | None = "notebook-ci"
    workspace: Workspace | None = None
    source_directory: SourceDirectory | None = Field(
        None, description="the folder to upload instead of the whole checkout"
    )
    kernel: Kernel | None = Field(None, description="the Jupyter kernelspec, on every backend")
    python: PythonPath | None = Field(None, description="local backend: a Python environment")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class RunRequest(_Model):
    """A validated message: what to clone, which notebooks to run where, whom to call back.

    ``callback`` is not part of the body's declaration: request.py reads it from the message
    properties, the body's ``devops`` object or HTTP headers, in that order.
    """

    schema_url: str | None = Field(
        None, alias="$schema", description="this schema's URL or path, for editors"
    )
    repository: Repository
    notebooks: Notebooks = Field(description="paths or globs, or objects with a path")
    parameters: Parameters | None = Field(
        default_factory=dict, description="injected into every notebook"
    )
    compute: ComputeSpec | None = None
    timeout_minutes: Minutes | None = Field(60, description="the whole run's deadline")
    fail_fast: Flag | None = False
    max_parallel: Parallel | None = 20
    strict_parameters: Flag | None = False
    # Validated by request.py (its keys are read case-insensitively, its values are one of
    # three sources); the schema lists the callback values (message_schema).
    devops: Any = None

    _callback: Callback | None = None  # set by request.py

    @property
    def callback(self) -> Callback | None:
        return self._callback

    @property
    def repository_url(self) -> str:
        return self.repository.url

    @property
    def ref(self) -> str:
        return self.repository.ref or "main"

    @property
    def commit(self) -> str | None:
        return self.repository.commit

    @classmethod
    def from_dict(cls, data: Any) -> RunRequest:
        """Inverse of to_dict; reads no environment, so orchestrators may call it on replay."""
        request = _validated(cls, data, "")
        devops = data.get("devops") if isinstance(data, Mapping) else None
        callback = Callback.from_dict(devops) if devops else None
        return request.model_copy(update={"devops": None}).with_callback(callback)

    def with_callback(self, callback: Callback | None) -> RunRequest:
        out = self.model_copy()
        out._callback = callback
        return out

    def __repr_args__(self) -> Any:
        from notebookops.redact import redact_mapping

        for name, value in super().__repr_args__():
            yield name, redact_mapping(value) if name == "parameters" else value
        yield "callback", self.callback

    def to_dict(self, *, mask_secrets: bool = False) -> dict[str, Any]:
        """The design.md message shape; ``mask_secrets`` for anything a person may read."""
        compute = self.compute or ComputeSpec(backend="local")
        out: dict[str, Any] = {
            "repository": {"url": self.repository_url, "ref": self.ref, "commit": self.commit},
            "notebooks": [entry.to_dict() for entry in self.notebooks],
            "parameters": copy.deepcopy(self.parameters),
            "compute": compute.to_dict(),
            "timeoutMinutes": self.timeout_minutes,
            "failFast": self.fail_fast,
            "maxParallel": self.max_parallel,
        }
        if self.strict_parameters:
            out["strictParameters"] = True
        if self.callback is not None:
            out["devops"] = self.callback.to_dict(mask_secrets=mask_secrets)
        return out


# --- the callback values --------------------------------------------------------------------

_GUID_RULE = _with_hint("must be a GUID")
Guid = Annotated[str, Rule(_GUID_RULE, (Require(_GUID, _GUID_RULE),)), AfterValidator(str.lower)]
_PLAN_URL_RULE = _with_hint("must be an http(s) URL such as https://dev.azure.com/org/")
_HUB_RULE = _with_hint("must be a hub name such as build or release")
_BUILD_RULE = _with_hint("must be a build id")
_TOKEN_RULE = "must be a token string without spaces (value not shown)"  # noqa: S105


def _plan_url(value: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and not parts.password
    except ValueError:
        ok = False
    if not ok:
        raise refusal(_PLAN_URL_RULE(value))
    return value


class Callback(_Model):
    """Where and how to report back to the waiting pipeline task."""

    plan_url: Annotated[
        str,
        Rule(
            _PLAN_URL_RULE,
            (Require(r"https?://\S+", _PLAN_URL_RULE), Refuse(_CONTROL, _PLAN_URL_RULE)),
        ),
        AfterValidator(_plan_url),
    ]
    project_id: Guid
    hub_name: Annotated[
        str,
        Rule(_HUB_RULE, (Require("[A-Za-z][A-Za-z0-9_-]{0,63}", _HUB_RULE),)),
    ]
    plan_id: Guid
    job_id: Guid
    timeline_id: Guid
    task_instance_id: Guid
    auth_token: Annotated[
        str,
        Rule(
            _TOKEN_RULE,
            (Refuse(r"[\s\x00-\x1f\x7f]", _TOKEN_RULE), MaxLength(16384, _TOKEN_RULE)),
            show=False,
        ),
    ]
    task_instance_name: Annotated[str, _text(1024)] | None = None
    build_id: (
        Annotated[
            str,
            Rule(_BUILD_RULE, (Require("[A-Za-z0-9._-]{1,128}", _BUILD_RULE),)),
        ]
        | None
    ) = None

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, MASK if name == "auth_token" else value

    def to_dict(self, *, mask_secrets: bool = False) -> dict[str, str]:
        out = self.model_dump(by_alias=True, exclude_none=True)
        if mask_secrets:
            out["authToken"] = MASK
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Callback:
        """Inverse of to_dict (the camelCase values of a ``devops`` object)."""
        return _validated(cls, data, "devops")


# --- the published schema -------------------------------------------------------------------


def _any_case(name: str) -> str:
    return "^" + "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in name) + "$"


def _devops_schema() -> dict[str, Any]:
    """The body's ``devops`` object: callback values, keys in any case, blank or null = absent."""
    values = Callback.model_json_schema(by_alias=True)
    blank = [{"type": "string", "pattern": r"^\s*$"}, {"type": "null"}]
    patterns: dict[str, Any] = {}
    for name, schema in values["properties"].items():
        schema.pop("default", None)
        choices = schema.pop("anyOf", None) or [schema]
        if name == "buildId":
            choices = [*choices, {"type": "integer"}]
        patterns[_any_case(name)] = {"anyOf": [c for c in choices if c != {"type": "null"}] + blank}
    return {
        "type": "object",
        "description": "callback values, when the message properties and headers have none",
        "patternProperties": patterns,
        "additionalProperties": False,
    }


def _untitled(schema: Any) -> Any:
    """pydantic titles every field after its Python name ("Timeoutminutes"): noise to a reader."""
    if isinstance(schema, dict):
        return {
            k: _untitled(v) for k, v in schema.items() if not (k == "title" and isinstance(v, str))
        }
    return [_untitled(item) for item in schema] if isinstance(schema, list) else schema


def message_schema() -> dict[str, Any]:
    """The JSON Schema of a message body (draft 2020-12), as schemas/message.schema.json."""
    schema = _untitled(RunRequest.model_json_schema(by_alias=True))
    schema["properties"]["devops"] = _devops_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "notebookops message",
        **schema,
        "description": (
            'The body a pipeline sends to notebookops (README "The message"). Generated from '
            "notebookops/message.py by `make schema`; validate checks more than this schema "
            'can say (README "The message schema").'
        ),
    }


def schema_text() -> str:
    return json.dumps(message_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":  # `make schema`
    print(schema_text(), end="")
