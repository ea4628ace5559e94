"""The status page in a real browser: Debian's Chromium, headless, driven by Selenium through
chromedriver, on a real local run (real git repository, real kernels, the real app on devhost
over loopback HTTP). What a person sees while the run goes and after it ends, the links to
the rendered notebook, and a notebook's own script that must not run.

Screenshots go to the test's folder; with NOTEBOOKOPS_SCREENSHOTS=DIR they are also copied
there (`NOTEBOOKOPS_SCREENSHOTS=docs pytest tests/test_browser.py` refreshes the README's).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from tests.flow_support import app_host, deliver, make_repo, message, notebook

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The machine has no network but the package registries: no background calls, no updates.
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,860",
    "--hide-scrollbars",
]
EVIL = "<script>document.title='pwned'</script><b>shown as text</b>"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "notebooks"


@pytest.fixture
def browser(tmp_path):
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        message_text = (
            "Chromium is not installed: apt-get install chromium chromium-driver "
            "(make test and .ci/run install them)"
        )
        if os.environ.get("CI"):
            pytest.fail(message_text)
        pytest.skip(message_text)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    driver = None
    for attempt in range(2):  # a cold first start on a loaded machine can miss its timeout
        try:
            driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
            break
        except Exception:
            if attempt:
                raise
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    """The whole page at 1280 px wide, as a person scrolling it would see it."""
    height = driver.execute_script(
        "const main = document.querySelector('main') || document.body;"
        "return Math.ceil(main.getBoundingClientRect().bottom + window.scrollY) + 16"
    )
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": 1280, "height": min(int(height), 2400), "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        path = tmp_path / name
        assert driver.save_screenshot(str(path)), "no screenshot"
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    target = os.environ.get("NOTEBOOKOPS_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / name)
    return path


def _rows(driver) -> dict[str, dict[str, str]]:
    """What the notebooks table shows, cell by cell, as text."""
    from selenium.webdriver.common.by import By

    rows = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "#notebooks tbody tr[data-path]"):
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        links = {a.text: a.get_attribute("href") for a in row.find_elements(By.TAG_NAME, "a")}
        rows[row.get_attribute("data-path")] = {
            "state": cells[1],
            "execution": cells[2],
            "error": cells[4],
            "links": links,
        }
    return rows


def _page_state(driver) -> tuple[str, dict]:
    """The run's badge and its rows; the page reloads itself, so read it in one go."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        WebDriverException,
    )
    from selenium.webdriver.common.by import By

    for _ in range(40):
        try:
            return driver.find_element(By.ID, "run-state").text, _rows(driver)
        except (StaleElementReferenceException, NoSuchElementException):
            time.sleep(0.1)
        except WebDriverException as exc:
            # A reload between two calls: Chromium's inspector no longer knows the old node.
            if "does not belong to the document" not in str(exc):
                raise
            time.sleep(0.1)
    raise AssertionError(f"the run page never settled: {driver.page_source[:2000]}")


@pytest.fixture
def repo(tmp_path):
    """The demo's own notebooks (so the README's screenshots show them), a slow one to watch
    while it runs, and a hostile one whose error value and output carry markup and script."""
    files = {
        f"examples/notebooks/{p.name}": json.loads(p.read_text()) for p in EXAMPLES.glob("*.ipynb")
    }
    files["nb/slow.ipynb"] = notebook("import time\ntime.sleep(8)", "print('slept')")
    files["nb/hostile.ipynb"] = notebook(
        "from IPython.display import HTML, display\n"
        "display(HTML(\"<p id='own'>notebook html</p><script>document.title='pwned-nb';"
        "fetch('/api/runs').then(() => document.title='reached-api')</script>\"))",
        f"raise ValueError({EVIL!r})",
    )
    return make_repo(tmp_path / "repo", files)


NOTEBOOKS = [
    "examples/notebooks/hello.ipynb",
    {"path": "examples/notebooks/parameters.ipynb", "parameters": {"alpha": 0.5, "name": "demo"}},
    {"path": "examples/notebooks/failing.ipynb", "allowFailure": True},
    "nb/slow.ipynb",
    {"path": "nb/hostile.ipynb", "allowFailure": True},
]


