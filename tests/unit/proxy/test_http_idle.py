"""``IdleTimer`` on a fake clock: one timer per idle period, a request in between moves it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from agent.proxy.httpidle import IdleTimer


class FakeLoop:
    """``time`` and ``call_later`` as ``IdleTimer`` uses them; ``run_until`` fires what is due."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.armed = 0

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None], **_kw: Any) -> Any:
        self.armed += 1
        self.timers.append((self.now + delay, callback))
        return self

    def cancel(self) -> None:  # the handle: only ever one armed in these tests
        self.timers.clear()

    def run_until(self, when: float) -> None:
        while due := [t for t in self.timers if t[0] <= when]:
            first = min(due, key=lambda t: t[0])
            self.timers.remove(first)
            self.now = first[0]
            first[1]()
        self.now = when


def timer() -> tuple[FakeLoop, IdleTimer, list[float]]:
    loop = FakeLoop()
    fired: list[float] = []
    idle = IdleTimer(cast(asyncio.AbstractEventLoop, loop), lambda: fired.append(loop.now))
    return loop, idle, fired


def test_it_expires_a_whole_timeout_after_the_last_request() -> None:
    loop, idle, fired = timer()
    idle.idle(10.0)
    for at in (3.0, 6.0, 9.0):  # a request every 3 s, each ending at once
        loop.run_until(at)
        idle.busy()
        idle.idle(10.0)
    loop.run_until(18.9)
    assert fired == []
    loop.run_until(30.0)
    assert fired == [19.0]
    assert loop.armed == 2  # one timer per idle period, not one per request


def test_a_busy_connection_is_never_expired_and_a_later_idle_period_is_timed_whole() -> None:
    loop, idle, fired = timer()
    idle.idle(10.0)
    loop.run_until(1.0)
    idle.busy()  # a request in flight past the first expiry
    loop.run_until(25.0)
    assert fired == []
    idle.idle(10.0)
    loop.run_until(34.9)
    assert fired == []
    loop.run_until(35.0)
    assert fired == [35.0]


def test_without_a_timeout_nothing_is_armed_and_again_restarts_the_period() -> None:
    loop, idle, fired = timer()
    idle.idle(None)
    loop.run_until(1000.0)
    assert (fired, loop.armed) == ([], 0)
    idle.busy()
    idle.idle(5.0)
    loop.run_until(1005.0)
    assert fired == [1005.0]
    idle.again()  # the shell could not close (a write waited)
    loop.run_until(1009.9)
    assert fired == [1005.0]
    loop.run_until(1010.0)
    assert fired == [1005.0, 1010.0]
