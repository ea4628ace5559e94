"""`python -m notebookops submit BODY.json`: hand a message to a running app over HTTP
(`POST /api/runs`, as the Invoke Azure Function task does) and print its status page.

With `make serve` in one terminal, `make demo-submit` in another starts the demo's run and
prints the page a person opens to follow it. A relative `repository.url` is resolved against
the message file's folder, as `run` does.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any
from urllib.parse import urlsplit

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def _submit(args: argparse.Namespace) -> int:
    import requests

    from notebookops.message_file import UsageError, read_message_file, read_properties

    properties = read_properties(args.properties)
    try:
        body = read_message_file(args.body)
    except OSError as exc:
        raise UsageError(f"cannot read message body {args.body}: {exc.strerror or exc}") from None
    base = args.url.rstrip("/")
    if urlsplit(base).scheme not in ("http", "https"):
        raise UsageError(f"--url must be an http(s) address, got {args.url!r}")
    # The callback values travel as headers here, as the Invoke Azure Function task sends them.
    headers = {"Content-Type": "application/json"}
    headers.update({str(k): str(v) for k, v in (properties or {}).items()})
    params = {"code": args.key} if args.key else None
    try:
        answer = requests.post(
            f"{base}/api/runs", data=body, headers=headers, params=params, timeout=60
        )
    except requests.RequestException as exc:
        print(f"cannot reach {base}: {exc.__class__.__name__} (is `make serve` running?)")
        return EXIT_FAILED
    payload = _json(answer)
    if answer.status_code == 400:
        for error in payload.get("errors") or [payload.get("error")]:
            print(error, file=sys.stderr)
        return EXIT_INVALID
    if answer.status_code != 202:
        print(
            f"{base}/api/runs answered {answer.status_code}: {answer.text[:500]}", file=sys.stderr
        )
        return EXIT_FAILED
    run_id = payload.get("id")
    page = f"{base}/api/runs/{run_id}"
    state = "already known (a duplicate message)" if payload.get("duplicate") else "started"
    print(f"run {run_id} {state}")
    print(f"status page (open in a browser): {page}")
    print(f"all runs: {base}/api/runs")
    return EXIT_OK


def _json(answer: Any) -> dict[str, Any]:
    try:
        value = answer.json()
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def add_submit_command(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="send a message to a running app (serve, or the deployed one) and print its page",
        description="POST the message to URL/api/runs and print the run's status page. "
        "Exit 0 when the app accepted it, 2 when it is invalid, 1 when the app cannot be reached.",
    )
    parser.add_argument("body", metavar="BODY.json", help="message body")
    parser.add_argument(
        "--properties",
        metavar="PROPS.json",
        help="JSON object of callback values, sent as HTTP headers (PlanUrl, AuthToken, ...)",
    )
    parser.add_argument(
        "--url", default="http://127.0.0.1:7071", help="the app (default: %(default)s)"
    )
    parser.add_argument("--key", help="function key, for a deployed app (sent as ?code=)")
    parser.set_defaults(handler=_submit)


__all__ = ["add_submit_command"]
