"""Reading a test's own socket until it has what the test expects, with a deadline per read:
what the relay tests (``test_relay``, ``test_relay_splice``) share."""

from __future__ import annotations

import asyncio
import socket


async def recv_exactly(sock: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    """``n`` bytes from ``sock``; fails on an EOF before them or a read over ``timeout``."""
    loop = asyncio.get_running_loop()
    out = bytearray()
    while len(out) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(out)), timeout)
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


async def recv_to_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything ``sock`` receives until its peer's EOF."""
    loop = asyncio.get_running_loop()
    out = bytearray()
    while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), timeout):
        out += chunk
    return bytes(out)
