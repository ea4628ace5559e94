"""Compute backends: one contract (`base`), one registry, one module per backend.

Only the light, SDK-free modules are re-exported here; backends are imported by the registry
on demand.
"""

from notebookops.compute.base import (
    CANCELED,
    FAILED,
    QUEUED,
    RUNNING,
    STATES,
    SUCCEEDED,
    TERMINAL_STATES,
    TIMED_OUT,
    Backend,
    BackendError,
    PermanentBackendError,
    PollPolicy,
    RunError,
    RunHandle,
    RunNotFinishedError,
    RunSpec,
    RunStatus,
    run_key,
)
from notebookops.compute.registry import (
    default_backend_name,
    get_backend,
    known_backends,
    register_backend,
)

__all__ = [
    "CANCELED",
    "FAILED",
    "QUEUED",
    "RUNNING",
    "STATES",
    "SUCCEEDED",
    "TERMINAL_STATES",
    "TIMED_OUT",
    "Backend",
    "BackendError",
    "PermanentBackendError",
    "PollPolicy",
    "RunError",
    "RunHandle",
    "RunNotFinishedError",
    "RunSpec",
    "RunStatus",
    "default_backend_name",
    "get_backend",
    "known_backends",
    "register_backend",
    "run_key",
]
