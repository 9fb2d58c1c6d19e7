"""Every option and argument of every ``nodemesh`` command says what it is in ``--help``: a user
coming from ``istioctl``/``linkerd`` reads ``--help`` first, and a bare ``-o {table,json}`` or
``--drain-seconds DRAIN_SECONDS`` leaves them to guess the default or the unit."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from agent.cli import build_parser, main


def _undocumented(parser: argparse.ArgumentParser, path: str) -> Iterator[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _undocumented(sub, f"{path} {name}")
        elif not action.help and not isinstance(action, argparse._HelpAction):
            yield f"{path} {'/'.join(action.option_strings) or action.dest}"


def test_every_option_of_every_command_has_help() -> None:
    assert list(_undocumented(build_parser(None), "nodemesh")) == []


@pytest.mark.parametrize(
    ("argv", "prog", "unknown"),
    [
        (["agent", "--node", "n", "--in-cluster", "--protocol", "h3"], "nodemesh agent",
         "--protocol h3"),
        (["lab", "up", "--components"], "nodemesh lab up", "--components"),
        (["--log-level", "DEBUG", "status", "--pod", "x"], "nodemesh status", "--pod x"),
    ],
)  # fmt: skip
def test_an_unknown_argument_is_the_commands_error_with_its_usage(
    argv: list[str], prog: str, unknown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "nodemesh: error: ..." under the top-level usage, which lists every command but
    none of the options the user was looking for."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(f"usage: {prog} ")
    assert err.splitlines()[-1] == f"{prog}: error: unrecognized arguments: {unknown}"
