"""Every option and argument of every ``nodemesh`` command says what it is in ``--help``: a user
coming from ``istioctl``/``linkerd`` reads ``--help`` first, and a bare ``-o {table,json}`` or
``--drain-seconds DRAIN_SECONDS`` leaves them to guess the default or the unit."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from agent.cli import build_parser


def _undocumented(parser: argparse.ArgumentParser, path: str) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _undocumented(sub, f"{path} {name}")
        elif not action.help and not isinstance(action, argparse._HelpAction):
            yield f"{path} {'/'.join(action.option_strings) or action.dest}"


def test_every_option_of_every_command_has_help() -> None:
    assert list(_undocumented(build_parser(None), "nodemesh")) == []
