"""The ``nodemesh`` command line.

Each domain package owns its subcommands: it exposes ``register(subparsers)`` which adds its
parsers and sets ``func`` on them. This module only assembles them, so that adding a command never
touches another package, and importing the CLI stays cheap (heavy imports such as ``bcc`` happen
inside the command functions, not at module import).

A command line that names a command imports only the module that owns it (``COMMANDS``): the
long-running ``nodemesh agent`` would otherwise carry the lab's pyroute2, the admin client and
the views it never uses (ARCHITECTURE.md, "No compiler in the agent"). ``--help`` and unknown
commands still see every module.

Output piped into a reader that leaves early (``nodemesh requests | head``, ``... -o json | jq``
interrupted) ends the command quietly with the status a shell gives a writer killed by SIGPIPE,
as ``kubectl``'s or ``cat``'s, instead of a traceback: Python ignores SIGPIPE, so the write
raises ``BrokenPipeError``. Only when stdout's reader is gone; a broken socket stays an error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import signal
import sys
from collections.abc import Sequence

from agent import __version__
from agent.telemetry import loglevel

# Modules that contribute subcommands, in the order they appear in ``--help``.
COMMAND_MODULES: tuple[str, ...] = (
    "agent.preflight",
    "agent.lab.cli",
    "agent.app",
    "agent.ca.cli",
    "agent.admin.cli",
    "agent.view.cli",
    "agent.view.proxystatus",
)

# Which module registers each command (checked against the modules by the CLI's unit tests).
COMMANDS: dict[str, str] = {
    "check": "agent.preflight",
    "lab": "agent.lab.cli",
    "agent": "agent.app",
    "ca": "agent.ca.cli",
    **dict.fromkeys(
        ("status", "workloads", "connections", "certs", "policies", "routes", "traffic",
         "requests"),
        "agent.admin.cli",
    ),
    "proxy-status": "agent.view.proxystatus",
    **dict.fromkeys(("stat", "edges", "top", "dashboard"), "agent.view.cli"),
}  # fmt: skip


def command_word(argv: Sequence[str]) -> str | None:
    """The command named on a command line (the first word that is not a global option)."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or only with ``command``'s module when it is known."""
    parser = argparse.ArgumentParser(
        prog="nodemesh",
        description="nodemesh: a sidecarless service mesh (node agent, CA, lab and tools).",
    )
    parser.add_argument("--version", action="version", version=f"nodemesh {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default: INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = (COMMANDS[command],) if command in COMMANDS else COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def chosen_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The (sub)command parser ``args`` went to: an argument no parser took is its error, with
    its usage (``nodemesh agent: error: unrecognized arguments: --protocol h3``), where
    ``parse_args`` blamed the top-level ``nodemesh`` and showed its usage, not the command's."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices.get(getattr(args, action.dest, None) or "")
            if sub is not None:
                return chosen_parser(sub, args)
    return parser


SIGPIPE_STATUS = 128 + signal.SIGPIPE  # a shell's status for a writer whose reader left


def stdout_reader_gone() -> bool:
    """Is stdout a pipe whose reading end is closed? (Its write end then polls ``POLLERR``.)"""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a stream without a descriptor
        return False
    poller = select.poll()
    poller.register(fd, 0)  # errors are reported whatever the mask
    return any(events & select.POLLERR for _, events in poller.poll(0))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        if not stdout_reader_gone():
            raise
        # What is still buffered would fail again when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_STATUS


def _main(argv: Sequence[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_word(argv))
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    loglevel.configure(args.log_level)
    result: int = args.func(args)
    return result
