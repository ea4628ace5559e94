"""Resolve a repository ref to one commit, keep a shared checkout of it, and find its notebooks.

The commit is resolved once (``git ls-remote``) and every later step, including activities on
other workers (:func:`ensure_checkout`), uses that SHA, so a branch moving mid-run cannot mix
two versions of the notebooks. Checkouts are cached per (URL, commit) and built in a temporary
directory that is renamed into place under a file lock, so concurrent callers share one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import nbformat

from notebookops.gitauth import GitAuth, scrub, strip_credentials, url_userinfo_secrets
from notebookops.payloads import INVALID, NOT_FOUND, CloneResult, ResolvedNotebook

log = logging.getLogger(__name__)

CHECKOUT_DIR_SETTING = "NOTEBOOKOPS_CHECKOUT_DIR"
ALLOW_LOCAL_SETTING = "NOTEBOOKOPS_ALLOW_LOCAL_REPOS"
GIT_TIMEOUT_SETTING = "NOTEBOOKOPS_GIT_TIMEOUT"
DEFAULT_GIT_TIMEOUT = 300.0

_REMOTE_SCHEMES = ("https", "http", "ssh", "git")
_SHA_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_SCP_LIKE_RE = re.compile(r"^(?:[^@/:]+@)?[^/:]{2,}:")  # user@host:path; 2+ chars skips C:
# git's "<transport>::<address>" form (ext::, fd::, ...) can run arbitrary commands.
_TRANSPORT_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*::")
_BAD_REF_RE = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")
_GLOB_CHARS = frozenset("*?[")
_SYMLINK_MODE = 0o120000
_AUTH_FAILURE = (
    "authentication failed",
    "could not read username",
    "could not read password",
    "terminal prompts disabled",
    "returned error: 401",
    "returned error: 403",
    "permission denied (publickey",
    "access denied",
)
# TF401019: Azure Repos' "does not exist or you do not have permissions".
_NOT_A_REPO = ("does not appear to be a git repository", "repository not found", "tf401019")


class RepoError(Exception):
    """A repository problem. ``permanent`` errors will not go away by retrying."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------- running git


@dataclass(frozen=True)
class _Remote:
    url: str
    safe_url: str
    auth: GitAuth | None
    timeout: float
    allow_file: bool

    @property
    def secrets(self) -> list[str]:
        found = url_userinfo_secrets(self.url)
        if self.auth is not None:
            found.extend(self.auth.secrets())
        return found


def _git_timeout() -> float:
    raw = os.environ.get(GIT_TIMEOUT_SETTING, "")
    try:
        return float(raw) if raw else DEFAULT_GIT_TIMEOUT
    except ValueError:
        raise RepoError(
            f"app setting {GIT_TIMEOUT_SETTING} must be a number of seconds, got {raw!r}",
            permanent=True,
        ) from None


def _git_env(remote: _Remote) -> dict[str, str]:
    env = {
        # Never block a worker on a credentials prompt, terminal or GUI.
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "",
        "SSH_ASKPASS": "",
        "GCM_INTERACTIVE": "never",
        "GIT_SSH_COMMAND": os.environ.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes"),
        # ext:: and fd:: transports can run commands; allow only plain transports.
        "GIT_ALLOW_PROTOCOL": ":".join(
            (*_REMOTE_SCHEMES, "file") if remote.allow_file else _REMOTE_SCHEMES
        ),
    }
    if remote.auth is not None:
        env.update(remote.auth.git_env())
    return env


def _run_git(args: Sequence[str], cwd: Path, remote: _Remote, what: str) -> str:
    """Run one git command; failures become RepoError with scrubbed, classified text."""
    return _git(args, cwd, _git_env(remote), remote.timeout, remote, what).removesuffix("\n")


