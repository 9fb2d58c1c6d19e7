"""An accepted connection's socket that keeps the peer address ``accept`` returned.

Why: every captured connection needs its peer's address (the client of an outbound or
plaintext connection, the peer node of an HBONE one); ``accept`` returns it, and asking the
kernel again with ``getpeername`` was one more system call per connection (about 0.6 µs).
``peer_of`` answers from an ``AcceptedSocket`` and asks the kernel for any other socket (a
test's, one from ``socketpair``).

What that changes: ``getpeername`` failed (ENOTCONN) for a client that reset its connection
while it waited in the listener's queue, and the handlers closed such a socket at once. Now
that client is found by the first read or write instead (a reset, counted as the connection's
failure), as one that resets a moment after it was accepted always was.

One is made by ``accepting(listener)()``: ``socket.accept`` with the listener's family, type and
protocol looked up once per listener (``socket.accept`` makes enums of them on every call).
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Any

Address = Any  # what accept(2) returned: (ip, port) for IPv4, a 4-tuple for IPv6


class AcceptedSocket(socket.socket):
    """A ``socket.socket`` with ``peer``: the address ``accept`` returned for it."""

    __slots__ = ("peer",)

    peer: Address


def accepting(listener: socket.socket) -> Callable[[], AcceptedSocket]:
    """A function that accepts one connection on ``listener``, raising what ``accept``
    raises (its ``_accept``, so that a listener's own override of it is used)."""
    family, kind, proto = int(listener.family), int(listener.type), listener.proto
    accept_fd: Callable[[], tuple[int, Address]] = listener._accept  # type: ignore[attr-defined]

    def accept() -> AcceptedSocket:
        fd, peer = accept_fd()
        conn = AcceptedSocket(family, kind, proto, fileno=fd)
        conn.peer = peer
        return conn

    return accept


def peer_of(sock: socket.socket) -> Address:
    """The peer's address: from ``accept`` when ``sock`` is an ``AcceptedSocket``."""
    if type(sock) is AcceptedSocket:
        return sock.peer
    return sock.getpeername()


_LINGER_0 = struct.pack("ii", 1, 0)


def abort(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0) so the peer learns the connection failed, not finished,
    and the descriptor is free at once (the proxy's relays, and the accept loops' refusals)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
    sock.close()