def _wait_for_page(browser, page: str, until, what: str, timeout: float) -> tuple[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        browser.get(page)
        state, rows = _page_state(browser)
        if until(state, rows):
            return state, rows
        assert time.monotonic() < deadline, f"never saw {what}: {state} {rows}"
        time.sleep(0.3)


@pytest.mark.timeout(900)
def test_a_person_follows_a_run_in_the_browser(browser, repo, tmp_path, flow_env):
    from selenium.webdriver.common.by import By

    body = message(
        repo, NOTEBOOKS, parameters={"env": "ci"}, compute={"backend": "local"}, timeoutMinutes=10
    )
    with app_host(flow_env / "state", clock="real") as host:
        instance = deliver(host, body)
        page = f"{host.base_url}/api/runs/{instance}"

        # While it runs: every notebook listed, the slow one still going, the page live.
        state, rows = _wait_for_page(
            browser,
            page,
            lambda s, r: r.get("nb/slow.ipynb", {}).get("state") == "running",
            "the slow notebook running",
            240,  # generous: kernels start slowly on a loaded 2-core machine
        )
        assert state == "running"
        assert set(rows) == {n if isinstance(n, str) else n["path"] for n in NOTEBOOKS}
        # One script call: the page may reload itself between two WebDriver calls.
        refresh = browser.execute_script(
            "const m = document.querySelector('meta[http-equiv=refresh]'); return m && m.content"
        )
        assert refresh == "3"
        _screenshot(browser, tmp_path, "status-page-running.png")

        # The page refreshes itself: no reload from here, only waiting for what it shows.
        deadline = time.monotonic() + 240
        while state == "running":
            assert time.monotonic() < deadline, f"the page never showed the end: {rows}"
            time.sleep(0.5)
            state, rows = _page_state(browser)
        assert host.wait_for(instance, 30)["runtimeStatus"] == "Completed"

        assert state == "succeededWithIssues"
        for path in ("hello", "parameters"):
            assert rows[f"examples/notebooks/{path}.ipynb"]["state"] == "succeeded"
        assert rows["nb/slow.ipynb"]["state"] == "succeeded"
        failing = rows["examples/notebooks/failing.ipynb"]
        assert failing["state"] == "failed\nallowed to fail"
        assert failing["error"].startswith("ZeroDivisionError: division by zero (cell 2)")
        # The hostile error line is text: its markup is shown, never run or parsed.
        assert f"ValueError: {EVIL} (cell 1)" in rows["nb/hostile.ipynb"]["error"]
        assert browser.title.startswith("succeededWithIssues")
        assert not browser.find_elements(By.CSS_SELECTOR, "#notebooks b")
        slow_seconds = float(rows["nb/slow.ipynb"]["execution"].split()[0])
        assert 8 <= slow_seconds < 60
        assert not browser.find_elements(By.CSS_SELECTOR, "meta[http-equiv=refresh]")
        _screenshot(browser, tmp_path, "status-page.png")

        # The rendered notebook, one click away; its banner links to the failing cell.
        links = failing["links"]
        assert set(links) == {"rendered (cell 2)", ".ipynb"}
        with urllib.request.urlopen(links[".ipynb"], timeout=30) as answer:  # noqa: S310
            assert json.loads(answer.read())["metadata"]["papermill"]["parameters"] == {"env": "ci"}
        browser.find_element(By.LINK_TEXT, "rendered (cell 2)").click()
        banner = browser.find_element(By.ID, "notebookops-summary")
        assert "examples/notebooks/failing.ipynb" in banner.text
        assert "Failed in cell 2: ZeroDivisionError: division by zero" in banner.text
        injected = browser.find_element(By.ID, "injected-parameters")
        assert "Parameters injected by papermill" in injected.text and 'env = "ci"' in injected.text
        _screenshot(browser, tmp_path, "rendered-notebook.png")
        browser.find_element(By.LINK_TEXT, "Failed in cell 2").click()
        assert browser.current_url.endswith("#failing-cell")
        marker = browser.find_element(By.ID, "failing-cell")
        assert marker.is_displayed() and marker.text == "This cell failed"
        top = browser.execute_script(
            "const r = document.getElementById('failing-cell').getBoundingClientRect();"
            "return [r.top, window.innerHeight]"
        )
        assert 0 <= top[0] < top[1], top  # the jump shows the failing cell on screen

        # A notebook's own HTML is shown, but its script does not run (sandbox CSP).
        browser.get(f"{host.base_url}/api/runs/{instance}")
        browser.find_element(By.LINK_TEXT, "rendered (cell 1)").click()
        assert browser.find_element(By.ID, "own").text == "notebook html"
        time.sleep(1)
        assert browser.title == "nb/hostile.ipynb"

        # The list of runs for browsers, with a working link back to this run.
        browser.get(f"{host.base_url}/api/runs")
        link = browser.find_element(By.LINK_TEXT, instance)
        row = link.find_element(By.XPATH, "./ancestor::tr")
        assert "succeededWithIssues" in row.text and "3/5 succeeded, 2 failed" in row.text
        link.click()
        assert browser.find_element(By.ID, "run-state").text == "succeededWithIssues"
