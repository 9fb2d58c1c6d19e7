"""The ``nodemesh`` command line.

Each domain package owns its subcommands: it exposes ``register(subparsers)`` which adds its
parsers and sets ``func`` on them. This module only assembles them, so that adding a command never
touches another package, and importing the CLI stays cheap (heavy imports such as ``bcc`` happen
inside the command functions, not at module import).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from agent import __version__

# Modules that contribute subcommands, in the order they appear in ``--help``.
COMMAND_MODULES: tuple[str, ...] = (
    "agent.preflight",
    "agent.lab.cli",
    "agent.app",
    "agent.ca.cli",
    "agent.admin.cli",
    "agent.view.cli",
)


def build_parser() -> argparse.ArgumentParser:
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
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    result: int = args.func(args)
    return result
