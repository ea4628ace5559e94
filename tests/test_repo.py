"""notebookops.repo against real repositories built in temp dirs (and a loopback git server)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import threading
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import git
import pytest

from notebookops import repo as repo_mod
from notebookops.gitauth import GitAuth, scrub, strip_credentials
from notebookops.repo import CloneResult, RepoError, ensure_checkout, resolve_and_checkout
from tests.gitrepos import Symlink, branch, commit, file_url, make_repo, notebook, tag

TOKEN = "tok-5ecret-Zq81x"  # distinctive so a grep cannot match by accident
NB3 = json.dumps(
    {"nbformat": 3, "nbformat_minor": 0, "metadata": {}, "worksheets": [{"cells": []}]}
)


@pytest.fixture(autouse=True)
def hermetic_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user/system git config (credential helpers!), local repos allowed, cache in tmp."""
    global_cfg = tmp_path / "gitconfig"
    global_cfg.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(global_cfg))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("NOTEBOOKOPS_ALLOW_LOCAL_REPOS", "1")
    monkeypatch.setenv("NOTEBOOKOPS_CHECKOUT_DIR", str(tmp_path / "cache"))
    for name in ("NOTEBOOKOPS_GIT_TOKEN", "NOTEBOOKOPS_GIT_TIMEOUT", "GIT_CONFIG_COUNT"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def history(tmp_path: Path) -> tuple[Path, list[str]]:
    """main: c0 (a.ipynb, annotated tag v1) -> c1 (+b.ipynb) -> c2 (+c.ipynb)."""
    src = make_repo(tmp_path / "src", {"nb/a.ipynb": notebook("x = 1", parameters={"n": 1})})
    tag(src, "v1", message="release 1")
    shas = [git.Git(str(src)).rev_parse("HEAD")]
    shas.append(commit(src, {"nb/b.ipynb": notebook("y = 2")}, "add b"))
    shas.append(commit(src, {"nb/c.ipynb": notebook("z = 3")}, "add c"))
    return src, shas


def _git(path: str | Path, *args: str) -> str:
    return git.Git(str(path)).execute(["git", *args])


def _paths(result: CloneResult) -> list[str]:
    return [nb.path for nb in result.notebooks]


def test_branch_is_a_shallow_checkout_of_the_tip(history: tuple[Path, list[str]]) -> None:
    src, shas = history
    result = resolve_and_checkout(file_url(src), "main", None, ["nb/*.ipynb"])

    assert result.commit == shas[-1]
    checkout = Path(result.checkout)
    assert checkout.is_absolute()
    assert _git(checkout, "rev-parse", "HEAD") == shas[-1]
    assert _git(checkout, "rev-list", "--count", "HEAD") == "1"  # depth 1
    assert _git(checkout, "tag") == ""  # --no-tags
    assert _paths(result) == ["nb/a.ipynb", "nb/b.ipynb", "nb/c.ipynb"]
    assert CloneResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_tags_full_ref_names_and_exact_commits(history: tuple[Path, list[str]]) -> None:
    src, shas = history
    url = file_url(src)
    tag(src, "light", ref=shas[1])
    branch(src, "v1", ref=shas[2])  # same short name as the tag: the branch wins, like git clone

    assert resolve_and_checkout(url, "refs/tags/v1", None, ["nb/a.ipynb"]).commit == shas[0]
    assert resolve_and_checkout(url, "light", None, ["nb/b.ipynb"]).commit == shas[1]
    assert resolve_and_checkout(url, "v1", None, ["nb/c.ipynb"]).commit == shas[2]
    assert resolve_and_checkout(url, "refs/heads/main", None, ["nb/c.ipynb"]).commit == shas[2]

    # An exact commit that is not the tip of anything: the ref is ignored.
    old = resolve_and_checkout(url, "main", shas[1], ["nb/*.ipynb"])
    assert old.commit == shas[1]
    assert _paths(old) == ["nb/a.ipynb", "nb/b.ipynb"]
    assert not (Path(old.checkout) / "nb/c.ipynb").exists()
    assert ensure_checkout(url, shas[1]) == Path(old.checkout)


def test_commit_fetch_falls_back_when_server_refuses_sha(
    history: tuple[Path, list[str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, shas = history
    # Protocol v0 without uploadpack.allowReachableSHA1InWant refuses a bare SHA "want".
    (tmp_path / "gitconfig").write_text("[protocol]\n\tversion = 0\n")
    with caplog.at_level(logging.INFO, logger="notebookops.repo"):
        result = resolve_and_checkout(file_url(src), "main", shas[0], ["nb/a.ipynb"])
    assert result.commit == shas[0]
    assert "fetch by SHA refused" in caplog.text

    with pytest.raises(RepoError) as err:
        ensure_checkout(file_url(src), "f" * 40)
    assert err.value.permanent
    assert f"commit {'f' * 40} not found in {file_url(src)}" in str(err.value)


def test_globs_expand_against_the_commit_tree_first_entry_wins(tmp_path: Path) -> None:
    src = make_repo(
        tmp_path / "g",
        {
            "nb/a.ipynb": notebook("1"),
            "nb/data.csv": "a,b\n",
            "nb/sub/b.ipynb": notebook("2"),
            "nb/sub/deep/c.ipynb": notebook("3"),
            "other/d.ipynb": notebook("4"),
            "other/e1.ipynb": notebook("5"),
        },
    )
    patterns = ["nb/sub/**/*.ipynb", "nb/*.ipynb", "nb/sub/b.ipynb", "nb/**", "other/[d]?ipynb"]
    result = resolve_and_checkout(file_url(src), "main", None, patterns)
    assert [(nb.path, nb.entry_index) for nb in result.notebooks] == [
        ("nb/a.ipynb", 1),
        ("nb/sub/b.ipynb", 0),  # "**" also matches zero directories
        ("nb/sub/deep/c.ipynb", 0),
        ("other/d.ipynb", 4),
    ]
    every = resolve_and_checkout(file_url(src), "main", None, ["**/*.ipynb", "./other/e?.ipynb"])
    assert len(every.notebooks) == 5
    assert {nb.entry_index for nb in every.notebooks} == {0}

    with pytest.raises(RepoError, match=r"expand to 5 notebooks.*limit is 3") as err:
        resolve_and_checkout(file_url(src), "main", None, ["**"], max_notebooks=3)
    assert err.value.permanent


@pytest.fixture
def broken(tmp_path: Path) -> str:
    outside = tmp_path / "outside.ipynb"
    outside.write_text(json.dumps(notebook("print('not in the repo')")))
    src = make_repo(
        tmp_path / "broken",
        {
            "nb/ok.ipynb": notebook("1"),
            "nb/alias.ipynb": Symlink("ok.ipynb"),
            "bad/json.ipynb": '{"cells": [,]}',
            "bad/v3.ipynb": NB3,
            "bad/list.ipynb": "[1, 2]",
            "bad/latin1.ipynb": b"\xff\xfe{",
            "bad/escape.ipynb": Symlink(str(outside)),
            "bad/dotdot.ipynb": Symlink("../../outside.ipynb"),
            "bad/README.md": "# hi",
            "bad/kernelspec.ipynb": json.dumps(
                {**notebook("1"), "metadata": {"kernelspec": "python3"}}
            ),
            "bad/v5.ipynb": json.dumps({**notebook("1"), "nbformat": 5}),
        },
    )
    return file_url(src)


@pytest.mark.parametrize(
    ("ref", "patterns", "message"),
    [
        ("no-such-branch", ["nb/ok.ipynb"], r"ref 'no-such-branch' not found in file://"),
        ("main", ["nb/../bad/v3.ipynb"], r"notebooks\[0\] 'nb/../bad/v3.ipynb' must not .*'\.\.'"),
        ("main", ["/nb/ok.ipynb"], r"must be relative"),
        ("main", ["nb/ok.ipynb", ""], r"notebooks\[1\] must be a non-empty"),
        ("bad..ref", ["nb/ok.ipynb"], r"repository.ref 'bad..ref' is not a valid"),
    ],
)
def test_bad_input_is_a_permanent_error_naming_it(
    broken: str, ref: str, patterns: list[str], message: str
) -> None:
    with pytest.raises(RepoError, match=message) as err:
        resolve_and_checkout(broken, ref, None, patterns)
    assert err.value.permanent


@pytest.mark.parametrize(
    ("pattern", "kind", "message"),
    [
        (
            "nb/x.ipynb",
            "NotebookNotFound",
            r"notebook 'nb/x.ipynb' not found at commit [0-9a-f]{7}\b",
        ),
        ("nb/*.py", "NotebookNotFound", r"notebooks\[1\] glob 'nb/\*.py' matches no"),
        (
            "bad/json.ipynb",
            "InvalidNotebook",
            r"'bad/json.ipynb' .*invalid JSON at line 1 column 12",
        ),
        ("bad/list.ipynb", "InvalidNotebook", r"'bad/list.ipynb' .*not an object"),
        ("bad/latin1.ipynb", "InvalidNotebook", r"'bad/latin1.ipynb' .*not UTF-8"),
        ("bad/escape.ipynb", "InvalidNotebook", r"'bad/escape.ipynb' .*symlink pointing outside"),
        ("bad/dotdot.ipynb", "InvalidNotebook", r"'bad/dotdot.ipynb' .*symlink pointing outside"),
        ("bad/README.md", "InvalidNotebook", r"'bad/README.md' .*not a notebook"),
        ("bad/kernelspec.ipynb", "InvalidNotebook", r"metadata.kernelspec 'python3': it must be"),
        ("bad/v5.ipynb", "InvalidNotebook", r"uses nbformat 5, newer than this app reads"),
    ],
)
def test_a_bad_notebook_fails_alone_with_the_reason(
    broken: str, pattern: str, kind: str, message: str
) -> None:
    result = resolve_and_checkout(broken, "main", None, ["nb/ok.ipynb", pattern])
    by_path = {nb.path: nb for nb in result.notebooks}
    assert by_path["nb/ok.ipynb"].problem is None
    bad = by_path[pattern]
    assert bad.problem_type == kind and bad.entry_index == 1
    assert re.search(message, bad.problem), bad.problem
    # It travels to the orchestrator and back unchanged.
    assert CloneResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_nbformat_3_is_read_as_papermill_reads_it(broken: str) -> None:
    result = resolve_and_checkout(broken, "main", None, ["bad/v3.ipynb"])
    assert [(nb.path, nb.problem) for nb in result.notebooks] == [("bad/v3.ipynb", None)]


def test_symlink_inside_the_repository_is_accepted(broken: str) -> None:
    result = resolve_and_checkout(broken, "main", None, ["nb/*.ipynb"])
    assert _paths(result) == ["nb/alias.ipynb", "nb/ok.ipynb"]


def test_bad_commit_values_are_refused(broken: str) -> None:
    from notebookops.request import inspect_message

    with pytest.raises(RepoError) as err:
        resolve_and_checkout(broken, "main", "abc1234", ["nb/ok.ipynb"])
    assert err.value.permanent
    # validate refuses it in the same words, before anything is cloned.
    body = {"repository": {"url": "https://h/r", "commit": "abc1234"}, "notebooks": ["a.ipynb"]}
    _, _, errors = inspect_message(json.dumps(body))
    assert errors == [str(err.value)]
    assert "short id cannot be fetched" in errors[0]


@pytest.mark.parametrize("kind", ["file-url", "path"])
def test_local_repositories_need_the_app_setting(
    history: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    src, shas = history
    monkeypatch.delenv("NOTEBOOKOPS_ALLOW_LOCAL_REPOS")
    url = file_url(src) if kind == "file-url" else str(src)
    for call in (
        lambda: resolve_and_checkout(url, "main", None, ["nb/a.ipynb"]),
        lambda: ensure_checkout(url, shas[0]),
    ):
        with pytest.raises(RepoError, match="NOTEBOOKOPS_ALLOW_LOCAL_REPOS=1") as err:
            call()
        assert err.value.permanent
    assert not (Path(os.environ["NOTEBOOKOPS_CHECKOUT_DIR"])).exists()


@pytest.mark.parametrize("url", ["ext::sh -c touch% /tmp/pwned", "ftp://example.com/r.git", "-u"])
def test_command_running_transports_are_refused(url: str) -> None:
    with pytest.raises(RepoError, match=r"repository.url") as err:
        resolve_and_checkout(url, "main", None, ["a.ipynb"])
    assert err.value.permanent


def test_cached_checkout_is_reused_without_fetching(
    history: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src, shas = history
    builds: list[str] = []
    real_build = repo_mod._build_checkout

    def counting_build(*args: object, **kwargs: object) -> None:
        builds.append(str(args[2]))
        real_build(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(repo_mod, "_build_checkout", counting_build)
    first = resolve_and_checkout(file_url(src), "main", None, ["nb/a.ipynb"])
    second = resolve_and_checkout(file_url(src), "main", None, ["nb/*.ipynb"])
    assert builds == [shas[-1]]
    assert second.checkout == first.checkout

    # Another worker with only (url, commit): no network needed once the checkout exists.
    src.rename(tmp_path / "gone")
    assert ensure_checkout(file_url(src), shas[-1]) == Path(first.checkout)
    assert builds == [shas[-1]]


def test_concurrent_callers_share_one_checkout(
    history: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, shas = history
    builds: list[str] = []
    real_build = repo_mod._build_checkout
    monkeypatch.setattr(
        repo_mod, "_build_checkout", lambda *a: (builds.append(a[2]), real_build(*a))[1]
    )
    cache = Path(os.environ["NOTEBOOKOPS_CHECKOUT_DIR"])
    url_hash = hashlib.sha256(file_url(src).encode()).hexdigest()[:16]
    crashed = cache / f".tmp-{url_hash}-{shas[-1]}-crashed"  # left by a killed worker
    (crashed / ".git").mkdir(parents=True)
    barrier = threading.Barrier(6)
    results: list[CloneResult | BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(resolve_and_checkout(file_url(src), "main", None, ["nb/*.ipynb"]))
        except BaseException as exc:  # surfaced by the assertion below
            results.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(isinstance(r, CloneResult) for r in results), results
    assert len(results) == 6
    assert {r.checkout for r in results} == {results[0].checkout}  # type: ignore[union-attr]
    assert builds == [shas[-1]]
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    assert _git(results[0].checkout, "status", "--porcelain") == ""  # type: ignore[union-attr]


# --------------------------------------------------------------------------- auth


def test_gitauth_only_gives_the_pipeline_token_to_its_own_organization() -> None:
    plan = "https://dev.azure.com/Contoso/"
    same = GitAuth.for_request("https://dev.azure.com/contoso/p/_git/r", plan, TOKEN, environ={})
    assert same is not None and same.source == "pipeline"
    assert same.scope == "https://dev.azure.com/"
    old_style = GitAuth.for_request("https://contoso.visualstudio.com/p/_git/r", plan, TOKEN)
    assert old_style is not None and old_style.source == "pipeline"
    user_in_url = GitAuth.for_request(
        "https://contoso@dev.azure.com/contoso/p/_git/r", "https://contoso.visualstudio.com/", TOKEN
    )
    assert user_in_url is not None and user_in_url.source == "pipeline"

    other_org = "https://dev.azure.com/fabrikam/p/_git/r"
    assert GitAuth.for_request(other_org, plan, TOKEN, environ={}) is None
    assert GitAuth.for_request("https://github.com/o/r.git", plan, TOKEN, environ={}) is None
    app = GitAuth.for_request(
        "https://github.com/o/r.git", plan, TOKEN, environ={"NOTEBOOKOPS_GIT_TOKEN": "app-tok"}
    )
    assert app is not None and app.source == "app-setting" and app.token == "app-tok"
    # Never over clear-text HTTP except to loopback, never over ssh (the header is HTTP-only).
    env = {"NOTEBOOKOPS_GIT_TOKEN": "app-tok"}
    assert GitAuth.for_request("http://example.com/r.git", plan, TOKEN, environ=env) is None
    assert GitAuth.for_request("git@github.com:o/r.git", plan, TOKEN, environ=env) is None

    assert TOKEN not in repr(same) and TOKEN not in str(same) and TOKEN not in f"{[same]}"
    assert same.header_value == "Basic " + base64.b64encode(f":{TOKEN}".encode()).decode()


def test_scrub_and_strip_credentials() -> None:
    assert strip_credentials("https://u:p%40ss@h.example:8443/r.git?x=1") == (
        "https://h.example:8443/r.git"
    )
    text = "fatal: https://u:hunter2@h/r.git Authorization: Basic OnRvaw== " + TOKEN
    cleaned = scrub(text, [TOKEN])
    assert "hunter2" not in cleaned and "OnRvaw==" not in cleaned and TOKEN not in cleaned


class _GitHTTP(BaseHTTPRequestHandler):
    """Smart-HTTP git server: serves via git http-backend only with the expected header."""

    server: _Server

    def log_message(self, *args: object) -> None:  # keep test output quiet
        pass

    def _handle(self) -> None:
        srv = self.server
        auth = self.headers.get("Authorization")
        srv.seen_auth.append(auth)
        srv.token_in_argv |= _token_in_some_argv()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if auth != srv.expected_auth:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        env = {
            "PATH": os.environ["PATH"],
            "GIT_PROJECT_ROOT": str(srv.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
            "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
        }
        out = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=True
        ).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        headers = [line.split(": ", 1) for line in head.decode().split("\r\n") if line]
        status = next((int(v.split()[0]) for k, v in headers if k.lower() == "status"), 200)
        self.send_response(status)
        for key, value in headers:
            if key.lower() != "status":
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _handle


class _Server(ThreadingHTTPServer):
    root: Path
    expected_auth: str
    seen_auth: list[str | None]
    token_in_argv: bool


def _token_in_some_argv() -> bool:
    """Whether any process's command line (readable by every local user) shows the token."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            raw = cmdline.read_bytes()
        except OSError:
            continue
        if TOKEN.encode() in raw or base64.b64encode(f":{TOKEN}".encode()) in raw:
            return True
    return False


@pytest.fixture
def git_server(tmp_path: Path) -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _GitHTTP)
    server.root = tmp_path / "served"
    server.expected_auth = "Basic " + base64.b64encode(f":{TOKEN}".encode()).decode()
    server.seen_auth = []
    server.token_in_argv = False
    make_repo(server.root / "org" / "repo.git", {"nb/a.ipynb": notebook("1")})
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _url(server: _Server, userinfo: str = "") -> str:
    return f"http://{userinfo}127.0.0.1:{server.server_address[1]}/org/repo.git"


def _assert_no_token_anywhere(text: str) -> None:
    encoded = base64.b64encode(f":{TOKEN}".encode()).decode()
    assert TOKEN not in text
    assert encoded not in text


def test_token_travels_only_as_a_basic_header(
    git_server: _Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTEBOOKOPS_GIT_TOKEN", TOKEN)
    url = _url(git_server)
    auth = GitAuth.for_request(url, "https://dev.azure.com/org/", None)
    assert auth is not None and auth.source == "app-setting"
    with caplog.at_level(logging.DEBUG):
        result = resolve_and_checkout(url, "main", None, ["nb/*.ipynb"], auth=auth)
    assert _paths(result) == ["nb/a.ipynb"]
    assert set(git_server.seen_auth) == {git_server.expected_auth}
    assert git_server.token_in_argv is False

    checkout = Path(result.checkout)
    assert _git(checkout, "remote", "get-url", "origin") == url
    on_disk = [
        p.read_bytes().decode("utf-8", "replace")
        for p in (checkout / ".git").rglob("*")
        if p.is_file() and "objects" not in p.parts
    ]
    cache_names = [p.name for p in checkout.parent.iterdir()]
    _assert_no_token_anywhere("\n".join([*on_disk, *cache_names, caplog.text, repr(result)]))

    # Without the header the same server refuses: the header really was what got us in.
    with pytest.raises(RepoError, match="authentication") as err:
        ensure_checkout(url, "0" * 40)
    assert err.value.permanent


def test_rejected_token_is_a_permanent_error_that_never_shows_it(
    git_server: _Server, caplog: pytest.LogCaptureFixture
) -> None:
    git_server.expected_auth = "Basic something-else"
    url = _url(git_server, userinfo="someone:url-pa55@")
    auth = GitAuth(
        token=TOKEN, scope=f"http://127.0.0.1:{git_server.server_address[1]}/", source="t"
    )
    with caplog.at_level(logging.DEBUG), pytest.raises(RepoError) as err:
        resolve_and_checkout(url, "main", None, ["nb/a.ipynb"], auth=auth)

    assert err.value.permanent
    assert "authentication" in str(err.value)
    assert _url(git_server) in str(err.value)  # names the URL, minus its credentials
    sent = git_server.seen_auth[0] or ""
    assert sent.startswith("Basic ")
    assert base64.b64decode(sent.split()[1]).decode() == f":{TOKEN}"
    assert git_server.token_in_argv is False
    told = "".join(traceback.format_exception(err.value)) + repr(err.value) + caplog.text
    _assert_no_token_anywhere(told)
    assert "url-pa55" not in "".join(traceback.format_exception(err.value)) + repr(err.value)
    cache = Path(os.environ["NOTEBOOKOPS_CHECKOUT_DIR"])
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_a_silent_server_is_a_transient_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTEBOOKOPS_GIT_TIMEOUT", "1")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/r.git"
        with pytest.raises(RepoError, match=r"resolving ref 'main' of .* timed out after 1 s") as e:
            resolve_and_checkout(url, "main", None, ["a.ipynb"])
    assert e.value.permanent is False
    # git and the transport helper it started (git-remote-http) were killed, not left behind.
    import psutil

    left = [p.name() for p in psutil.Process().children(recursive=True) if "git" in p.name()]
    assert left == []


def test_tracked_files_with_odd_names_are_found_and_submodules_are_not(tmp_path: Path) -> None:
    odd = ["nb/ünïcødé name.ipynb", "nb/tab\there.ipynb", 'nb/quote"and\\back.ipynb']
    src = make_repo(tmp_path / "src", {name: notebook("x = 1") for name in odd})
    # A submodule (a gitlink) named like a notebook: not a file of this repository.
    _git(src, "update-index", "--add", "--cacheinfo", f"160000,{'1' * 40},nb/sub.ipynb")
    _git(src, "commit", "--quiet", "-m", "gitlink")
    result = resolve_and_checkout(file_url(src), "main", None, ["nb/*.ipynb"])
    assert _paths(result) == sorted(odd)
    assert all(nb.problem is None for nb in result.notebooks)
    named = resolve_and_checkout(file_url(src), "main", None, ["nb/sub.ipynb"])
    assert [nb.problem_type for nb in named.notebooks] == ["NotebookNotFound"]


def test_missing_repository_is_permanent(tmp_path: Path) -> None:
    url = file_url(tmp_path / "nowhere")
    with pytest.raises(RepoError, match=rf"{url} is not a reachable repository") as err:
        resolve_and_checkout(url, "main", None, ["a.ipynb"])
    assert err.value.permanent


def test_header_config_is_appended_after_existing_git_config_env() -> None:
    auth = GitAuth(token=TOKEN, scope="https://dev.azure.com/", source="pipeline")
    env = auth.git_env({"GIT_CONFIG_COUNT": "2"})
    assert env == {
        "GIT_CONFIG_COUNT": "3",
        "GIT_CONFIG_KEY_2": "http.https://dev.azure.com/.extraHeader",
        "GIT_CONFIG_VALUE_2": f"Authorization: {auth.header_value}",
    }
