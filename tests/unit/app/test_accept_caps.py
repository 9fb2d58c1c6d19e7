"""The accept loop admits through a listener's ``Gate`` (``agent.base.conncaps``): a connection
past its source's limit or the process's cap is reset at once, never reaches the handler, and
is counted; a served connection gives its slot back when it ends, in the handler's task or in
the relay it was handed to (``serve_accepted``)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from agent.acceptor import accept_forever, serve_accepted
from agent.base.conncaps import GLOBAL_LIMIT, POD_LIMIT, ConnectionCaps, Gate, SourceLimit
from agent.base.constants import Listener


def _caps(total: int, per_pod: int) -> ConnectionCaps:
    return ConnectionCaps(total, {Listener.OUTBOUND: SourceLimit(per_pod, POD_LIMIT, "pod")})


async def _until(check: object, what: str) -> None:
    for _ in range(300):
        if check():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not {what} within 3 s")


def _reset(client: socket.socket) -> bool:
    client.settimeout(5)
    try:
        client.recv(1)
    except ConnectionResetError:
        return True
    return False


@pytest.mark.parametrize(
    ("total", "per_pod", "reason"), [(10, 2, POD_LIMIT), (2, 10, GLOBAL_LIMIT)]
)
def test_a_connection_past_a_limit_is_reset_before_the_handler_and_counted(
    total: int, per_pod: int, reason: str
) -> None:
    async def scenario() -> None:
        caps = _caps(total, per_pod)
        gate = caps.gate(Listener.OUTBOUND)
        with socket.create_server(("127.0.0.1", 0)) as lsock:
            lsock.setblocking(False)
            served: list[socket.socket] = []
            task = asyncio.create_task(
                accept_forever(lsock, served.append, listener="OUTBOUND", gate=gate)
            )
            clients = [socket.create_connection(lsock.getsockname()) for _ in range(2)]
            await _until(lambda: len(served) == 2, "served")
            extra = socket.create_connection(lsock.getsockname())
            await _until(lambda: caps.rejections[reason] == 1, "refused")
            assert await asyncio.to_thread(_reset, extra)
            assert len(served) == 2 and caps.held == 2
            gate.release("127.0.0.1")  # one of them ended: the next one is served
            clients.append(socket.create_connection(lsock.getsockname()))
            await _until(lambda: len(served) == 3, "served after a release")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for s in (*served, *clients, extra):
                s.close()

    asyncio.run(scenario())


class Handler:
    def __init__(self, rest: asyncio.Future[None] | None) -> None:
        self.rest = rest

    async def handle(self, conn: socket.socket, listener: Listener) -> asyncio.Future[None] | None:
        return self.rest


async def _served(gate: Gate, rest: asyncio.Future[None] | None) -> set[asyncio.Future[None]]:
    """``serve_accepted`` on a connection that took its slot from 127.0.0.1."""
    assert gate.admit("127.0.0.1")
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        client = socket.create_connection(lsock.getsockname())
        conn, _ = lsock.accept()
        connections: set[asyncio.Future[None]] = set()
        await serve_accepted(Handler(rest).handle, conn, Listener.OUTBOUND, connections, gate)
        client.close()
        if rest is None:
            assert conn.fileno() == -1
        return connections


def test_a_connection_served_in_its_task_gives_its_slot_back_when_the_task_ends() -> None:
    async def scenario() -> None:
        caps = _caps(10, 1)
        gate = caps.gate(Listener.OUTBOUND)
        assert not await _served(gate, None)
        assert caps.held == 0 and not gate.held

    asyncio.run(scenario())


def test_a_connection_handed_to_a_relay_gives_its_slot_back_when_the_relay_ends() -> None:
    async def scenario() -> None:
        caps = _caps(10, 1)
        gate = caps.gate(Listener.OUTBOUND)
        rest: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        assert await _served(gate, rest) == {rest}
        assert caps.held == 1 and dict(gate.held) == {"127.0.0.1": 1}
        rest.cancel()  # the drain's deadline, or a relay that failed: released all the same
        await asyncio.sleep(0)
        assert caps.held == 0 and not gate.held

    asyncio.run(scenario())
