"""Pick a compute backend by name, the way papermill picks an engine.

Factories are registered by dotted path ("module:attribute") and imported on first use, so importing
this module (and starting the app, and replaying the orchestrator) never imports an Azure SDK.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable

from notebookops.compute.base import Backend, PermanentBackendError

DEFAULT_BACKEND_ENV = "NOTEBOOKOPS_DEFAULT_BACKEND"
DEFAULT_BACKEND = "local"

BackendFactory = Callable[[], Backend]

_lock = threading.Lock()
_factories: dict[str, str | BackendFactory] = {
    "local": "notebookops.compute.local:LocalBackend",
    "azureml": "notebookops.compute.azureml:AzureMLBackend",
    "azureml-v1": "notebookops.compute.azureml_v1:AzureMLV1Backend",
}


def register_backend(name: str, factory: str | BackendFactory) -> None:
    """Register (or replace) a backend: a callable returning a Backend, or "module:attribute"."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_backend: name must be a non-empty string, got {name!r}")
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        if not module or not attribute:
            raise ValueError(
                "register_backend: factory must look like 'package.module:Attribute', "
                f"got {factory!r}"
            )
    elif not callable(factory):
        raise ValueError(
            f"register_backend: factory must be callable or a dotted path, got {factory!r}"
        )
    with _lock:
        _factories[name] = factory


def known_backends() -> list[str]:
    with _lock:
        return sorted(_factories)


def _resolve(name: str, factory: str | BackendFactory) -> BackendFactory:
    if not isinstance(factory, str):
        return factory
    module_name, _, attribute = factory.partition(":")
    try:
        resolved = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise PermanentBackendError(
            f"compute backend {name!r} is not available ({type(exc).__name__}: {exc}); "
            f"known backends: {', '.join(known_backends())}"
        ) from exc
    with _lock:
        # Cache the import, unless someone re-registered the name meanwhile.
        if _factories.get(name) == factory:
            _factories[name] = resolved
    return resolved


def get_backend(name: str | None = None) -> Backend:
    """A fresh backend instance for `name` (default: `default_backend_name()`).

    Unknown or unimportable names raise PermanentBackendError naming the backend and the known
    names; so do backends that refuse to start (e.g. `local` when not enabled).
    """
    if name is None:
        name = default_backend_name()
    with _lock:
        factory = _factories.get(name) if isinstance(name, str) else None
    if factory is None:
        raise PermanentBackendError(
            f"unknown compute backend {name!r}; known backends: {', '.join(known_backends())}"
        )
    return _resolve(name, factory)()


def default_backend_name() -> str:
    """The backend used when a request names none: env NOTEBOOKOPS_DEFAULT_BACKEND, else 'local'."""
    return os.environ.get(DEFAULT_BACKEND_ENV, "").strip() or DEFAULT_BACKEND
