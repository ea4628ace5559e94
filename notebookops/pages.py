"""HTML for people: the run page, the list of runs, and the headers every page is served with.

Jinja2 with autoescaping: everything that comes from a notebook, a message or a backend is
text on these pages, never markup. The pages need no script: a running run's page refreshes
itself (meta refresh) until the run ends.
"""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from notebookops.status import RUN_STATES

TEMPLATES = Path(__file__).resolve().parent / "templates" / "pages"
REFRESH_SECONDS = 3

# No script at all, styles inline, links and forms to this app only; nothing leaks the URL
# (which may carry the function key) to a portal link through Referer.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# A rendered notebook is the notebook's own HTML: `sandbox` gives it an opaque origin and,
# without allow-scripts, runs none of its scripts, so nothing in it can call the app's API.
NOTEBOOK_HEADERS = {
    "Content-Security-Policy": "sandbox; default-src 'none'; style-src 'unsafe-inline'; "
    "img-src data:; font-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def wants_html(accept: str | None) -> bool:
    """Content negotiation on Accept: HTML only when text/html is preferred to JSON."""
    if not accept:
        return False
    best: dict[str, float] = {}
    for item in accept.split(","):
        kind, *params = (p.strip() for p in item.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        best[kind.lower()] = max(quality, best.get(kind.lower(), 0.0))
    html = max(best.get("text/html", 0.0), best.get("application/xhtml+xml", 0.0))
    json = max(best.get("application/json", 0.0), best.get("*/*", 0.0) if html == 0 else 0.0)
    return html > 0 and html >= json


def _seconds(value: Any) -> str:
    if value is None:
        return "–"
    value = float(value)
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    return (
        f"{minutes} min {seconds:02d} s"
        if minutes < 60
        else f"{minutes // 60} h {minutes % 60:02d} min"
    )


def _when(value: Any) -> str:
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return moment.strftime(
        "%Y-%m-%d %H:%M:%S UTC" if moment.utcoffset() is not None else "%Y-%m-%d %H:%M:%S"
    )


@lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["seconds"] = _seconds
    env.filters["when"] = _when
    return env


def _with_query(url: str, query: dict[str, str], **extra: str) -> str:
    from urllib.parse import urlencode

    merged = {**query, **extra}
    return f"{url}?{urlencode(merged)}" if merged else url


def _bar(tally: dict[str, Any]) -> list[tuple[str, float]]:
    total = tally.get("total") or 1
    parts = {
        "ok": tally.get("succeeded") or 0,
        "bad": (tally.get("failed") or 0) + (tally.get("timedOut") or 0),
        "other": tally.get("canceled") or 0,
        "run": tally.get("running") or 0,
    }
    return [(k, round(100 * v / total, 2)) for k, v in parts.items() if v]


def run_page(view: dict[str, Any], query: dict[str, str]) -> str:
    from urllib.parse import quote

    notebooks = view.get("notebooks") or []
    done = ("succeeded", "failed", "timedOut", "canceled")
    # The counts cover every notebook; a running run may list only some (status.run_view).
    tally = view.get("counts") or {}
    if not isinstance(tally.get("total"), int):
        tally = {"total": len(notebooks)}
        for notebook in notebooks:
            tally[notebook.get("state")] = tally.get(notebook.get("state"), 0) + 1
    return (
        _environment()
        .get_template("run.html.j2")
        .render(
            run=view,
            total=tally["total"],
            finished=sum(tally.get(k) or 0 for k in done),
            running=tally.get("running") or 0,
            bar=_bar(tally),
            refresh_seconds=REFRESH_SECONDS if view.get("state") == "running" else None,
            json_url=_with_query(
                f"/api/runs/{quote(view['instanceId'], safe='')}", query, format="json"
            ),
            home_url=_with_query("/api/runs", query),
        )
    )


def runs_page(listing: dict[str, Any], selected: set[str] | None, query: dict[str, str]) -> str:
    running = any(r.get("state") == "running" for r in listing.get("runs") or [])
    return (
        _environment()
        .get_template("runs.html.j2")
        .render(
            listing=listing,
            states=RUN_STATES,
            selected=selected or set(),
            hidden=query,
            refresh_seconds=REFRESH_SECONDS * 2 if running else None,
            home_url=_with_query("/api/runs", query),
        )
    )
