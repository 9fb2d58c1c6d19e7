"""The accept loops' per-connection task: a handler may hand its connection to a relay without
a task (``agent.app.ConnectionHandler``); the loop then tracks the relay's future for the drain
and leaves the socket to it, and closes the socket itself only when nothing was handed over."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace
from typing import Any

import pytest

from agent.app import Agent
from agent.base.constants import Listener
from agent.workers.worker import Worker


class Handler:
    def __init__(self, rest: asyncio.Future[None] | None) -> None:
        self.rest = rest

    async def handle(self, conn: socket.socket, listener: Listener) -> asyncio.Future[None] | None:
        return self.rest


async def _serve(kind: str, owner: Any, conn: socket.socket) -> None:
    if kind == "agent":
        await Agent._serve(owner, conn, Listener.OUTBOUND)
    else:
        await Worker._handle(owner, conn, Listener.OUTBOUND)


def _owner(kind: str, handler: Handler) -> Any:
    # Only what the per-connection task uses: its handler and the set the drain waits for.
    if kind == "agent":
        return SimpleNamespace(handler=handler, _connections=set())
    return SimpleNamespace(proxy=handler, _connections=set())


@pytest.mark.parametrize("kind", ["agent", "worker"])
def test_a_handed_over_connection_is_tracked_until_its_relay_ends(kind: str) -> None:
    async def main() -> None:
        rest: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        owner = _owner(kind, Handler(rest))
        conn, peer = socket.socketpair()
        try:
            await _serve(kind, owner, conn)
            assert owner._connections == {rest}
            assert conn.fileno() != -1  # the relay owns it now
            rest.set_result(None)
            await asyncio.sleep(0)
            assert not owner._connections
        finally:
            conn.close()
            peer.close()

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["agent", "worker"])
def test_a_connection_served_in_the_task_is_closed_by_it(kind: str) -> None:
    async def main() -> None:
        owner = _owner(kind, Handler(None))
        conn, peer = socket.socketpair()
        try:
            await _serve(kind, owner, conn)
            assert conn.fileno() == -1
            assert not owner._connections
        finally:
            peer.close()

    asyncio.run(main())