def _git(
    args: Sequence[str],
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    remote: _Remote | None,
    what: str,
) -> str:
    """git's stdout (undecodable bytes kept as surrogates, as paths need). A command that
    outlives `timeout` is killed with the helpers it started (git-remote-https, ssh)."""
    # The C locale: the failure markers below are git's English messages.
    env = {**os.environ, **env, "LANGUAGE": "C", "LC_ALL": "C"}
    try:
        process = subprocess.Popen(
            ["git", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError as exc:
        if exc.filename != "git":
            raise
        raise RepoError("git is not installed or not on PATH", permanent=False) from None
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(process)
        process.communicate()
        where = f" of {remote.safe_url}" if remote else ""
        raise RepoError(f"{what}{where} timed out after {timeout:g} s", permanent=False) from None
    if process.returncode:
        stderr = err.decode("utf-8", "replace")
        if remote is None:
            raise RepoError(f"{what} failed: {' '.join(stderr.split())}", permanent=False)
        raise _classify(stderr, remote, what)
    return out.decode("utf-8", "surrogateescape")


def _kill_tree(process: subprocess.Popen[bytes]) -> None:
    import psutil

    try:
        helpers = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        helpers = []
    for victim in (process, *helpers):
        with contextlib.suppress(OSError, psutil.Error):
            victim.kill()


def _classify(stderr: str, remote: _Remote, what: str) -> RepoError:
    detail = scrub(" ".join(stderr.split()), remote.secrets).strip("'").strip()
    lowered = detail.lower()
    if any(marker in lowered for marker in _AUTH_FAILURE):
        return RepoError(
            f"authentication to {remote.safe_url} failed during {what}: {detail}", permanent=True
        )
    if any(marker in lowered for marker in _NOT_A_REPO):
        return RepoError(
            f"{what}: {remote.safe_url} is not a reachable repository: {detail}", permanent=True
        )
    return RepoError(f"{what} of {remote.safe_url} failed: {detail}", permanent=False)


def _permanent(message: str) -> RepoError:
    return RepoError(message, permanent=True)


# --------------------------------------------------------------------------- validation


def _is_local(url: str) -> bool:
    lowered = url.lower()
    if lowered.startswith("file:"):
        return True
    if "://" in url:
        return False
    return not _SCP_LIKE_RE.match(url)


def _make_remote(url: str, auth: GitAuth | None) -> _Remote:
    if not isinstance(url, str) or not url.strip():
        raise _permanent(f"repository.url must be a non-empty string, got {url!r}")
    url = url.strip()
    safe = strip_credentials(url)
    if url.startswith("-"):
        raise _permanent(f"repository.url {safe!r} must not start with '-'")
    allow_local = os.environ.get(ALLOW_LOCAL_SETTING, "") == "1"
    if _is_local(url):
        if not allow_local:
            raise _permanent(
                f"repository.url {safe!r} is a local path or file:// URL; local repositories "
                f"are refused unless the app setting {ALLOW_LOCAL_SETTING}=1 is set"
            )
    elif _TRANSPORT_RE.match(url) or (
        "://" in url and url.split("://", 1)[0].lower() not in _REMOTE_SCHEMES
    ):
        raise _permanent(
            f"repository.url {safe!r} uses an unsupported scheme; use one of "
            f"{', '.join(_REMOTE_SCHEMES)}"
        )
    return _Remote(url, safe, auth, _git_timeout(), allow_local)


def _check_ref(ref: str) -> str:
    if not isinstance(ref, str) or not ref.strip():
        raise _permanent(f"repository.ref must be a non-empty string, got {ref!r}")
    ref = ref.strip()
    if (
        ref.startswith(("-", "/"))
        or ref.endswith(("/", ".", ".lock"))
        or _BAD_REF_RE.search(ref)
        or ref == "@"
    ):
        raise _permanent(f"repository.ref {ref!r} is not a valid git ref name")
    return ref


def _check_commit(commit: str) -> str:
    if not isinstance(commit, str) or not _SHA_RE.match(commit.strip().lower()):
        from notebookops.request import FULL_COMMIT_RULE

        # The words validate uses, so both commands refuse a short id the same way.
        raise _permanent(
            f"repository.commit: {FULL_COMMIT_RULE}, got {json.dumps(commit, ensure_ascii=False)}"
        )
    return commit.strip().lower()


# --------------------------------------------------------------------------- ref resolution


def _ls_remote_candidates(ref: str) -> list[str]:
    if ref == "HEAD" or ref.startswith("refs/"):
        return [ref]
    return [f"refs/heads/{ref}", f"refs/tags/{ref}"]


def _resolve_ref(remote: _Remote, ref: str, scratch: Path) -> tuple[str, str]:
    """(commit SHA, full ref name) for ``ref``; a branch wins over a tag of the same name."""
    candidates = _ls_remote_candidates(ref)
    # Protocol v2 filters by prefix, so an annotated tag's peeled line must be asked for.
    wanted = [*candidates, *(f"{name}^{{}}" for name in candidates)]
    out = _run_git(
        ["ls-remote", "--", remote.url, *wanted], scratch, remote, f"resolving ref {ref!r}"
    )
    advertised: dict[str, str] = {}
    for line in out.splitlines():
        sha, _, name = line.partition("\t")
        advertised[name.strip()] = sha.strip().lower()
    for name in candidates:
        peeled = advertised.get(f"{name}^{{}}")  # annotated tag: the commit it points to
        if peeled or name in advertised:
            return peeled or advertised[name], name
    raise _permanent(f"ref {ref!r} not found in {remote.safe_url}")


# --------------------------------------------------------------------------- checkout cache


def _cache_root(cache_root: Path | None) -> Path:
    if cache_root is None:
        configured = os.environ.get(CHECKOUT_DIR_SETTING, "")
        cache_root = (
            Path(configured)
            if configured
            else Path(tempfile.gettempdir()) / "notebookops-checkouts"
        )
    root = Path(cache_root).absolute()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RepoError(
            f"cannot create the checkout cache {str(root)!r}: {exc.strerror}", permanent=False
        ) from None
    return root


def _cache_key(remote: _Remote, commit: str) -> str:
    # The URL is hashed so that neither the path nor any listing of the cache shows it.
    digest = hashlib.sha256(remote.safe_url.encode("utf-8")).hexdigest()[:16]
    return f"{digest}-{commit}"


@contextlib.contextmanager
def _locked(lock_path: Path, timeout: float, what: str) -> Iterator[None]:
    deadline = time.monotonic() + timeout
    with open(lock_path, "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RepoError(
                        f"timed out after {timeout:g} s waiting for the lock on {what}",
                        permanent=False,
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _checkout_is_complete(path: Path, commit: str, remote: _Remote) -> bool:
    if not (path / ".git").is_dir():
        return False
    try:
        head = _run_git(["rev-parse", "HEAD"], path, remote, "reading the cached checkout")
    except RepoError:
        return False
    return head.strip().lower() == commit


def _fetch(tmp: Path, remote: _Remote, commit: str, ref_hint: str | None) -> None:
    """Bring ``commit`` into ``tmp`` with as little history as the server allows."""
    what = f"fetching commit {commit[:7]}"
    if ref_hint is not None:
        _run_git(["fetch", "--depth=1", "--no-tags", "--", remote.url, ref_hint], tmp, remote, what)
        if _has_commit(tmp, remote, commit):
            return
        log.info("ref %s moved after it was resolved; fetching %s by SHA", ref_hint, commit)
    try:
        _run_git(["fetch", "--depth=1", "--no-tags", "--", remote.url, commit], tmp, remote, what)
    except RepoError as exc:
        if exc.permanent or "timed out" in exc.message:
            raise
        # Servers without uploadpack.allow*SHA1InWant refuse to send a bare SHA; a full
        # fetch of branches and tags then still finds it if it is reachable.
        log.info("fetch by SHA refused by %s (%s); fetching all refs", remote.safe_url, exc)
        _run_git(
            [
                "fetch",
                "--no-tags",
                "--",
                remote.url,
                "+refs/heads/*:refs/remotes/origin/*",
                "+refs/tags/*:refs/tags/*",
            ],
            tmp,
            remote,
            what,
        )
    if not _has_commit(tmp, remote, commit):
        raise _permanent(f"commit {commit} not found in {remote.safe_url}")


def _has_commit(tmp: Path, remote: _Remote, commit: str) -> bool:
    try:
        kind = _run_git(["cat-file", "-t", commit], tmp, remote, "checking the commit")
    except RepoError:
        return False
    # A tag object's SHA would check out fine but never equal HEAD, so it is not a commit here.
    return kind.strip() == "commit"


def _build_checkout(tmp: Path, remote: _Remote, commit: str, ref_hint: str | None) -> None:
    _run_git(["init", "--quiet", str(tmp)], tmp, remote, "creating the checkout")
    _fetch(tmp, remote, commit, ref_hint)
    # Kept for people inspecting a checkout; credentials were stripped so none reach disk.
    _run_git(["remote", "add", "origin", remote.safe_url], tmp, remote, "recording the remote")
    _run_git(
        ["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit],
        tmp,
        remote,
        f"checking out commit {commit[:7]}",
    )


def _ensure(remote: _Remote, commit: str, root: Path, ref_hint: str | None) -> Path:
    key = _cache_key(remote, commit)
    final = root / key
    if _checkout_is_complete(final, commit, remote):
        log.info("reusing checkout of %s at %s", remote.safe_url, commit[:7])
        return final
    lock_timeout = remote.timeout * 3
    with _locked(root / f"{key}.lock", lock_timeout, f"checkout of {commit[:7]}"):
        if _checkout_is_complete(final, commit, remote):
            log.info("reusing checkout of %s at %s", remote.safe_url, commit[:7])
            return final
        if final.exists():
            log.warning("discarding incomplete checkout %s", final)
            shutil.rmtree(final, ignore_errors=True)
        # Builds only happen under this lock, so any temp dir for this key is a crashed build.
        for stale in root.glob(f".tmp-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
        try:
            log.info("fetching %s at %s", remote.safe_url, commit[:7])
            _build_checkout(tmp, remote, commit, ref_hint)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_checkout(
    url: str,
    commit: str,
    *,
    cache_root: Path | None = None,
    auth: GitAuth | None = None,
) -> Path:
    """Path of a checkout of ``commit``: the cached one, or a fresh one built now."""
    remote = _make_remote(url, auth)
    return _ensure(remote, _check_commit(commit), _cache_root(cache_root), None)


# --------------------------------------------------------------------------- notebooks


def _check_pattern(pattern: object, index: int) -> str:
    where = f"notebooks[{index}]"
    if not isinstance(pattern, str) or not pattern.strip():
        raise _permanent(f"{where} must be a non-empty path or glob, got {pattern!r}")
    text = pattern.strip()
    if "\\" in text:
        raise _permanent(f"{where} {text!r} must use '/' as the path separator")
    if text.startswith("/"):
        raise _permanent(f"{where} {text!r} must be relative to the repository root")
    while text.startswith("./"):
        text = text[2:]
    segments = text.split("/")
    if ".." in segments:
        raise _permanent(f"{where} {text!r} must not contain '..' (it would leave the repository)")
    if any(seg in ("", ".") for seg in segments) or segments[0] == ".git":
        raise _permanent(f"{where} {text!r} is not a valid path inside the repository")
    return text


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``*``/``?``/``[...]`` stay within one path segment; a ``**`` segment spans any depth."""
    out: list[str] = []
    segments = pattern.split("/")
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
            continue
        j = 0
        while j < len(seg):
            c = seg[j]
            if c == "*":
                out.append("[^/]*")
            elif c == "?":
                out.append("[^/]")
            elif c == "[":
                end = seg.find("]", j + 2 if seg[j + 1 : j + 2] in ("!", "]") else j + 1)
                if end == -1:
                    out.append(re.escape(c))
                else:
                    body = seg[j + 1 : end]
                    if body.startswith("!"):
                        body = "^" + body[1:]
                    out.append("[" + body.replace("\\", "\\\\") + "]")
                    j = end
            else:
                out.append(re.escape(c))
            j += 1
        if not last:
            out.append("/")
    return re.compile("".join(out) + r"\Z")


def _tracked_files(checkout: Path, commit: str) -> dict[str, int]:
    """Tracked blob path -> git file mode at ``commit`` (symlinks included, submodules not)."""
    listing = _git(
        ["ls-tree", "-r", "-z", "--full-tree", commit],
        checkout,
        {"GIT_TERMINAL_PROMPT": "0"},
        _git_timeout(),
        None,
        f"listing the files of commit {commit[:7]}",
    )
    tracked = {}
    for entry in listing.split("\0"):
        # "<mode> <type> <object>\t<path>"; a submodule's type is "commit".
        info, tab, path = entry.partition("\t")
        fields = info.split()
        if tab and len(fields) == 3 and fields[1] == "blob":
            tracked[path] = int(fields[0], 8)
    return tracked


def _expand(
    patterns: Sequence[str], tracked: dict[str, int], commit: str
) -> tuple[dict[str, int], dict[str, tuple[int, str]]]:
    """(notebook path -> entry index, and path or pattern -> (entry index, why it cannot run))."""
    chosen: dict[str, int] = {}
    missing: dict[str, tuple[int, str]] = {}
    for index, raw in enumerate(patterns):
        pattern = _check_pattern(raw, index)
        if _GLOB_CHARS.isdisjoint(pattern):
            if pattern in tracked:
                chosen.setdefault(pattern, index)
            elif pattern not in missing:
                missing[pattern] = (index, f"notebook {pattern!r} not found at commit {commit[:7]}")
            continue
        regex = _glob_regex(pattern)
        # Globs pick notebooks only: "nb/**" should not sweep in data files next to them.
        matches = sorted(p for p in tracked if p.lower().endswith(".ipynb") and regex.match(p))
        if not matches and pattern not in missing:
            missing[pattern] = (
                index,
                f"notebooks[{index}] glob {pattern!r} matches no notebook at commit {commit[:7]}",
            )
        for path in matches:
            chosen.setdefault(path, index)
    return chosen, missing


def _check_notebook(checkout: Path, path: str, mode: int, commit: str) -> str | None:
    """Why the notebook at ``path`` cannot run, or None: it is read as papermill reads it
    (nbformat 3 is converted to 4), so what passes here is what papermill accepts."""
    where = f"notebook {path!r} at commit {commit[:7]}"
    if PurePosixPath(path).parts[0] == ".git" or ".." in PurePosixPath(path).parts:
        return f"{where} is not inside the repository"
    root = checkout.resolve()
    candidate = checkout / path
    resolved = candidate.resolve()
    if not resolved.is_relative_to(root) or resolved.is_relative_to(root / ".git"):
        kind = "is a symlink pointing" if mode == _SYMLINK_MODE else "resolves"
        return f"{where} {kind} outside the repository"
    try:
        info = resolved.stat()
    except FileNotFoundError:
        return f"{where} is a symlink to a missing file"
    if not stat.S_ISREG(info.st_mode):
        return f"{where} is not a regular file"
    try:
        text = resolved.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return f"{where} is not a notebook: not UTF-8 text ({exc.reason})"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        return (
            f"{where} is not a notebook: invalid JSON at line {exc.lineno} column {exc.colno}: "
            f"{exc.msg}"
        )
    if not isinstance(raw, dict):
        return f"{where} is not a notebook: the JSON is not an object"
    major = raw.get("nbformat")
    if isinstance(major, int) and not isinstance(major, bool) and major > 4:
        return f"{where} uses nbformat {major}, newer than this app reads (4)"
    try:
        notebook = nbformat.reads(text, as_version=4)
    except Exception as exc:  # nbformat raises several unrelated types for bad input
        return f"{where} is not a notebook: {type(exc).__name__}: {exc}"
    metadata = notebook.get("metadata")
    kernelspec = metadata.get("kernelspec") if isinstance(metadata, dict) else None
    if kernelspec is not None and not (
        isinstance(kernelspec, dict) and isinstance(kernelspec.get("name", ""), str)
    ):
        return (
            f"{where} has metadata.kernelspec {kernelspec!r}: it must be an object such as "
            '{"name": "python3", "display_name": "Python 3", "language": "python"} '
            "(re-save the notebook in Jupyter, or fix the field by hand)"
        )
    return None


def resolve_and_checkout(
    url: str,
    ref: str,
    commit: str | None,
    patterns: list[str],
    *,
    cache_root: Path | None = None,
    auth: GitAuth | None = None,
    max_notebooks: int = 500,
) -> CloneResult:
    """Resolve ``ref`` (or take ``commit``), check out that commit, expand and check notebooks."""
    remote = _make_remote(url, auth)
    if not isinstance(patterns, list | tuple) or not patterns:
        raise _permanent(f"notebooks must be a non-empty list, got {patterns!r}")
    root = _cache_root(cache_root)
    if commit:
        sha, ref_hint = _check_commit(commit), None
    else:
        ref = _check_ref(ref)
        sha, ref_hint = _resolve_ref(remote, ref, root)
        log.info("resolved %r of %s to %s", ref, remote.safe_url, sha)
    checkout = _ensure(remote, sha, root, ref_hint)

    tracked = _tracked_files(checkout, sha)
    chosen, missing = _expand(patterns, tracked, sha)
    if not 1 <= len(chosen) + len(missing) <= max_notebooks:
        raise _permanent(
            f"notebooks expand to {len(chosen) + len(missing)} notebooks at commit {sha[:7]}; "
            f"the limit is {max_notebooks}"
        )
    # One bad notebook fails itself: it becomes a result with the reason, the others run.
    notebooks = [
        ResolvedNotebook(path, index, why, NOT_FOUND) for path, (index, why) in missing.items()
    ]
    for path in sorted(chosen):
        why = _check_notebook(checkout, path, tracked[path], sha)
        notebooks.append(ResolvedNotebook(path, chosen[path], why, INVALID if why else None))
    notebooks.sort(key=lambda nb: nb.path)
    return CloneResult(commit=sha, checkout=str(checkout), notebooks=notebooks)
