"""`python -m devhost serve --app DIR --state DIR`: host a function app locally over HTTP."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devhost", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="host the app over HTTP until interrupted")
    add_serve_arguments(serve, default_app=".")
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser, *, default_app: str | None) -> None:
    if default_app is not None:
        parser.add_argument(
            "--app", default=default_app, help="function app folder (default: %(default)s)"
        )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=7071, help="port (default: %(default)s; 0 picks one)"
    )
    parser.add_argument("--state", default=".devhost", help="state folder (default: %(default)s)")
    parser.add_argument(
        "--clock",
        choices=["real", "virtual"],
        default="real",
        help="virtual time jumps to the next durable timer when nothing else can run",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")


def run_server(app_dir: str, args: argparse.Namespace) -> int:
    from .app import AppIndexError
    from .host import Host
    from .store import StateError

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        host = Host(app_dir, args.state, clock=args.clock, host=args.host, port=args.port).start()
    except (AppIndexError, StateError, OSError) as exc:
        print(f"devhost: {exc}", file=sys.stderr)
        return 2
    print(f"devhost listening on {host.base_url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    host.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_server(args.app, args)


if __name__ == "__main__":
    sys.exit(main())
