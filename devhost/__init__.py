"""devhost: a local host for Python (v2 programming model) Durable Functions apps.

It indexes `function_app`, replays orchestrators through the real azure-functions-durable
SDK with the out-of-process JSON protocol, runs activities on a worker pool, keeps durable
state in SQLite and serves the durable HTTP API. It knows nothing about notebooks.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import AppIndexError, load_app
    from .clock import RealClock, VirtualClock
    from .engine import TERMINAL, Engine, HostError
    from .host import Host
    from .invoke import FunctionError
    from .store import StateError

# Loaded on first use (PEP 562): the engine imports the durable SDK and azure.functions (a
# quarter of a second), which a command that only builds its argument parser need not pay.
_WHERE = {
    "AppIndexError": ".app",
    "load_app": ".app",
    "RealClock": ".clock",
    "VirtualClock": ".clock",
    "TERMINAL": ".engine",
    "Engine": ".engine",
    "HostError": ".engine",
    "Host": ".host",
    "FunctionError": ".invoke",
    "StateError": ".store",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(where, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "TERMINAL",
    "AppIndexError",
    "Engine",
    "FunctionError",
    "Host",
    "HostError",
    "RealClock",
    "StateError",
    "VirtualClock",
    "load_app",
]
