"""Helpers for devhost tests: a host on the sample app with a fresh state folder."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

SAMPLE_APP = Path(__file__).parent / "apps" / "sample"


def http(
    method: str,
    url: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, dict[str, str]]:
    """One real HTTP request on loopback; returns (status, parsed JSON, text or None, headers)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback only
    request.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - loopback
            status, payload, hdrs = response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        status, payload, hdrs = err.code, err.read(), dict(err.headers)
    if not payload:
        return status, None, hdrs
    try:
        return status, json.loads(payload), hdrs
    except ValueError:  # a text body (an HTTP function's own answer)
        return status, payload.decode("utf-8", "replace"), hdrs


APPS = Path(__file__).parent / "apps"


def follow_status(status_url: str, timeout: float = 30.0, until: Any = None) -> dict[str, Any]:
    """Poll a statusQueryGetUri as a client would: 202 while running, 200 when done (or until
    `until(payload)` holds); returns the last status payload."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        code, payload, _ = http("GET", status_url)
        if code == 200 or (until is not None and payload and until(payload)):
            return payload
        assert code == 202, (code, payload)
        assert time.monotonic() < deadline, f"{status_url} still {payload}"
        time.sleep(0.05)
