"""``nodemesh <command>`` imports only the module that owns the command, and the table that says
which module that is matches what the modules register."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from agent.cli import COMMAND_MODULES, COMMANDS, build_parser, command_word


def test_the_command_table_is_what_each_module_registers() -> None:
    registered = {}
    for name in COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(name).register(sub)
        registered.update(dict.fromkeys(sub.choices, name))
    assert registered == COMMANDS


@pytest.mark.parametrize(
    ("argv", "word"),
    [
        (["agent", "--node", "n1"], "agent"),
        (["--log-level", "DEBUG", "agent"], "agent"),
        (["--log-level=DEBUG", "lab", "up"], "lab"),
        (["--help"], None),
        ([], None),
    ],
)
def test_command_word(argv: list[str], word: str | None) -> None:
    assert command_word(argv) == word


def test_help_still_lists_every_command() -> None:
    assert set(COMMANDS) <= set(build_parser(None)._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def test_the_agent_command_line_leaves_what_it_does_not_use_unimported() -> None:
    """What ``nodemesh agent`` imports with a CA (the proxy and identity parts come with
    ``--ca-address``): not the lab, the views or the admin client, not grpc, protobuf or
    pyroute2 (their children and the CA have them), not RE2 before a route asks for a regex."""
    probe = (
        "import sys; from agent.cli import build_parser; "
        "build_parser('agent').parse_args(['agent', '--node', 'n1', '--cluster-file', 'x']); "
        "import agent.identity.component, agent.proxy.component, agent.proxy.server; "
        "print(sorted(m for m in ('pyroute2', 'agent.lab', 'agent.view', 'agent.admin.cli', "
        "'grpc', 'google.protobuf', 're2', 'bcc') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
