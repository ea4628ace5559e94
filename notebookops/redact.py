"""The one redaction function: every log line, status, output and error text passes through here.

Secrets take more shapes than their plain text: the DevOps callback sends the pipeline token as
HTTP Basic auth (base64 of ":" + token), URLs carry it percent-encoded, and JSON escapes it.
All of those forms are masked.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import traceback
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

__all__ = [
    "MASK",
    "RedactingFilter",
    "forget_secret",
    "install_log_redaction",
    "is_secret_key",
    "redact",
    "redact_known",
    "redact_mapping",
    "register_secret",
    "registered_secret_count",
]

MASK = "***"
# Shorter secrets would mask ordinary words and digits in every log line.
MIN_REGISTERED_LENGTH = 4
# One token per pipeline run is registered; the oldest are dropped so a long-lived host does
# not scan thousands of expired tokens on every log record.
MAX_REGISTERED = 512

_SECRET_KEY = re.compile(
    r"(token|password|passwd|secret|authorization|credential|connectionstring|apikey|"
    r"accountkey|sharedaccesskey|[_-]key)$|^(pat|sas|key)$",
    re.IGNORECASE,
)

_lock = threading.Lock()
_registry: OrderedDict[str, frozenset[str]] = OrderedDict()
_registry_forms: tuple[str, ...] = ()


def _forms(secret: str) -> set[str]:
    """The shapes a secret takes in headers, URLs and JSON."""
    encoded = secret.encode("utf-8")
    basic = base64.b64encode(b":" + encoded).decode("ascii")
    forms = {
        secret,
        basic,
        basic.rstrip("="),
        base64.urlsafe_b64encode(b":" + encoded).decode("ascii"),
        base64.b64encode(encoded).decode("ascii"),
        quote(secret, safe=""),
        quote_plus(secret, safe=""),
        json.dumps(secret)[1:-1],
    }
    return {form for form in forms if form.strip()}


def _replace(text: str, forms: Iterable[str]) -> str:
    # Longest first, so a secret that contains another is masked whole.
    for form in sorted(forms, key=len, reverse=True):
        if form in text:
            text = text.replace(form, MASK)
    return text


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Mask every given secret, and every registered one, in ``text`` (any length of secret)."""
    text = str(text)
    forms: set[str] = set()
    for secret in secrets:
        if isinstance(secret, str) and secret.strip():
            forms |= _forms(secret)
    forms.update(_registry_forms)
    return _replace(text, forms) if forms else text


def redact_known(text: str) -> str:
    """Mask the registered secrets only."""
    return _replace(str(text), _registry_forms) if _registry_forms else str(text)


def register_secret(secret: str | None) -> bool:
    """Mask a secret process-wide in logs and outputs; False when too short to register."""
    global _registry_forms
    if not isinstance(secret, str) or len(secret.strip()) < MIN_REGISTERED_LENGTH:
        return False
    with _lock:
        _registry[secret] = _registry.get(secret) or frozenset(_forms(secret))
        _registry.move_to_end(secret)
        while len(_registry) > MAX_REGISTERED:
            _registry.popitem(last=False)
        _registry_forms = _all_forms()
    return True


def forget_secret(secret: str) -> None:
    """Stop masking a secret (its run is over and the token has expired)."""
    global _registry_forms
    with _lock:
        _registry.pop(secret, None)
        _registry_forms = _all_forms()


def registered_secret_count() -> int:
    return len(_registry)


def _all_forms() -> tuple[str, ...]:
    forms: set[str] = set().union(*_registry.values())
    return tuple(sorted(forms, key=len, reverse=True))


def is_secret_key(key: object) -> bool:
    """Whether a mapping key names a value that must never be shown (AuthToken, *_KEY, ...)."""
    return isinstance(key, str) and bool(_SECRET_KEY.search(key.replace("-", "_")))


def redact_mapping(obj: Any) -> Any:
    """A copy of a JSON-like value with secret-looking keys masked and known secrets scrubbed."""
    if isinstance(obj, Mapping):
        return {
            key: (MASK if is_secret_key(key) and value not in (None, "") else redact_mapping(value))
            for key, value in obj.items()
        }
    if isinstance(obj, list | tuple):
        return type(obj)(redact_mapping(item) for item in obj)
    if isinstance(obj, str):
        return redact_known(obj)
    return obj


class RedactingFilter(logging.Filter):
    """Scrubs registered secrets from a record's message, arguments and traceback text."""

    def filter(self, record: logging.LogRecord) -> bool:
        _scrub_record(record)
        return True


def _scrub_record(record: logging.LogRecord) -> None:
    if not _registry_forms:
        return
    try:
        message = record.getMessage()
    except Exception:
        # logging would print the raw msg and args to stderr when formatting fails later.
        message = f"{record.msg!s} (unformattable arguments: {record.args!r})"
    cleaned = redact_known(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    if record.exc_info and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    if record.exc_text:
        record.exc_text = redact_known(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_known(record.stack_info)


def install_log_redaction() -> None:
    """Scrub registered secrets from every log record, whichever handler later emits it.

    A record factory sees every record at creation, so handlers added after this call (the
    Functions worker's, pytest's) are covered too. Safe to call any number of times.
    """
    with _lock:
        current = logging.getLogRecordFactory()
        if getattr(current, "_notebookops_redacting", False):
            return

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = current(*args, **kwargs)
            _scrub_record(record)
            return record

        factory._notebookops_redacting = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(factory)
