"""Seal the pipeline's AuthToken before it enters durable state.

Orchestration inputs and histories are stored by the durable backend and shown by its
status API (`showInput` defaults to true), so the token travels sealed with Fernet
(AES-128-CBC + HMAC) and is opened only inside the activities that call Azure DevOps or
git. The key comes from NOTEBOOKOPS_SECRET_KEY, else from WEBSITE_AUTH_ENCRYPTION_KEY,
which App Service and Azure Functions set for every app.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets

from cryptography.fernet import Fernet, InvalidToken

KEY_SETTINGS = ("NOTEBOOKOPS_SECRET_KEY", "WEBSITE_AUTH_ENCRYPTION_KEY")
PREFIX = "sealed:v1:"


class SealingError(Exception):
    """No key is configured, or a sealed value cannot be opened with this key."""


def _fernet() -> Fernet:
    for name in KEY_SETTINGS:
        material = os.environ.get(name, "").strip()
        if material:
            # Any string works as key material; Fernet wants 32 url-safe base64 bytes.
            digest = hashlib.sha256(b"notebookops-seal\0" + material.encode()).digest()
            return Fernet(base64.urlsafe_b64encode(digest))
    raise SealingError(
        "no key to seal the pipeline token: set the app setting NOTEBOOKOPS_SECRET_KEY "
        "(Azure sets WEBSITE_AUTH_ENCRYPTION_KEY for deployed apps)"
    )


def new_key() -> str:
    return secrets.token_urlsafe(32)


def seal(value: str | None) -> str | None:
    if value is None:
        return None
    return PREFIX + _fernet().encrypt(value.encode()).decode()


def unseal(value: str | None) -> str | None:
    if value is None:
        return None
    if not value.startswith(PREFIX):
        raise SealingError("value is not sealed by notebookops")
    try:
        return _fernet().decrypt(value[len(PREFIX) :].encode()).decode()
    except InvalidToken as exc:
        raise SealingError(
            "the sealed pipeline token cannot be opened with the current key "
            "(was NOTEBOOKOPS_SECRET_KEY changed while the run was going?)"
        ) from exc
