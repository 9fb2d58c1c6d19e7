"""The agent's handler without a CA: plain passthrough to the original destination over the
proxy's relay (half-close carried, an unreachable destination closes the client).

Root is needed for SO_MARK on the upstream socket; only 127.0.0.1 is used."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from agent.base.constants import Listener
from agent.proxy.passthrough import Passthrough
from agent.proxy.sockets import UNSENT_LOWAT

pytestmark = pytest.mark.root


async def _echo_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    data = await reader.read()  # everything up to the client's half-close
    writer.write(b"echo:" + data)
    await writer.drain()
    writer.close()


async def _through_passthrough(
    dst: tuple[str, int], payload: bytes, options: list[tuple[int, int]] | None = None
) -> bytes:
    """Connect a client to a local listener, serve the accepted socket with ``Passthrough``
    towards ``dst`` and close it afterwards (as the agent does), send ``payload``, half-close,
    and return what comes back. ``options`` gets the accepted socket's TCP_NODELAY and
    TCP_NOTSENT_LOWAT as the handler left them."""
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.setblocking(False)
    # From another address than the destination's: one connection from an address to itself
    # is what the passthrough refuses (the last test).
    reader, writer = await asyncio.open_connection(
        *lsock.getsockname(), local_addr=("127.0.0.2", 0)
    )
    conn, _ = await loop.sock_accept(lsock)
    conn.setblocking(False)

    async def serve() -> None:
        try:
            await Passthrough().handle(conn, Listener.OUTBOUND, original_dst=dst)
        finally:
            if options is not None:
                options.append(
                    (
                        conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                        conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT),
                    )
                )
            conn.close()

    serving = asyncio.create_task(serve())
    writer.write(payload)
    writer.write_eof()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        await asyncio.wait_for(serving, 10)
        writer.close()
        lsock.close()


def test_bytes_and_half_close_reach_the_original_destination() -> None:
    if os.geteuid() != 0:
        pytest.skip("SO_MARK needs root")

    async def main() -> bytes:
        server = await asyncio.start_server(_echo_until_eof, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await _through_passthrough(("127.0.0.1", port), b"hello" * 1000)

    assert asyncio.run(main()) == b"echo:" + b"hello" * 1000


def test_an_unreachable_destination_ends_the_client_connection() -> None:
    if os.geteuid() != 0:
        pytest.skip("SO_MARK needs root")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    assert asyncio.run(_through_passthrough(("127.0.0.1", closed_port), b"")) == b""


def test_the_client_socket_sends_without_nagle_and_bounds_what_it_holds_unsent() -> None:
    """A 1 KB answer must not wait for the client's ACK of the previous segment (Nagle with
    delayed ACK adds up to 40 ms to a request/response exchange); a client that stops reading
    leaves at most ``UNSENT_LOWAT`` unsent in the socket (``sockets.limit_unsent``)."""
    if os.geteuid() != 0:
        pytest.skip("SO_MARK needs root")
    seen: list[tuple[int, int]] = []

    async def main() -> bytes:
        server = await asyncio.start_server(_echo_until_eof, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await _through_passthrough(("127.0.0.1", port), b"x", seen)

    assert asyncio.run(main()) == b"echo:x"
    assert seen == [(1, UNSENT_LOWAT)]


def test_a_connection_to_the_listener_itself_is_refused_and_does_not_loop() -> None:
    """A client that dials the node's own address on a listener's port (NODE_IP:15008 when
    the agent runs without a CA): the passthrough's connection to that address lands on the
    listener again, from that address to itself (``resolve.looped``), and is refused there;
    before, each one dialled the next until the node ran out of connections."""
    if os.geteuid() != 0:
        pytest.skip("SO_MARK needs root")
    served: list[int] = []

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(64)
        lsock.setblocking(False)
        tasks: list[asyncio.Task[None]] = []

        async def serve(conn: socket.socket) -> None:
            try:
                await Passthrough().handle(conn, Listener.HBONE)
            finally:
                conn.close()

        async def accept() -> None:
            while len(served) < 20:  # on the old code the chain grows until this bound
                conn, _ = await loop.sock_accept(lsock)
                conn.setblocking(False)
                served.append(1)
                tasks.append(asyncio.create_task(serve(conn)))

        acceptor = asyncio.create_task(accept())
        try:
            reader, writer = await asyncio.open_connection(*lsock.getsockname())
            writer.write(b"x")
            try:
                return await asyncio.wait_for(reader.read(), 5)
            finally:
                writer.close()
        finally:
            for task in (acceptor, *tasks):
                task.cancel()
            await asyncio.gather(acceptor, *tasks, return_exceptions=True)
            lsock.close()

    assert asyncio.run(main()) == b""
    assert len(served) == 1
