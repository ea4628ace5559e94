"""The status page over real HTTP: the real app on devhost (virtual clock, the in-process fake
backend standing in for Azure ML), JSON for programs, HTML for browsers, the run list, and the
executed notebooks served from the run's outputs only."""

from __future__ import annotations

import http.client
import json
import os
import time
from urllib.parse import urlsplit

import pytest

from tests.fake_devops import FakeDevOps
from tests.flow_support import app_host, deliver, fake_notebook, make_repo, message

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
TOKEN = "s3cr3t-pipeline-token-for-status-pages"


def get(base: str, path: str, accept: str | None = None) -> tuple[int, str, dict[str, str]]:
    """A raw GET: the path goes on the wire exactly as given (no client-side `..` folding)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        if accept:
            conn.putheader("Accept", accept)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read().decode("utf-8", "replace")
        return response.status, body, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


@pytest.fixture
def served(flow_env):
    """One finished run (one pass, one failure) and one still running, on a live devhost."""
    repo = make_repo(
        flow_env / "repo",
        {
            "nb/a.ipynb": fake_notebook(polls=1),
            "nb/b.ipynb": fake_notebook(polls=2, outcome="failed"),
            "nb/slow.ipynb": fake_notebook(polls=-1),
        },
    )
    with FakeDevOps(token=TOKEN) as devops, app_host(flow_env / "state") as host:
        body = message(repo, ["nb/a.ipynb", "nb/b.ipynb"], compute={"backend": "fake"})
        done = deliver(host, body, message_id="m-done", properties=devops.properties())
        assert host.wait_for(done, 60)["runtimeStatus"] == "Completed"
        slow = message(repo, ["nb/slow.ipynb"], compute={"backend": "fake"}, timeoutMinutes=600)
        running = deliver(host, slow, message_id="m-running")
        yield host, done, running, flow_env


def _no_server_secrets(text: str, root) -> None:
    assert TOKEN not in text
    assert str(root) not in text and "file://" not in text
    assert os.environ["NOTEBOOKOPS_SECRET_KEY"] not in text
    assert "gAAAAA" not in text  # a Fernet token: the sealed pipeline token never shows


def test_json_for_programs_and_html_for_browsers(served):
    host, done, _, root = served
    code, body, headers = get(host.base_url, f"/api/runs/{done}")
    assert code == 200 and headers["content-type"].startswith("application/json")
    view = json.loads(body)
    assert view["state"] == "failed" and view["result"] == "failed" and len(view["commit"]) == 40
    by_path = {n["path"]: n for n in view["notebooks"]}
    assert by_path["nb/a.ipynb"]["state"] == "succeeded"
    assert by_path["nb/b.ipynb"]["errorLine"] == "ValueError: fake failure (cell 1)"
    assert by_path["nb/b.ipynb"]["links"] == {
        "html": f"/api/runs/{done}/notebooks/nb/b.html",
        "ipynb": f"/api/runs/{done}/notebooks/nb/b.ipynb",
    }
    _no_server_secrets(body, root)

    code, page, headers = get(host.base_url, f"/api/runs/{done}", accept=BROWSER_ACCEPT)
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert "script-src" not in headers["content-security-policy"]  # default-src 'none' covers it
    assert "default-src 'none'" in headers["content-security-policy"]
    assert headers["referrer-policy"] == "no-referrer"
    assert "nb/b.ipynb" in page and "ValueError: fake failure (cell 1)" in page
    assert f'href="/api/runs/{done}/notebooks/nb/b.html"' in page
    assert 'http-equiv="refresh"' not in page  # finished: nothing left to follow
    _no_server_secrets(page, root)
    # ?format= wins over Accept, for links and curl.
    assert get(host.base_url, f"/api/runs/{done}?format=html")[2]["content-type"].startswith(
        "text/html"
    )
    assert json.loads(get(host.base_url, f"/api/runs/{done}?format=json", BROWSER_ACCEPT)[1])


def test_a_running_run_refreshes_itself_and_shows_progress(served):
    host, _, running, root = served
    for _ in range(200):
        code, body, _ = get(host.base_url, f"/api/runs/{running}")
        view = json.loads(body)
        if view["notebooks"] and view["notebooks"][0]["state"] == "running":
            break
        time.sleep(0.05)
    assert view["state"] == "running" and view["notebooks"][0]["state"] == "running"
    code, page, _ = get(host.base_url, f"/api/runs/{running}", accept=BROWSER_ACCEPT)
    assert code == 200 and '<meta http-equiv="refresh" content="3">' in page
    assert "0</b> of <b>1</b> notebooks finished" in page
    _no_server_secrets(page, root)


def test_run_list_newest_first_paged_and_filtered(served):
    host, done, running, root = served
    code, body, _ = get(host.base_url, "/api/runs")
    listing = json.loads(body)
    assert code == 200 and [r["instanceId"] for r in listing["runs"]] == [running, done]
    assert listing["total"] == 2 and listing["next"] is None
    page_one = json.loads(get(host.base_url, "/api/runs?pageSize=1")[1])
    assert [r["instanceId"] for r in page_one["runs"]] == [running]
    assert page_one["next"] == "/api/runs?page=2&pageSize=1"
    page_two = json.loads(get(host.base_url, page_one["next"])[1])
    assert [r["instanceId"] for r in page_two["runs"]] == [done] and page_two["previous"]
    failed = json.loads(get(host.base_url, "/api/runs?state=failed")[1])
    assert [r["instanceId"] for r in failed["runs"]] == [done]
    code, body, _ = get(host.base_url, "/api/runs?state=broken")
    assert code == 400 and "state" in json.loads(body)["error"] and "'broken'" in body
    code, body, _ = get(host.base_url, "/api/runs?pageSize=1000")
    assert code == 400 and "pageSize" in body and "'1000'" in body
    code, page, headers = get(host.base_url, "/api/runs", accept=BROWSER_ACCEPT)
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert f'href="/api/runs/{done}"' in page and f'href="/api/runs/{running}"' in page
    _no_server_secrets(page, root)


def test_executed_notebooks_are_served_with_a_sandbox(served):
    host, done, _, _ = served
    code, page, headers = get(host.base_url, f"/api/runs/{done}/notebooks/nb/b.html")
    assert code == 200 and headers["content-type"].startswith("text/html")
    policy = headers["content-security-policy"]
    assert policy.startswith("sandbox;") and "connect-src" not in policy
    assert "default-src 'none'" in policy
    assert "nb/b.ipynb" in page and 'id="notebookops-summary"' in page
    code, raw, headers = get(host.base_url, f"/api/runs/{done}/notebooks/nb/b.ipynb")
    assert code == 200 and json.loads(raw)["metadata"]["fake"]["outcome"] == "failed"
    assert headers["content-disposition"] == "attachment; filename*=UTF-8''b.ipynb"
    assert headers["content-type"].startswith("application/x-ipynb+json")


@pytest.mark.parametrize(
    "path",
    [
        "nb/../../../../etc/passwd",
        "nb/%2e%2e/%2e%2e/secret.key",
        "..%2f..%2fsecret.key",
        "%2fetc%2fpasswd",
        "/etc/hosts.html",
        "nb\\..\\..\\x.html",
        "nb/b.json",
        "nb/missing.html",
        "nb/link-out.html",
        "nb/b.html%00.ipynb",
    ],
)
def test_paths_outside_the_outputs_are_404(served, path):
    host, done, _, root = served
    outputs = root / "outputs" / done / "notebooks"
    (root / "outside.html").write_text("<p>outside the outputs</p>")
    link = outputs / "nb" / "link-out.html"
    if not link.exists():
        link.symlink_to(root / "outside.html")
    code, body, _ = get(host.base_url, f"/api/runs/{done}/notebooks/{path}")
    assert code == 404, body
    assert "outside the outputs" not in body and "root:" not in body


def test_unknown_runs_and_instance_ids_that_climb_are_404(served):
    host, done, _, _ = served
    assert get(host.base_url, "/api/runs/nope")[0] == 404
    assert get(host.base_url, "/api/runs/nope/notebooks/nb/b.html")[0] == 404
    assert (
        get(host.base_url, "/api/runs/%2e%2e/notebooks/" + done + "/notebooks/nb/b.html")[0] == 404
    )


def test_function_key_is_carried_only_to_this_apps_links(served):
    host, done, _, _ = served
    code, page, _ = get(host.base_url, f"/api/runs/{done}?code=k3y", accept=BROWSER_ACCEPT)
    assert code == 200
    assert f'href="/api/runs/{done}/notebooks/nb/b.html?code=k3y"' in page
    assert 'href="https://fake/' in page  # the portal link, and it does not get the key
    assert (
        "https://fake/" + "nb-" in page
        and "?code=k3y" not in page.split('href="https://fake/')[1].split('"')[0]
    )


def test_submit_prints_the_status_page_of_the_run_it_started(served, capsys):
    from notebookops.cli import main

    host, _, _, root = served
    body = root / "message.json"
    repo = root / "repo"
    body.write_text(json.dumps(message(repo, ["nb/a.ipynb"], compute={"backend": "fake"})))
    assert main(["submit", str(body), "--url", host.base_url]) == 0
    printed = capsys.readouterr().out
    page = next(line.split(": ", 1)[1] for line in printed.splitlines() if "status page" in line)
    assert page.startswith(f"{host.base_url}/api/runs/")
    assert host.wait_for(page.rsplit("/", 1)[1], 60)["runtimeStatus"] == "Completed"
    code, answer, _ = get(host.base_url, urlsplit(page).path)
    assert code == 200 and json.loads(answer)["notebooks"][0]["path"] == "nb/a.ipynb"

    body.write_text(json.dumps({"repository": {"url": str(repo)}, "notebooks": ["/abs.ipynb"]}))
    assert main(["submit", str(body), "--url", host.base_url]) == 2
    assert "notebooks[0]" in capsys.readouterr().err
    assert main(["submit", str(body), "--url", "http://127.0.0.1:9"]) == 1
    assert "cannot reach" in capsys.readouterr().out


def test_a_running_run_of_many_notebooks_counts_those_its_status_cannot_list(flow_env):
    """120 notebooks with long paths do not fit in the 16 KB custom status: the run's JSON and
    page count every notebook, list the running and failed ones, and say how many are left
    out while the run goes."""
    folder = "nb/a-folder-with-a-rather-long-and-descriptive-name"
    files = {
        f"{folder}/experiment-{i:03d}-with-a-long-descriptive-name.ipynb": fake_notebook(polls=-1)
        for i in range(120)
    }
    files[f"{folder}/experiment-000-with-a-long-descriptive-name.ipynb"] = fake_notebook(
        polls=1, outcome="failed"
    )
    repo = make_repo(flow_env / "wide", files)
    body = message(repo, ["nb/**/*.ipynb"], compute={"backend": "fake"}, timeoutMinutes=600)
    with app_host(flow_env / "state") as host:
        instance = deliver(host, body)
        for _ in range(400):
            view = json.loads(get(host.base_url, f"/api/runs/{instance}")[1])
            if (view.get("counts") or {}).get("failed") and view.get("unlisted"):
                break
            time.sleep(0.05)
        code, page, _ = get(host.base_url, f"/api/runs/{instance}", accept=BROWSER_ACCEPT)
    assert view["state"] == "running" and view["counts"]["total"] == 120
    listed = {n["path"]: n["state"] for n in view["notebooks"]}
    assert view["unlisted"] == 120 - len(listed) > 0
    assert listed[f"{folder}/experiment-000-with-a-long-descriptive-name.ipynb"] == "failed"
    assert sum(1 for s in listed.values() if s == "running") == view["counts"]["running"]
    assert code == 200 and "of <b>120</b> notebooks finished" in page
    assert f"{view['unlisted']} more notebooks not listed while the run goes" in page
