"""``nodemesh lab`` refuses a flag value that cannot work before it builds anything (no root
needed: only the command line is parsed)."""

from __future__ import annotations

import pytest

from agent.cli import build_parser, main
from agent.lab import control


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        build_parser("lab").parse_args(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("command", [["up"], ["upgrade", "node1"]])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_timeout_that_leaves_no_time_is_refused(
    command: list[str], value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    error = _error(["lab", *command, "--timeout", value], capsys)
    # Before: `lab up` built the namespaces, then failed with "ca was not ready after -1s".
    assert error.endswith(f"argument --timeout: {value!r}: expected more than 0 seconds, e.g. 60")


@pytest.mark.parametrize("command", [["up"], ["upgrade", "node1"]])
def test_a_negative_drain_is_refused_before_an_agent_is_started(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    error = _error(["lab", *command, "--drain-seconds", "-5"], capsys)
    assert error.endswith("argument --drain-seconds: '-5': expected 0 or more seconds, e.g. 5")


def test_seconds_that_are_no_number_are_named(capsys: pytest.CaptureFixture[str]) -> None:
    error = _error(["lab", "up", "--timeout", "1m"], capsys)
    assert error.endswith("argument --timeout: '1m' is not a number of seconds, e.g. 60")


def test_good_values_pass() -> None:
    args = build_parser("lab").parse_args(["lab", "up", "--timeout", "0.5", "--drain-seconds", "0"])
    assert (args.timeout, args.drain_seconds) == (0.5, 0.0)


def test_a_user_without_root_is_told_to_use_root_not_shown_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What the state directory (0700, root's) answers a user who forgot sudo."""

    def refused(name: str) -> None:
        raise PermissionError(13, "Permission denied", f"/run/nodemesh/lab/{name}/plan.json")

    monkeypatch.setattr(control, "status", refused)
    assert main(["lab", "status", "--name", "uxa"]) == 1
    assert capsys.readouterr().err == (
        "nodemesh lab: error: /run/nodemesh/lab/uxa/plan.json: Permission denied; the lab needs "
        "root (it builds network namespaces and keeps its state in /run/nodemesh/lab): run it "
        "as root, e.g. sudo .venv/bin/nodemesh lab ...\n"
    )
