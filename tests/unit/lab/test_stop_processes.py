"""``stop_processes`` leaves no process entry of a component it started behind, whenever the
component dies (the lab test ``test_down_stops_component_processes`` once found one)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from agent.config import AgentConfig
from agent.lab import build


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().split(")")[-1].split()[0]
    except FileNotFoundError:
        return None


@pytest.fixture
def stubborn() -> Iterator[int]:
    """A child of this process that ignores SIGTERM (an ignored disposition survives exec), with
    no ``Popen`` that could reap it."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        pid = os.posix_spawn("/bin/sleep", ["sleep", "60"], dict(os.environ))
    finally:
        signal.signal(signal.SIGTERM, previous)
    try:
        yield pid
    finally:
        if _state(pid) is not None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def _until_zombie(pid: int) -> None:
    deadline = time.monotonic() + 10
    while _state(pid) != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_child_that_dies_between_a_reap_and_the_look_is_reaped(
    stubborn: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window made certain: the first ``waitpid`` on the child that finds nothing to reap
    kills it and returns once it is a zombie (as when it dies just after such a reap). Looking
    before reaping removes it all the same."""
    real = os.waitpid

    def late(pid: int, options: int) -> tuple[int, int]:
        result = real(pid, options)
        if pid == stubborn and result == (0, 0):
            os.kill(stubborn, signal.SIGKILL)
            _until_zombie(stubborn)
        return result

    monkeypatch.setattr(os, "waitpid", late)
    build.stop_processes("nolab", [stubborn], grace=0.3)
    monkeypatch.undo()
    assert _state(stubborn) is None


def test_a_child_that_ignores_sigterm_is_killed_and_reaped(stubborn: int) -> None:
    build.stop_processes("nolab", [stubborn], grace=0.3)
    assert _state(stubborn) is None


def test_lab_down_waits_out_an_agents_default_drain_before_killing() -> None:
    """An agent drains for its --drain-seconds on SIGTERM: ``lab down``'s grace must outlast
    the default, or a lab with an open connection has its agents killed as they would exit."""
    assert AgentConfig.__dataclass_fields__["drain_seconds"].default + 1.0 < build.STOP_GRACE
