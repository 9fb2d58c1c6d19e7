"""The process's one pipe for relaying bytes socket -> socket with splice(2), without copying
them through user space.

Why a pipe: splice(2) moves data only between a pipe and a file. ``tcp_splice_read`` puts page
references of a TCP socket's received buffers into a pipe; splicing the pipe into a TCP socket
(``MSG_SPLICE_PAGES`` since Linux 6.5, ``sendpage`` before) attaches those pages to the segments
it sends. The bytes are never copied, where ``recv_into`` + ``send`` copy each byte twice.

Why one pipe for the whole process, as ``relay._SHARED`` is one buffer: the relay uses it only
inside one callback (splice in, splice out, and what the destination did not take is read back
out into the direction's ``pending``), so the pipe is empty again whenever the event loop runs
anything else. No connection holds a pipe or its two descriptors, and an idle connection costs
what it cost before. The invariant matters beyond memory: bytes left in the pipe would be
delivered to the next connection that uses it, so an error between the two splices ``reset``s
the pipe (closes it; the next use opens a new one) rather than trusting it to be empty.

What may use it (``spliceable``): plain non-blocking TCP sockets. Not a TLS socket (the bytes
on its descriptor are records, not the stream), not a blocking one (``tcp_splice_read`` would
wait to fill the whole count), and not a socket in the ``--splice`` sockmap: bytes its verdict
keeps (``SK_PASS``) wait in the psock's queue, which ``recvmsg`` reads and ``tcp_splice_read``
does not see. ``agent.proxy.splice`` forwards those with its own watchers and gives
``relay.start_sockets`` only sockets the kernel refused to splice (then nothing was inserted).

Where the kernel or Python lacks it (no ``os.splice``, a pipe that cannot be made or sized),
relays copy as before and the log says so once; ``probe`` is ``nodemesh check``'s row.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import ssl
from collections.abc import Callable

log = logging.getLogger(__name__)

# ``os.splice``: Python >= 3.10 on Linux; None elsewhere, and then nothing is spliced.
splice: Callable[..., int] | None = getattr(os, "splice", None)
FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

# What a splice answers for a descriptor it cannot serve (not an error of the connection).
UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})

_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


class Pipe:
    """A non-blocking pipe of ``size`` bytes (``r``: read end, ``w``: write end)."""

    __slots__ = ("r", "w")

    def __init__(self, size: int) -> None:
        if splice is None:
            raise OSError(errno.ENOSYS, "os.splice needs Python >= 3.10 on Linux")
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size)
        except OSError:
            self.close()
            raise

    def take(self, n: int) -> bytes:
        """Read the ``n`` bytes the pipe holds into user space (a destination took less than
        was spliced in). A pipe read returns everything it holds up to ``n``; anything else
        means the pipe's content is unknown, so it is dropped (``OSError``)."""
        data = os.read(self.r, n)
        if len(data) != n:
            reset()
            raise OSError(errno.EIO, f"the splice pipe held {len(data)} bytes, not {n}")
        return data

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


_pipe: Pipe | None = None
_refused: str | None = None  # why this process relays without splice, once logged


def get(size: int) -> Pipe | None:
    """The process's pipe, made on first use; None when splice is unavailable here."""
    global _pipe
    if _refused is not None:
        return None
    if _pipe is not None:
        return _pipe
    try:
        _pipe = Pipe(size)
    except OSError as e:
        refuse(f"a pipe for splice(2) could not be made: {e}")
        return None
    return _pipe


def refuse(reason: str) -> None:
    """Stop splicing in this process and say why, once. The pipe stays open: the callback
    that refused may still have to read its bytes out of it."""
    global _refused
    if _refused is None:
        _refused = reason
        log.warning("%s; relays copy bytes through user space", reason)


def refused() -> str | None:
    return _refused


def reset() -> None:
    """Drop the pipe (its content is not to be delivered); the next ``get`` makes a new one."""
    global _pipe
    pipe, _pipe = _pipe, None
    if pipe is not None:
        pipe.close()


def forget() -> None:
    """Back to the state of a fresh process: no pipe, nothing refused. A forked child runs it
    (the parent's pipe must never carry two processes' bytes); tests run it between cases."""
    global _refused
    reset()
    _refused = None


os.register_at_fork(after_in_child=forget)


def spliceable(sock: socket.socket) -> bool:
    """May the relay splice from or to ``sock``? A plain, non-blocking TCP socket."""
    return (
        sock.family in _TCP_FAMILIES
        and sock.type == socket.SOCK_STREAM
        and sock.proto in (0, socket.IPPROTO_TCP)
        and sock.gettimeout() == 0.0
        and not isinstance(sock, ssl.SSLSocket)
    )


def probe() -> str:
    """``nodemesh check``: splice one message TCP -> pipe -> TCP over loopback, as the relay
    does. Never raises: without it the relay copies."""
    try:
        pipe = Pipe(64 * 1024)
    except OSError as e:
        return f"unavailable (optional; {e}): relays copy through user space"
    try:
        with (
            socket.create_server(("127.0.0.1", 0)) as server,
            socket.create_connection(server.getsockname()) as a,
            server.accept()[0] as b,
            socket.create_connection(server.getsockname()) as c,
            server.accept()[0] as d,
        ):
            a.sendall(b"nodemesh")
            assert splice is not None  # Pipe() raised otherwise
            n = splice(b.fileno(), pipe.w, 8)
            sent = splice(pipe.r, c.fileno(), n)
            if d.recv(8) != b"nodemesh" or sent != 8:
                return "unavailable (optional; splice moved the wrong bytes): relays copy"
    except OSError as e:
        return f"unavailable (optional; {e}): relays copy through user space"
    finally:
        pipe.close()
    return "available: relays splice bulk socket-to-socket bytes without copying them"
