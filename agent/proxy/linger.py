"""A lingering close: after the proxy answered an error and is closing the client's connection,
read and discard what the client still sends, for a bounded time and amount, then close.

Why: a client that sent more than the proxy read (curl's HTTP/2 SETTINGS and HEADERS behind
the preface on a port declared HTTP/1.1, a request body behind a refused head) has bytes
unread in the socket when the proxy closes it, and the kernel answers a close with unread
data by a reset, which can overtake the answer still in flight: the client sees ``Broken
pipe`` or ``Connection reset`` instead of the 400 that explains it. Shutting down writing
first (the answer is followed by FIN) and reading until the client closes, up to
``LINGER_SECONDS`` and ``LINGER_BYTES`` (nginx's ``lingering_close``, 1 s here as its
``lingering_timeout``'s order), lets the answer arrive; past either bound the connection is
closed anyway, so a client that keeps sending holds nothing long.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable

LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024


class Lingering:
    """How much may still be discarded (sans-IO: the shell reads, this counts)."""

    __slots__ = ("left",)

    def __init__(self, limit: int = LINGER_BYTES) -> None:
        self.left = limit

    def discarded(self, data: bytes | None) -> bool:
        """Count a read; True while lingering goes on (the client has not closed, and the
        bytes it sent are within the bound)."""
        if not data:
            return False
        self.left -= len(data)
        return self.left > 0


async def linger(
    read: Callable[[], Awaitable[bytes | None]],
    *,
    seconds: float | None = None,
    limit: int | None = None,
) -> int:
    """Discard what ``read`` returns (``None`` or ``b""``: the client closed) until the client
    closes, ``limit`` bytes came or ``seconds`` passed; the bytes discarded. Read errors
    end it (the client is gone)."""
    seconds = LINGER_SECONDS if seconds is None else seconds  # read now: tests change them
    limit = LINGER_BYTES if limit is None else limit
    count = Lingering(limit)
    with contextlib.suppress(TimeoutError, OSError):
        async with asyncio.timeout(seconds):
            while count.discarded(await read()):
                pass
    return limit - count.left


async def linger_socket(
    sock: socket.socket, *, seconds: float | None = None, limit: int | None = None
) -> int:
    """``linger`` on a non-blocking socket whose answer was written: shut down writing, then
    discard its input (the caller closes it)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    loop = asyncio.get_running_loop()
    return await linger(lambda: loop.sock_recv(sock, 16384), seconds=seconds, limit=limit)
