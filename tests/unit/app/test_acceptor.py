"""The accept loop survives descriptor exhaustion and aborted connections; a broken listener
still ends it; it keeps one reader on the listener instead of one per connection."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

import pytest

from agent import acceptor
from agent.acceptor import ACCEPT_ERRORS, accept_forever, backoff_for, drain
from agent.base.accepted import AcceptedSocket, peer_of


class FlakyListener(socket.socket):
    """A real listening socket whose first accepts fail with the given errnos."""

    def __init__(self, failures: list[int]) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.failures = failures

    def _accept(self) -> tuple[int, object]:  # what ``socket.accept`` and the loop call
        if self.failures:
            code = self.failures.pop(0)
            raise OSError(code, errno.errorcode[code])
        return super()._accept()  # type: ignore[misc]


def test_classification() -> None:
    assert backoff_for(OSError(errno.EMFILE, "")) == acceptor.BACKOFF_SECONDS
    assert backoff_for(OSError(errno.ECONNABORTED, "")) == 0.0
    assert backoff_for(OSError(errno.EBADF, "")) is None


async def _accept_one(lsock: socket.socket) -> tuple[list[socket.socket], socket.socket]:
    """Run the accept loop on ``lsock`` until one client connected (or 2 s passed), then stop
    it; returns what it accepted and the client's socket."""
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
    return accepted, client


def _count(reason: str) -> float:
    return ACCEPT_ERRORS.labels(listener="TEST", reason=reason).get()


def test_keeps_accepting_after_emfile_and_aborts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acceptor, "BACKOFF_SECONDS", 0.01)
    before = _count("EMFILE"), _count("ECONNABORTED")

    async def scenario() -> None:
        lsock = FlakyListener([errno.EMFILE, errno.ECONNABORTED, errno.EMFILE])
        lsock.bind(("127.0.0.1", 0))
        lsock.listen()
        lsock.setblocking(False)
        accepted, client = await _accept_one(lsock)
        assert len(accepted) == 1 and accepted[0].getblocking() is False
        for s in (*accepted, client, lsock):
            s.close()

    asyncio.run(scenario())
    assert _count("EMFILE") - before[0] == 2
    assert _count("ECONNABORTED") - before[1] == 1


def test_one_reader_on_the_listener_for_every_connection() -> None:
    """Connections arriving one at a time are accepted by the reader registered at the start:
    none is added or removed per connection (``loop.sock_accept`` did both, each time), and
    cancelling the loop removes it."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        calls: list[str] = []
        add, remove = loop.add_reader, loop.remove_reader

        def counting_add(fd: int, callback: Callable[..., object], *args: object) -> None:
            calls.append("add")
            add(fd, callback, *args)

        def counting_remove(fd: int) -> bool:
            calls.append("remove")
            return remove(fd)

        loop.add_reader = counting_add  # type: ignore[method-assign]
        loop.remove_reader = counting_remove  # type: ignore[method-assign]
        with socket.create_server(("127.0.0.1", 0)) as lsock:
            lsock.setblocking(False)
            accepted: list[socket.socket] = []
            task = asyncio.create_task(accept_forever(lsock, accepted.append, listener="TEST"))
            clients = []
            for n in range(1, 6):
                clients.append(socket.create_connection(lsock.getsockname()))
                for _ in range(200):
                    if len(accepted) == n:
                        break
                    await asyncio.sleep(0.01)
            assert len(accepted) == 5 and all(c.getblocking() is False for c in accepted)
            assert calls == ["add"]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert calls == ["add", "remove"]
            for s in (*accepted, *clients):
                s.close()

    asyncio.run(scenario())


def test_an_accepted_socket_keeps_its_peer_address_from_accept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The handlers learn the peer from what ``accept`` returned (``peer_of``), not from a
    ``getpeername`` per connection."""
    asked: list[socket.socket] = []
    monkeypatch.setattr(AcceptedSocket, "getpeername", lambda s: asked.append(s))

    async def scenario() -> None:
        with socket.create_server(("127.0.0.1", 0)) as lsock:
            lsock.setblocking(False)
            accepted, client = await _accept_one(lsock)
            (conn,) = accepted
            assert isinstance(conn, AcceptedSocket) and conn.getblocking() is False
            assert peer_of(conn) == client.getsockname()
            assert (conn.family, conn.type) == (socket.AF_INET, socket.SOCK_STREAM)
            for s in (conn, client):
                s.close()

    asyncio.run(scenario())
    assert asked == []


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
