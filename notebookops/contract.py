"""JSON shapes declared once: a dataclass is the declaration, pydantic checks what comes in.

Every shape that travels between the orchestrator and its activities (and the backend
contract in compute/base.py) is a plain dataclass that mixes in ``Contract``:

- ``to_dict()`` writes its JSON form: camelCase keys, nested shapes as JSON objects; a field
  declared with ``metadata=OMIT_NONE`` is left out while None, so the JSON stays as small
  as the orchestrator's own dicts always were;
- ``from_dict(data)`` checks a JSON value against the declaration with pydantic (a
  ``TypeAdapter`` of the dataclass, made once per class, strict: no ``"1"`` for 1, no
  ``true`` for a number) and builds the object; every problem
  is reported at once, each naming its field path and value, as a ValueError.

pydantic is imported on the first ``from_dict`` only. Importing the declarations stays
stdlib-cheap, because ``import function_app`` (the orchestrator's process, benchmark 3) and
every local runner process (benchmark 1) import them and pay nothing for validation they
never do. Unknown keys are ignored, so state written by a newer version still reads.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cache
from typing import Any, ClassVar, Self

__all__ = ["OMIT_NONE", "Contract", "camel"]

_OMIT = "notebookops.omit_none"
# ``field(default=None, metadata=OMIT_NONE)``: the key is left out of to_dict() while None.
OMIT_NONE = {_OMIT: True}
_SHOWN_VALUE_CHARS = 80


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


class Contract:
    """Mixin for a dataclass that travels as JSON (see the module's docstring)."""

    # Read by pydantic for stdlib dataclasses: camelCase on the wire, snake_case in Python.
    __pydantic_config__: ClassVar[dict[str, Any]] = {
        "alias_generator": camel,
        "populate_by_name": True,
        "extra": "ignore",
    }

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        from pydantic import ValidationError

        try:
            # Strict types (no "1" for 1, no true for 1.0) over the JSON form, where strict
            # mode still reads nested objects into their declared dataclasses.
            return _adapter(cls).validate_json(json.dumps(data, default=_unknown), strict=True)
        except ValidationError as exc:
            raise ValueError(describe(cls.__name__, exc)) from None


@cache
def _adapter(cls: type) -> Any:
    from pydantic import TypeAdapter

    return TypeAdapter(cls)


def _unknown(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if item is None and f.metadata.get(_OMIT):
                continue
            out[camel(f.name)] = _plain(item)
        return out
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def describe(where: str, exc: Any) -> str:
    """One line per problem of a pydantic ValidationError: ``where: field 'a.b' ...``."""
    problems = []
    for error in exc.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"])
        if error["type"] == "missing":
            problems.append(f"missing field {path!r}")
            continue
        shown = repr(error.get("input"))
        if len(shown) > _SHOWN_VALUE_CHARS:
            shown = shown[: _SHOWN_VALUE_CHARS - 1] + "…"
        if error["type"] == "value_error":  # a check of the declaration's own (__post_init__)
            cause = error.get("ctx", {}).get("error")
            text = str(cause) if cause is not None else error["msg"]
            problems.append(text.removeprefix(f"{where}: "))
        elif path:
            problems.append(f"field {path!r} has invalid value {shown} ({error['msg']})")
        else:
            problems.append(f"expected a JSON object, got {shown} ({error['msg']})")
    return f"{where}: " + "; ".join(problems)
