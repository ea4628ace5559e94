"""devhost: a local host for Python (v2 programming model) Durable Functions apps.

It indexes `function_app`, replays orchestrators through the real azure-functions-durable
SDK with the out-of-process JSON protocol, runs activities on a worker pool, keeps durable
state in SQLite and serves the durable HTTP API. It knows nothing about notebooks.
"""

from .app import AppIndexError, load_app
from .clock import RealClock, VirtualClock
from .engine import TERMINAL, Engine, HostError
from .host import Host
from .invoke import FunctionError
from .store import StateError

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
