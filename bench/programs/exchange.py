"""One connection and one small echo exchange, on the running event loop's raw sockets.

Shared by the connection-rate and idle-connection clients: an exchange that completes proves the
connection reached the echo server end to end (through every proxy on the path), which a bare
``connect()`` does not: a transparent proxy accepts before it has dialled upstream.
"""

from __future__ import annotations

import asyncio
import socket


async def connect_and_echo(
    address: tuple[str, int], message: bytes, source_ip: str | None = None
) -> socket.socket:
    """A connected socket (from ``source_ip`` if given) whose ``message`` has come back; the
    caller owns (closes) it.

    With ``source_ip`` the port is chosen by ``connect`` (``IP_BIND_ADDRESS_NO_PORT``), unique
    per (source, destination) pair and free to take over a TIME_WAIT pair on loopback
    (``tcp_tw_reuse``), as for a client that never binds. ``bind((source_ip, 0))`` alone
    searched the range for a port no socket on that address held, TIME_WAIT ones included: the
    in-process harness (``tests/integration/proxy/conncost.py``), which opens every connection
    from one address, slowed down past some 20,000 of them and then failed with EADDRINUSE."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_ip is not None:
            sock.setsockopt(socket.SOL_IP, socket.IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
        await loop.sock_connect(sock, address)
        await loop.sock_sendall(sock, message)
        got = 0
        while got < len(message):
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                raise ConnectionError("closed by the far end before the echo came back")
            got += len(chunk)
    except BaseException:
        sock.close()
        raise
    return sock
