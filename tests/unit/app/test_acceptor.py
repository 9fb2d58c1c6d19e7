"""The accept loop survives descriptor exhaustion and aborted connections; a broken listener
still ends it."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from agent import acceptor
from agent.acceptor import ACCEPT_ERRORS, accept_forever, backoff_for, drain


class FlakyListener(socket.socket):
    """A real listening socket whose first accepts fail with the given errnos."""

    def __init__(self, failures: list[int]) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.failures = failures

    def accept(self) -> tuple[socket.socket, object]:
        if self.failures:
            code = self.failures.pop(0)
            raise OSError(code, errno.errorcode[code])
        return super().accept()


def test_classification() -> None:
    assert backoff_for(OSError(errno.EMFILE, "")) == acceptor.BACKOFF_SECONDS
    assert backoff_for(OSError(errno.ECONNABORTED, "")) == 0.0
    assert backoff_for(OSError(errno.EBADF, "")) is None


def _count(reason: str) -> float:
    return ACCEPT_ERRORS.labels(listener="TEST", reason=reason)._value.get()


def test_keeps_accepting_after_emfile_and_aborts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acceptor, "BACKOFF_SECONDS", 0.01)
    before = _count("EMFILE"), _count("ECONNABORTED")

    async def scenario() -> None:
        lsock = FlakyListener([errno.EMFILE, errno.ECONNABORTED, errno.EMFILE])
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsock.setblocking(False)
        accepted: list[socket.socket] = []
        task = asyncio.create_task(accept_forever(lsock, accepted.append, listener="TEST"))
        client = socket.create_connection(lsock.getsockname())
        for _ in range(200):
            if accepted:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(accepted) == 1 and accepted[0].getblocking() is False
        for s in (*accepted, client, lsock):
            s.close()

    asyncio.run(scenario())
    assert _count("EMFILE") - before[0] == 2
    assert _count("ECONNABORTED") - before[1] == 1


def test_a_broken_listener_ends_the_loop() -> None:
    async def scenario() -> None:
        lsock = FlakyListener([errno.EBADF])
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsock.setblocking(False)
        socket.create_connection(lsock.getsockname()).close()
        with pytest.raises(OSError) as caught:
            await asyncio.wait_for(accept_forever(lsock, lambda c: None, listener="TEST"), 5)
        assert caught.value.errno == errno.EBADF
        lsock.close()

    asyncio.run(scenario())


def test_drain_waits_for_relays_handed_over_during_the_wait_and_cuts_them_at_the_deadline() -> None:
    """A handler task that ends during the drain hands its connection to a relay (a future in
    the same set): the drain waits for that one too, and cancels what is left at the deadline."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        connections: set[asyncio.Future[None]] = set()
        finishing, lingering = loop.create_future(), loop.create_future()

        def track(conn: asyncio.Future[None]) -> None:
            connections.add(conn)
            conn.add_done_callback(connections.discard)

        async def handler(relay: asyncio.Future[None]) -> None:
            await asyncio.sleep(0.01)
            track(relay)  # the task ends, the connection goes on in its relay

        track(asyncio.create_task(handler(finishing)))
        track(asyncio.create_task(handler(lingering)))
        loop.call_later(0.05, finishing.set_result, None)
        assert await drain(connections, 0.3) == 1
        assert finishing.done() and not finishing.cancelled()
        assert lingering.cancelled()  # still open at the deadline: cut
        assert not connections

    asyncio.run(main())
