"""Index a Python (v2 programming model) function app the way the Python worker does.

The worker imports `function_app`, asks `app.get_functions()` for each function's
function.json-shaped document and refuses to load a function whose binding names do not
match its parameters. devhost does the same, and also refuses bindings it cannot honour,
so an app never half-works here.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass, field
from hashlib import sha1
from pathlib import Path
from typing import Any

TRIGGERS = {
    "orchestrationTrigger",
    "activityTrigger",
    "serviceBusTrigger",
    "httpTrigger",
    "eventGridTrigger",
}
INPUT_BINDINGS = {"durableClient"}


class AppIndexError(Exception):
    """The app cannot be hosted; the message names the function and the binding."""


@dataclass
class FunctionInfo:
    name: str
    trigger_type: str
    trigger: dict[str, Any]
    bindings: list[dict[str, Any]]
    func: Any
    params: set[str] = field(default_factory=set)

    @property
    def client_binding(self) -> str | None:
        for b in self.bindings:
            if b.get("type") == "durableClient":
                return b["name"]
        return None

    @property
    def route(self) -> str:
        return (self.trigger.get("route") or self.name).strip("/")

    @property
    def methods(self) -> list[str] | None:
        methods = self.trigger.get("methods")
        return [m.upper() for m in methods] if methods else None


@dataclass
class AppIndex:
    app_dir: Path
    functions: dict[str, FunctionInfo]
    host_json: dict[str, Any]

    def get(self, name: str) -> FunctionInfo | None:
        # Function names are case-insensitive in the Functions host.
        if name in self.functions:
            return self.functions[name]
        lowered = name.lower()
        for key, info in self.functions.items():
            if key.lower() == lowered:
                return info
        return None

    def of_type(self, trigger_type: str) -> list[FunctionInfo]:
        return [f for f in self.functions.values() if f.trigger_type == trigger_type]

    @property
    def hub_name(self) -> str:
        durable = self.host_json.get("extensions", {}).get("durableTask", {})
        return str(durable.get("hubName") or "TestHubName")

    @property
    def default_version(self) -> str | None:
        """extensions.durableTask.defaultVersion: the version of instances started without one."""
        value = self.durable_setting("defaultVersion", None)
        return None if value is None else str(value)

    def durable_setting(self, key: str, default: Any) -> Any:
        value = self.host_json.get("extensions", {}).get("durableTask", {}).get(key)
        return default if value is None else value


_SETTING = re.compile(r"%([^%\s]+)%")


def resolve_app_settings(value: Any, path: Path, where: str = "") -> Any:
    """Replace every %NAME% in host.json strings with the app setting NAME, as the host's name
    resolver does (hubName is the one users meet: "hubName": "%TASKHUB_NAME%"). App settings
    are environment variables; local.settings.json Values were loaded into them at start."""
    if isinstance(value, dict):
        return {
            k: resolve_app_settings(v, path, f"{where}.{k}" if where else k)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [resolve_app_settings(v, path, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def setting(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise AppIndexError(
                f"{path}: {where} is {value!r}, but app setting '{name}' is not set "
                "(set it in the environment or in local.settings.json Values)"
            )
        return os.environ[name]

    return _SETTING.sub(setting, value)


_MODULES: dict[Path, Any] = {}
_INDEXED: dict[Path, list[Any]] = {}


def _import_app_module(app_dir: Path) -> Any:
    """Import function_app.py under a unique module name so several apps can share a process."""
    app_dir = app_dir.resolve()
    if app_dir in _MODULES:
        return _MODULES[app_dir]
    path = app_dir / "function_app.py"
    if not path.is_file():
        raise AppIndexError(f"{path}: no function_app.py (devhost hosts v2 programming model apps)")
    if str(app_dir) not in sys.path:
        # Blueprint folders are imported as top-level packages, as the worker does.
        sys.path.insert(0, str(app_dir))
    name = "_devhost_app_" + sha1(str(app_dir).encode()).hexdigest()[:12]  # noqa: S324 - a name, not a secret
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        sys.modules.pop(name, None)
        raise
    _MODULES[app_dir] = module
    return module


def find_function_register(module: Any, path: Path) -> Any:
    """The one FunctionRegister (FunctionApp, DFApp, ...) at the module's top level, whatever
    its name, as the Python worker finds it; two distinct ones are refused, naming both."""
    from azure.functions import FunctionRegister

    found: dict[int, tuple[str, Any]] = {}
    for name, value in vars(module).items():
        if isinstance(value, FunctionRegister):
            # One object bound to two names (app = myApp = df.DFApp()) is still one app.
            found.setdefault(id(value), (name, value))
    if not found:
        raise AppIndexError(
            f"{path}: defines no function app at module level (an azure.functions.FunctionApp "
            "or azure.durable_functions.DFApp, under any name)"
        )
    if len(found) > 1:
        names = " and ".join(f"'{name}' ({type(value).__name__})" for name, value in found.values())
        raise AppIndexError(
            f"{path}: more than one function app is defined at module level: {names}; "
            "the Functions host indexes exactly one (register the others' functions on it, "
            "or turn them into Blueprints)"
        )
    return next(iter(found.values()))[1]


def _signature_params(func: Any) -> set[str]:
    target = inspect.unwrap(func)
    try:
        return set(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return set()


def load_app(app_dir: str | Path) -> AppIndex:
    app_dir = Path(app_dir).resolve()
    host_path = app_dir / "host.json"
    host_json: dict[str, Any] = {}
    if host_path.is_file():
        try:
            host_json = json.loads(host_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise AppIndexError(f"{host_path}: not valid JSON: {exc}") from exc
        host_json = resolve_app_settings(host_json, host_path)
    module = _import_app_module(app_dir)
    app = find_function_register(module, app_dir / "function_app.py")
    functions: dict[str, FunctionInfo] = {}
    # get_functions() validates names into the app object and raises on a second call.
    indexed = _INDEXED.get(app_dir)
    if indexed is None:
        indexed = _INDEXED[app_dir] = list(app.get_functions())
    for fn in indexed:
        name = fn.get_function_name()
        doc = json.loads(fn.get_function_json())
        bindings = doc.get("bindings", [])
        for b in bindings:
            b["direction"] = str(b.get("direction", "")).lower()
        triggers = [b for b in bindings if str(b.get("type", "")).endswith("Trigger")]
        if len(triggers) != 1:
            raise AppIndexError(
                f"function '{name}': expected exactly one trigger, found {len(triggers)}"
            )
        trigger = triggers[0]
        if trigger["type"] not in TRIGGERS:
            raise AppIndexError(
                f"function '{name}': trigger type '{trigger['type']}' is not supported by devhost "
                f"(supported: {', '.join(sorted(TRIGGERS))})"
            )
        user = fn.get_user_function()
        params = _signature_params(user)
        for b in bindings:
            btype, bname = b.get("type"), b.get("name")
            if b is trigger or btype in INPUT_BINDINGS:
                pass
            elif btype == "http" and b["direction"] == "out" and trigger["type"] == "httpTrigger":
                if bname != "$return":
                    raise AppIndexError(
                        f"function '{name}': http output binding '{bname}' is not supported by "
                        "devhost; return the HttpResponse instead ($return)"
                    )
                continue
            else:
                raise AppIndexError(
                    f"function '{name}': binding '{bname}' of type '{btype}' is not supported by devhost"
                )
            # The worker refuses these too: it calls functions with keyword arguments named
            # after the bindings. The orchestrator handle takes `context` by construction.
            if bname not in params and btype != "orchestrationTrigger":
                raise AppIndexError(
                    f"function '{name}': binding '{bname}' ({btype}) has no parameter of that name"
                )
        if name in functions:
            raise AppIndexError(f"function '{name}' is defined twice")
        functions[name] = FunctionInfo(
            name=name,
            trigger_type=trigger["type"],
            trigger=trigger,
            bindings=bindings,
            func=user,
            params=params,
        )
    return AppIndex(app_dir=app_dir, functions=functions, host_json=host_json)
