"""What the HTTP shells share (agent.proxy.httpshell): the head timer, driven the way a shell
drives it (after each input, with the proxy's ``head_started``), over a loop that only records
its timers, so that nothing here waits or depends on how fast the machine is; and the callback
shell's reader and end, over a socket pair."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agent.proxy import httpshell
from agent.proxy.http1 import HEADER_TIMEOUT, Http1Proxy, Verdict
from agent.proxy.httpshell import CallbackShell, HeadTimer

NOW = 100.0  # the clock of the proxy and of the timer


class _Timer:
    def __init__(self, delay: float, callback: Callable[[], None]) -> None:
        self.delay, self.callback = delay, callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Loop:
    """Records ``call_later``; a test fires a timer by calling its callback."""

    def __init__(self) -> None:
        self.timers: list[_Timer] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(delay, callback)
        self.timers.append(timer)
        return timer

    @property
    def armed(self) -> list[_Timer]:
        return [t for t in self.timers if not t.cancelled]


class _Shell:
    """What a shell does with the timer: look at ``head_started`` after each input, and have
    the proxy answer a late head."""

    def __init__(self, loop: _Loop, timeout: float = 10.0) -> None:
        self.proxy = Http1Proxy(authorize=lambda _h: Verdict(True), clock=lambda: NOW)
        self.head = HeadTimer(cast(asyncio.AbstractEventLoop, loop), timeout, self._late)

    def client(self, data: bytes) -> None:
        self.proxy.receive_client(data)
        self.head.time(self.proxy.head_started)

    def pod(self, data: bytes) -> None:
        self.proxy.receive_upstream(data)
        self.head.time(self.proxy.head_started)

    def _late(self) -> None:
        self.proxy.header_timeout()


@pytest.fixture(autouse=True)
def _clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpshell, "time", cast(Any, SimpleNamespace(monotonic=lambda: NOW)))


def test_a_head_is_timed_from_its_first_byte_and_the_timer_stops_when_it_is_complete() -> None:
    loop = _Loop()
    shell = _Shell(loop)
    shell.client(b"GET / HTTP/1.1\r\n")
    (timer,) = loop.armed
    assert timer.delay == 10.0 and shell.head.started == NOW
    shell.client(b"Host: svc\r\n")  # the same head trickles on: the timer stays as it is
    assert loop.timers == [timer] and not timer.cancelled
    shell.client(b"\r\n")
    assert timer.cancelled and not loop.armed and shell.head.started is None


def test_a_head_that_arrives_whole_arms_no_timer() -> None:
    loop = _Loop()
    shell = _Shell(loop)
    shell.client(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    assert loop.timers == []


def test_a_late_head_is_answered_408_and_the_connection_closes() -> None:
    loop = _Loop()
    shell = _Shell(loop)
    shell.client(b"GET / HTTP/1.1\r\nHost: sv")
    (timer,) = loop.armed
    timer.callback()  # the loop runs it at the deadline
    assert shell.proxy.take_to_client().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert shell.proxy.take_rejections() == [HEADER_TIMEOUT] and shell.proxy.closing
    assert shell.head.started is None  # fired: nothing left to cancel


def test_the_next_keep_alive_head_is_timed_again() -> None:
    loop = _Loop()
    shell = _Shell(loop)
    shell.client(b"GET /a HTTP/1.1\r\n")
    shell.client(b"Host: svc\r\n\r\n")
    shell.pod(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert shell.proxy.take_completed() and not loop.armed
    shell.client(b"GET /b HTTP/1.1\r\n")  # the next request on the connection
    first, second = loop.timers
    assert first.cancelled and not second.cancelled and second.delay == 10.0


def test_the_delay_counts_from_the_first_byte_not_from_when_the_shell_looked() -> None:
    loop = _Loop()
    head = HeadTimer(cast(asyncio.AbstractEventLoop, loop), 10.0, lambda: None)
    head.time(NOW - 4.0)
    head.time(None)
    head.time(NOW - 12.0)  # already late: fires at once
    assert [t.delay for t in loop.timers] == [6.0, 0.0]


def test_cancel_stops_the_timer() -> None:
    loop = _Loop()
    fired: list[bool] = []
    head = HeadTimer(cast(asyncio.AbstractEventLoop, loop), 10.0, lambda: fired.append(True))
    head.time(NOW)
    head.cancel()
    assert not loop.armed and not fired
    head.time(NOW)  # the head it timed: not armed again
    assert not loop.armed


def test_it_runs_on_a_real_loop() -> None:
    async def main() -> list[str]:
        fired: list[str] = []
        loop = asyncio.get_running_loop()
        head = HeadTimer(loop, 0.0, lambda: fired.append("late"))
        head.time(NOW)  # due already (the clock is frozen at NOW)
        await asyncio.sleep(0.01)
        return fired

    assert asyncio.run(main()) == ["late"]


class _Session(CallbackShell):
    """A callback shell over a socket pair: what it reads, how often it was moved."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, 10.0)
        self.sock = sock
        self.proxy = SimpleNamespace(closing=False, head_started=None, timed_out=0)  # type: ignore[assignment]
        self.proxy.header_timeout = self._timed_out  # type: ignore[attr-defined]
        self.read: list[bytes] = []
        self.moved = 0

    def _timed_out(self) -> None:
        self.proxy.timed_out += 1  # type: ignore[attr-defined]

    def _readable(self) -> None:
        self.read.append(self.sock.recv(100))

    def _moved(self) -> None:
        self.moved += 1


