"""Bidirectional copying between a TCP socket and its peer (another socket or a tunnel stream).

Why socket methods instead of streams: ``loop.sock_recv_into`` into one buffer per direction and
``loop.sock_sendall`` of a memoryview slice copy each byte once in Python and allocate nothing
per chunk; ``sock_sendall`` returns only when the kernel took everything, which
is the backpressure (a slow reader stops its writer's reads). A half-close (recv returns 0)
becomes ``shutdown(SHUT_WR)`` on the other side (END_STREAM through a tunnel), so
request/response protocols that signal "done" by closing their write side keep working.
An error in one direction aborts both, so neither side waits forever on a dead peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

from agent.proxy.tunnel import TunnelStream
from agent.telemetry.records import ConnectionRecord

MIN_CHUNK = 8 * 1024
MAX_CHUNK = 256 * 1024


class _ReadBuffer:
    """A read buffer that starts small and doubles each time a read fills it, up to MAX_CHUNK.

    Why: a connection holds its read buffers for as long as it lives, idle or not. With a fixed
    256 KiB per direction, an idle proxied connection cost over half a megabyte (the bench
    measured 534 KiB per idle connection). A bulk flow fills every read, so it reaches the large
    size after a handful of reads and keeps large-chunk efficiency; an idle or chatty
    connection stays at 8 KiB per direction. A buffer is only replaced between reads, after
    the previous chunk was fully sent, so no slice in use is ever invalidated."""

    __slots__ = ("buf", "view")

    def __init__(self) -> None:
        self.buf = bytearray(MIN_CHUNK)
        self.view = memoryview(self.buf)

    def chunk(self, n: int) -> memoryview:
        """The ``n`` bytes just read."""
        return self.view[:n]

    def grow_if_full(self, n: int) -> None:
        size = len(self.buf)
        if n == size and size < MAX_CHUNK:
            self.buf = bytearray(size * 2)
            self.view = memoryview(self.buf)


def _count(record: ConnectionRecord, field: str, n: int) -> None:
    """Add ``n`` bytes; the first upstream byte's time is traffic control's latency sample."""
    if field == "bytes_received" and not record.bytes_received:
        record.first_byte = time.monotonic()
    setattr(record, field, getattr(record, field) + n)


def _shutdown_write(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


async def _copy(
    src: socket.socket, dst: socket.socket, record: ConnectionRecord, field: str
) -> None:
    loop = asyncio.get_running_loop()
    buf = _ReadBuffer()
    while n := await loop.sock_recv_into(src, buf.buf):
        await loop.sock_sendall(dst, buf.chunk(n))
        _count(record, field, n)
        buf.grow_if_full(n)
    _shutdown_write(dst)


async def _both(first: asyncio.Task[None], second: asyncio.Task[None]) -> None:
    """Wait for both directions; the first failure cancels the other and is re-raised.

    If the caller is cancelled (policy re-check, idle timeout, drain), both directions are
    cancelled and awaited before the sockets are closed: ``asyncio.wait`` alone would leave them
    running on file descriptors that are about to be closed."""
    try:
        done, pending = await asyncio.wait((first, second), return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        for task in (first, second):
            task.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        raise
    for task in pending:
        task.cancel()
    # The cancelled direction may fail on its own while it stops (its pod reset too): that is
    # gathered here, so the failure re-raised below is the first one and no task's exception
    # goes unretrieved (asyncio would log it as "never retrieved").
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()


async def relay_sockets(
    client: socket.socket, upstream: socket.socket, record: ConnectionRecord
) -> None:
    """Copy client <-> upstream until both directions ended; closes neither socket."""
    await _both(
        asyncio.create_task(_copy(client, upstream, record, "bytes_sent")),
        asyncio.create_task(_copy(upstream, client, record, "bytes_received")),
    )


async def _socket_to_stream(
    sock: socket.socket, stream: TunnelStream, record: ConnectionRecord, field: str
) -> None:
    loop = asyncio.get_running_loop()
    buf = _ReadBuffer()
    while n := await loop.sock_recv_into(sock, buf.buf):
        await stream.write(buf.chunk(n))
        _count(record, field, n)
        buf.grow_if_full(n)
    stream.write_eof()


async def _stream_to_socket(
    stream: TunnelStream, sock: socket.socket, record: ConnectionRecord, field: str
) -> None:
    loop = asyncio.get_running_loop()
    stream.deliver_directly(sock, lambda n: _count(record, field, n))
    try:
        while (chunk := await stream.read()) is not None:
            await loop.sock_sendall(sock, chunk)
            stream.consumed(len(chunk))
            _count(record, field, len(chunk))
    finally:
        stream.deliver_directly(None)
    _shutdown_write(sock)


async def relay_tunnel(
    sock: socket.socket, stream: TunnelStream, record: ConnectionRecord, *, outbound: bool
) -> None:
    """Copy sock <-> stream; ``outbound``: sock is the client (bytes to the stream are "sent")."""
    to_stream, from_stream = (
        ("bytes_sent", "bytes_received") if outbound else ("bytes_received", "bytes_sent")
    )
    try:
        await _both(
            asyncio.create_task(_socket_to_stream(sock, stream, record, to_stream)),
            asyncio.create_task(_stream_to_socket(stream, sock, record, from_stream)),
        )
    finally:
        stream.proto.finish(stream)
