"""Credentials for git over HTTP(S), and the scrubbing that keeps them out of text.

The token travels as an ``http.<url>.extraHeader`` set through the ``GIT_CONFIG_COUNT`` /
``GIT_CONFIG_KEY_n`` / ``GIT_CONFIG_VALUE_n`` environment of one git command: argv is readable
by other local users (``/proc/<pid>/cmdline``), and the URL and ``.git/config`` end up on disk.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit, urlunsplit

from notebookops.redact import MASK, redact

APP_TOKEN_SETTING = "NOTEBOOKOPS_GIT_TOKEN"  # noqa: S105 - the setting name, not a token
REDACTED = MASK

_DEV_AZURE_HOSTS = {"dev.azure.com", "ssh.dev.azure.com"}
_VISUALSTUDIO_SUFFIX = ".visualstudio.com"
# userinfo in any URL-looking text, e.g. git echoing "https://user:pat@host/..."
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s'\"]+@")
_AUTH_HEADER_RE = re.compile(r"(?i)(authorization:\s*)(basic|bearer)?\s*\S+")


def strip_credentials(url: str) -> str:
    """The URL without user-info, query or fragment, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO_RE.sub(r"\g<scheme>", url)
    if not parts.scheme or not parts.netloc:
        return _USERINFO_RE.sub(r"\g<scheme>", url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal lost its brackets in .hostname
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def url_userinfo_secrets(url: str) -> list[str]:
    """Password (and user) embedded in a URL, raw and percent-decoded, for scrubbing."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found: list[str] = []
    for value in (parts.password, parts.username):
        if value:
            found.extend({value, unquote(value)})
    return found


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """The house redaction plus what git adds: URL user-info and Authorization header values."""
    text = redact(text, secrets)
    text = _USERINFO_RE.sub(r"\g<scheme>" + REDACTED + "@", text)
    return _AUTH_HEADER_RE.sub(r"\g<1>" + REDACTED, text)


def azure_devops_org(url: str | None) -> str | None:
    """Organization of an Azure DevOps URL (dev.azure.com/{org} or {org}.visualstudio.com)."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if host in _DEV_AZURE_HOSTS:
        segments = [s for s in parts.path.split("/") if s]
        if host == "ssh.dev.azure.com" and segments[:1] == ["v3"]:
            segments = segments[1:]
        return unquote(segments[0]).lower() if segments else None
    if host.endswith(_VISUALSTUDIO_SUFFIX) and host != _VISUALSTUDIO_SUFFIX[1:]:
        return host[: -len(_VISUALSTUDIO_SUFFIX)].split(".")[-1]
    return None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _header_scope(url: str) -> str | None:
    """``scheme://host[:port]/`` that the header is bound to, or None if no header may go."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    host = parts.hostname
    if not host:
        return None
    scheme = parts.scheme.lower()
    # A Basic header over plain HTTP is readable on the wire; only loopback (tests) may do it.
    if scheme != "https" and not (scheme == "http" and _is_loopback(host)):
        return None
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return f"{scheme}://{netloc}/"


@dataclass(frozen=True, repr=False)
class GitAuth:
    """A token for one repository host, sent as ``Authorization: Basic base64(':' + token)``."""

    token: str = field(repr=False)
    scope: str  # scheme://host[:port]/ the header is limited to
    source: str  # "pipeline" or "app-setting", for logs

    def __post_init__(self) -> None:
        if not self.token or any(c in self.token for c in "\r\n\0"):
            raise ValueError("git token is empty or contains line breaks")

    def __repr__(self) -> str:
        return f"GitAuth(scope={self.scope!r}, source={self.source!r}, token={REDACTED!r})"

    __str__ = __repr__

    @classmethod
    def for_request(
        cls,
        url: str,
        plan_url: str | None,
        pipeline_token: str | None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> GitAuth | None:
        """Pick the credential for cloning ``url`` on behalf of the pipeline at ``plan_url``.

        The pipeline's job token is only ever offered to Azure Repos of the pipeline's own
        organization; every other HTTPS host gets the app setting's token, if there is one.
        """
        scope = _header_scope(url)
        if scope is None:
            return None
        org = azure_devops_org(url)
        if pipeline_token and org is not None and org == azure_devops_org(plan_url):
            return cls(token=pipeline_token, scope=scope, source="pipeline")
        env = os.environ if environ is None else environ
        app_token = env.get(APP_TOKEN_SETTING, "")
        if app_token:
            return cls(token=app_token, scope=scope, source="app-setting")
        return None

    @property
    def header_value(self) -> str:
        encoded = base64.b64encode((":" + self.token).encode("utf-8")).decode("ascii")
        return f"Basic {encoded}"

    def secrets(self) -> list[str]:
        """Secrets to scrub; notebookops.redact also masks their Basic/base64 forms."""
        return [self.token]

    def git_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment entries that add the header to one git command, appended after any
        ``GIT_CONFIG_*`` entries already present in ``base`` (default: this process)."""
        env = os.environ if base is None else base
        try:
            start = int(env.get("GIT_CONFIG_COUNT", "0"))
        except ValueError:
            start = 0
        return {
            "GIT_CONFIG_COUNT": str(start + 1),
            f"GIT_CONFIG_KEY_{start}": f"http.{self.scope}.extraHeader",
            f"GIT_CONFIG_VALUE_{start}": f"Authorization: {self.header_value}",
        }
