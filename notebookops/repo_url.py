"""Is this ``repository.url`` safe to hand to git? The rules are listed in README "The message".

These are the URL rules a JSON Schema cannot express (URL parsing, IPv6 hosts, ports, the
Azure DevOps organization user part that is taken out). Every refusal shows the URL with its
user part masked, and nothing here lets a value that git could read as an option (a leading
``-`` in a host, user or path) through.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from notebookops.redact import MASK

__all__ = ["ALLOW_LOCAL_REPOS_ENV", "UrlRefused", "check_repository_url", "mask_url_user"]

ALLOW_LOCAL_REPOS_ENV = "NOTEBOOKOPS_ALLOW_LOCAL_REPOS"
# A one-letter user name would mask every such letter of an error line, so short ones not.
MIN_SECRET_CHARS = 4

CREDENTIALS_IN_URL = (
    "must not embed credentials (a token, user name or password); the app authenticates to "
    "git on its own (NOTEBOOKOPS_GIT_TOKEN or the pipeline token)"
)
_SCP_LIKE = re.compile(r"(?P<user>[A-Za-z0-9._~%-]+)@[A-Za-z0-9][A-Za-z0-9.-]*:[^-].*")
_SSH_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")


class UrlRefused(ValueError):
    """``problem`` (a rule, without the value), ``shown`` (the URL masked), ``secrets`` (the
    parts of a user part that no error line may echo)."""

    def __init__(self, problem: str, shown: str, secrets: list[str]) -> None:
        super().__init__(problem)
        self.problem, self.shown, self.secrets = problem, shown, secrets


def mask_url_user(value: str) -> str:
    """The URL as errors show it: anything before the host's ``@`` replaced by the mask."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        scheme, rest = "", value
    authority, slash, tail = rest.partition("/")
    if "@" not in authority:
        return value
    masked = MASK + authority[authority.rindex("@") :] + slash + tail
    return f"{scheme}://{masked}" if sep else masked


def check_repository_url(value: str, *, allow_local: bool) -> str:
    """The URL git is given (the Azure DevOps organization user part taken out), or UrlRefused.

    The caller has checked already that it is a non-empty string of at most 2048 characters
    without spaces or control characters (message.RepositoryUrl).
    """
    shown = mask_url_user(value)
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in unquote(value)):
        raise UrlRefused(
            "must be at most 2048 characters without spaces or control characters "
            "(percent-encoded ones too)",
            shown,
            [],
        )
    lower = value.lower()
    if lower.startswith(("https://", "ssh://", "http://")):
        return _network_url(value, shown)
    scp = _SCP_LIKE.fullmatch(value)
    if scp:
        if scp["user"].startswith("-") or "%" in scp["user"]:
            raise UrlRefused(
                "has a user name git could read as an option or a credential", shown, []
            )
        return value
    if lower.startswith("file://") or value.startswith("/"):
        if not allow_local:
            raise UrlRefused(
                f"local repositories are allowed only when {ALLOW_LOCAL_REPOS_ENV}=1", shown, []
            )
        if lower.startswith("file://"):
            parts = urlsplit(value)
            if parts.netloc not in ("", "localhost"):
                raise UrlRefused("file:// URL must not name a host", shown, [])
            if not parts.path:
                raise UrlRefused("file:// URL has no path", shown, [])
        return value
    if "@" in value.split("/")[0] and ":" in value.split("@")[0]:
        raise UrlRefused(CREDENTIALS_IN_URL, shown, [])
    raise UrlRefused("must be an https:// URL, ssh://host/path or git@host:path", shown, [])


def _network_url(value: str, shown: str) -> str:
    try:
        parts = urlsplit(value)
        host, user, password = parts.hostname, parts.username, parts.password
    except ValueError:
        raise UrlRefused(
            "is not a valid URL (check the brackets around an IPv6 address)", shown, []
        ) from None
    if user is not None or password is not None:
        userinfo = parts.netloc.rpartition("@")[0]
        candidates = {userinfo, unquote(userinfo), user, password, unquote(password or "")}
        secrets = [s for s in candidates if s and len(s) >= MIN_SECRET_CHARS]
        scheme = parts.scheme.lower()
        if password is None and scheme == "ssh" and _SSH_USER.fullmatch(user or ""):
            pass  # ssh://git@host/path: the account name, authenticated by a key
        elif password is None and _is_devops_org_user(parts):
            # https://org@dev.azure.com/org/...: Azure DevOps' own clone URL names the
            # organization, not a credential; it is taken out so git never asks for it.
            value = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        else:
            raise UrlRefused(CREDENTIALS_IN_URL, shown, secrets)
    if value.lower().startswith("http://"):
        raise UrlRefused("must use https:// (or ssh), not http://", shown, [])
    if not host:
        raise UrlRefused("has no host name", shown, [])
    if not _host_name_ok(host, parts.netloc):
        raise UrlRefused("must name a host of letters, digits, dots and dashes", shown, [])
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 1 <= port <= 65535:
        raise UrlRefused("must have a port from 1 to 65535", shown, [])
    if parts.path.lstrip("/").startswith("-"):
        raise UrlRefused("must not have a path that begins with -", shown, [])
    return value


def _host_name_ok(host: str, netloc: str) -> bool:
    if "[" in netloc:
        try:
            return ipaddress.ip_address(host).version == 6
        except ValueError:
            return False
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in host.split("."))


def _is_devops_org_user(parts: Any) -> bool:
    first = parts.path.lstrip("/").split("/")[0]
    return (parts.hostname or "") == "dev.azure.com" and (parts.username or "").lower() == (
        unquote(first).lower()
    )