def test_the_reader_is_registered_once_and_stops_with_the_end() -> None:
    async def main(ours: socket.socket, peer: socket.socket) -> None:
        session = _Session(ours)
        session._reader.start()
        session._reader.start()  # already reading: not registered again
        peer.send(b"a")
        await asyncio.sleep(0.05)
        assert session.read == [b"a"] and session._reader.active
        session._end(None)
        session._end(RuntimeError("late"))  # ended once: the first end stands
        assert not session._reader.active and session._ended.result() is None
        peer.send(b"b")  # no longer read
        await asyncio.sleep(0.05)
        assert session.read == [b"a"]

    ours, peer = socket.socketpair()
    with ours, peer:
        ours.setblocking(False)
        asyncio.run(main(ours, peer))


def test_a_late_head_is_answered_while_the_session_lives() -> None:
    async def main(ours: socket.socket) -> None:
        session = _Session(ours)
        session._head_expired()  # no head open: nothing to answer
        session.proxy.head_started = NOW
        session._head_expired()
        assert (session.proxy.timed_out, session.moved) == (1, 1)  # type: ignore[attr-defined]
        session._end(ConnectionResetError("gone"))
        session._head_expired()  # ended: not answered again
        assert (session.proxy.timed_out, session.moved) == (1, 1)  # type: ignore[attr-defined]
        assert isinstance(session._ended.exception(), ConnectionResetError)

    ours, peer = socket.socketpair()
    with ours, peer:
        ours.setblocking(False)
        asyncio.run(main(ours))


def test_a_blocking_socket_is_refused() -> None:
    async def main(ours: socket.socket) -> None:
        with pytest.raises(ValueError, match="setblocking"):
            _Session(ours)

    ours, peer = socket.socketpair()
    with ours, peer:
        asyncio.run(main(ours))


def test_an_outbox_says_busy_without_a_call_and_follows_its_idle_event(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Outbox.busy`` is a plain attribute the shells read after every input (and ``send``
    before every write): no ``Event.is_set`` call for either (two per read of ``busy`` and
    one per send before), and it says what ``idle`` says through a write the side takes
    whole, one it takes in part (the rest queued and drained) and the next one."""
    asked: list[bool] = []
    real = asyncio.Event.is_set

    counting = [True]

    def counted(self: asyncio.Event) -> bool:
        if counting[0]:
            asked.append(True)
        return real(self)

    taken: list[bytes] = []
    room = [100]

    def try_write(data: bytes) -> int:
        n = min(room[0], len(data))
        taken.append(bytes(data[:n]))
        return n

    async def write(data: bytes) -> None:
        taken.append(bytes(data))

    async def main() -> list[tuple[bool, bool]]:
        drained = asyncio.Event()
        box = httpshell.Outbox(try_write, write, drained.set, lambda _e: None)
        monkeypatch.setattr(asyncio.Event, "is_set", counted)
        seen = []
        box.send(b"a" * 10)
        seen.append((box.busy, real(box.idle)))
        room[0] = 4
        box.send(b"b" * 10)
        seen.append((box.busy, real(box.idle)))
        box.send(b"c" * 3)  # queued behind the rest: not written before it
        counting[0] = False
        await drained.wait()
        seen.append((box.busy, box.idle.is_set()))
        return seen

    assert asyncio.run(main()) == [(False, True), (True, False), (False, True)]
    assert b"".join(taken) == b"a" * 10 + b"b" * 10 + b"c" * 3
    assert asked == []
