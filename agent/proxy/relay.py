"""Bidirectional copying between a TCP socket and its peer (another socket or a tunnel stream).

Why socket methods instead of streams: ``loop.sock_recv`` and ``loop.sock_sendall`` copy each
byte once in Python; ``sock_sendall`` returns only when the kernel took everything, which
is the backpressure (a slow reader stops its writer's reads). ``sock_recv`` rather than
``sock_recv_into`` a buffer kept per direction: it waits for readability holding no buffer and
allocates the chunk only once bytes arrived (the kernel fills it, sized down to what came), so
an idle connection holds no read memory at all. A half-close (recv returns 0)
becomes ``shutdown(SHUT_WR)`` on the other side (END_STREAM through a tunnel), so
request/response protocols that signal "done" by closing their write side keep working.
An error in one direction aborts both, so neither side waits forever on a dead peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Coroutine
from typing import Any

from agent.proxy.tunnel import TunnelStream
from agent.telemetry.records import ConnectionRecord

MIN_CHUNK = 8 * 1024
MAX_CHUNK = 256 * 1024


class _ReadSize:
    """How much the next read asks for: starts small and doubles each time a read fills it, up
    to MAX_CHUNK.

    Why: a bulk flow fills every read, so it reaches the large size after a handful of reads
    and keeps large-chunk efficiency (few syscalls, few HBONE frames); a chatty connection
    keeps asking for MIN_CHUNK, so each of its reads allocates at most that much while it is
    in flight."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        self.size = MIN_CHUNK

    def grow_if_full(self, n: int) -> None:
        if n == self.size and self.size < MAX_CHUNK:
            self.size *= 2


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
    size = _ReadSize()
    while chunk := await loop.sock_recv(src, size.size):
        await loop.sock_sendall(dst, chunk)
        n = len(chunk)
        _count(record, field, n)
        size.grow_if_full(n)
    _shutdown_write(dst)


async def _both(here: Coroutine[Any, Any, None], there: Coroutine[Any, Any, None]) -> None:
    """Run both directions, ``here`` in the caller's task and ``there`` in a task of its own;
    the first failure cancels the other and is re-raised.

    Why not a task per direction: a connection keeps its relay for as long as it lives, mostly
    idle, and every task with its coroutine costs about 1.5 KiB per connection and agent.
    If ``there`` fails while ``here`` runs, the caller's task is cancelled to stop ``here``
    (a cancellation reaches the coroutine at its next step, so ``here`` is still running when it
    does), and that cancellation is taken back (``uncancel``) before ``there``'s error is
    raised, so the caller sees the error, not a cancellation. If the caller is cancelled
    (policy re-check, idle timeout, drain), ``there`` is cancelled and awaited before the
    sockets are closed."""
    current = asyncio.current_task()
    assert current is not None, "the relay runs in a task"
    task = asyncio.create_task(there)
    # [armed, interrupted]: while ``here`` runs, a failure of ``there`` interrupts it.
    state = [True, False]

    def there_done(done: asyncio.Task[None]) -> None:
        if state[0] and not done.cancelled() and done.exception() is not None:
            state[1] = True
            current.cancel()

    task.add_done_callback(there_done)
    try:
        await here
    except BaseException:
        state[0] = False
        if state[1]:
            current.uncancel()
            error = task.exception()
            assert error is not None
            raise error from None  # the cancellation was only the messenger
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    state[0] = False  # ``here`` ended: a failure of ``there`` comes from awaiting it
    await task


async def relay_sockets(
    client: socket.socket, upstream: socket.socket, record: ConnectionRecord
) -> None:
    """Copy client <-> upstream until both directions ended; closes neither socket."""
    await _both(
        _copy(client, upstream, record, "bytes_sent"),
        _copy(upstream, client, record, "bytes_received"),
    )


async def _socket_to_stream(
    sock: socket.socket, stream: TunnelStream, record: ConnectionRecord, field: str
) -> None:
    loop = asyncio.get_running_loop()
    size = _ReadSize()
    while chunk := await loop.sock_recv(sock, size.size):
        await stream.write(chunk)
        n = len(chunk)
        _count(record, field, n)
        size.grow_if_full(n)
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
            _stream_to_socket(stream, sock, record, from_stream),
            _socket_to_stream(sock, stream, record, to_stream),
        )
    finally:
        stream.proto.finish(stream)
