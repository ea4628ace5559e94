"""``python -m notebookops``: one subcommand per job, each added by a function in COMMANDS.

A subcommand is a function taking the subparsers object: it adds its parser and sets
``handler`` (``args -> exit code``) with ``set_defaults``. Modules behind a subcommand import
their heavy dependencies inside the handler so ``validate`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from notebookops import __version__
from notebookops.message_file import UsageError, read_properties

__all__ = [
    "COMMANDS",
    "EXIT_INVALID",
    "UsageError",
    "build_parser",
    "console",
    "main",
    "read_properties",
]

EXIT_INVALID = 2
# The installed console script is `notebookops`; from a checkout it is `python -m notebookops`.
PROG = "notebookops" if Path(sys.argv[0]).name == "notebookops" else "python -m notebookops"

Subparsers = Any  # argparse keeps the subparsers action type private
CommandAdder = Callable[[Subparsers], None]


def _validate(args: argparse.Namespace) -> int:
    from notebookops.message_file import inspect_message_file

    properties = read_properties(args.properties)
    try:
        request, _, errors = inspect_message_file(args.body, properties)
    except OSError as exc:
        raise UsageError(f"cannot read message body {args.body}: {exc.strerror or exc}") from None
    if errors or request is None:
        for error in errors:
            print(error, file=sys.stderr)
        return EXIT_INVALID
    count = len(request.notebooks)
    entries = "entry" if count == 1 else "entries"
    print(f"valid: {count} notebook {entries}, backend {request.compute.backend}")
    return 0


def add_validate_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "validate",
        help="check a message body (and its properties) without running anything",
        description="Exit 0 when the message would run; otherwise print each problem and exit 2.",
    )
    parser.add_argument("body", metavar="BODY.json", help="message body as the queue delivers it")
    parser.add_argument(
        "--properties",
        metavar="PROPS.json",
        help="JSON object of Service Bus application properties (PlanUrl, AuthToken, ...)",
    )
    parser.set_defaults(handler=_validate)


def _run(args: argparse.Namespace) -> int:
    from notebookops.local_run import quiet_logs, run
    from notebookops.redact import install_log_redaction

    install_log_redaction()
    quiet_logs(args.verbose)
    properties = read_properties(args.properties)
    if not Path(args.body).is_file():
        raise UsageError(f"cannot read message body {args.body}: no such file")
    if args.rerun and not args.state:
        raise UsageError("--rerun needs --state DIR: without it every run starts afresh anyway")
    return run(
        args.body,
        properties,
        args.out,
        args.state,
        args.workers,
        quiet=args.quiet,
        rerun=args.rerun,
        app=args.app,
    )


def add_run_command(subparsers: Subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run the whole flow on this machine (devhost + local backend)",
        description="Deliver the message to the app through devhost, show progress, and write "
        "DIR/summary.json, DIR/junit.xml and DIR/notebooks/. Exit 0 when the result is "
        "succeeded or succeededWithIssues, 1 when failed or canceled, 2 for an invalid request.",
    )
    parser.add_argument("body", metavar="BODY.json", help="message body as the queue delivers it")
    parser.add_argument(
        "--properties",
        metavar="PROPS.json",
        help="JSON object of Service Bus application properties",
    )
    parser.add_argument(
        "--out", metavar="DIR", default="out", help="where results go (default: %(default)s)"
    )
    parser.add_argument(
        "--state",
        metavar="DIR",
        help="keep devhost state and local runs here (default: a temp folder, "
        "removed afterwards); reuse it to resume an interrupted run",
    )
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="with --state: run a finished run again instead of showing its result again",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="notebooks run at once on the local backend (default: CPU count)",
    )
    _add_app_argument(parser)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    parser.add_argument("-v", "--verbose", action="store_true", help="show host and app logs")
    parser.set_defaults(handler=_run)


def _add_app_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--app",
        metavar="DIR",
        help="the function app folder to host (default: this checkout's, else the one "
        "installed with the notebookops package)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _serve(args: argparse.Namespace) -> int:
    from notebookops.local_run import serve
    from notebookops.redact import install_log_redaction

    install_log_redaction()
    return serve(args)


def add_serve_command(subparsers: Subparsers) -> None:
    from devhost.__main__ import add_serve_arguments

    parser = subparsers.add_parser(
        "serve",
        help="host the function app over HTTP with devhost (Functions host conventions)",
        description='POST /admin/functions/ServiceBusStarter with {"input": BODY, '
        '"applicationProperties": {...}} fires the queue trigger; the durable API is under '
        "/runtime/webhooks/durabletask/ and HTTP functions under /api/.",
    )
    add_serve_arguments(parser, default_app=None)
    _add_app_argument(parser)
    parser.add_argument(
        "--allow-local-repos",
        action="store_true",
        help="accept local paths and file:// repository URLs (anyone who can reach the port "
        "could then clone this machine's folders); `run` always accepts them",
    )
    parser.set_defaults(handler=_serve)


def add_submit_command(subparsers: Subparsers) -> None:
    from notebookops.submit import add_submit_command as add

    add(subparsers)


COMMANDS: list[CommandAdder] = [
    add_validate_command,
    add_run_command,
    add_serve_command,
    add_submit_command,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run Jupyter notebooks from Azure DevOps on Azure ML or locally.",
    )
    parser.add_argument("--version", action="version", version=f"notebookops {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_INVALID


# What main() returns when it finished its job (130 is an interrupted run: threads may still
# be running activities, and the usual exit lets them finish).
_DONE = frozenset({0, 1, EXIT_INVALID})


def console(argv: list[str] | None = None) -> int:
    """The command (`notebookops`, `python -m notebookops`): main(), then, once it finished,
    out of the process without the interpreter's teardown of every module a run imported
    (0.1-0.2 s of a one-notebook run). Nothing of that teardown is visible: the outputs are
    written and closed, devhost's store is closed, the output streams are flushed here, and
    the render worker and kernels end on their own when this process's pipes close."""
    code = main(argv)
    if code not in _DONE:
        return code
    for stream in (sys.stdout, sys.stderr):
        # A closed or broken pipe: nothing more can be told.
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
