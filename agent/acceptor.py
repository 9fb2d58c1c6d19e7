"""Accepting captured connections, and surviving the errors ``accept`` can return.

Why its own module: ``accept`` fails for two kinds of reasons that must never stop a node's
proxy. Running out of descriptors or kernel memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) is
pressure, not a bug: the agent backs off briefly so the pending connections it already holds
can finish, logs the fix once per episode, and keeps accepting. A connection that died in the
queue (ECONNABORTED, and the network errors accept(2) says to treat "like EAGAIN") is simply
skipped. Every failure is counted by reason. Before this, one EMFILE under 10,000 idle
connections ended the accept task and so the whole agent.

``drain`` is the other end of what the accept loops start: waiting for the accepted
connections at shutdown, whether a handler task still serves them or a relay without a task.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Callable

from agent.base.accepted import accepting
from agent.base.metrics import counter

log = logging.getLogger(__name__)

ACCEPT_ERRORS = counter(
    "nodemesh_accept_errors_total",
    "accept() failures on a capture listener, by listener and errno name",
    ["listener", "reason"],
)

# Out of a resource: wait a little, then try again.
PRESSURE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The connection is gone, or a network error accept(2) says to retry at once.
SKIP = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPERM,  # a firewall refused it
    }
)
BACKOFF_SECONDS = 0.1
# Connections accepted per readiness of a listener (the reader fires again for the rest). One,
# as ``loop.sock_accept`` did: 64 at once left the idle-memory test's 90 simultaneous
# connections about 38 KB more held by the loop in all (tracemalloc), over its 6.25 KiB bound.
ACCEPT_BATCH = 1
LOG_EVERY_SECONDS = 30.0


def backoff_for(err: OSError) -> float | None:
    """Seconds to wait before the next accept, or ``None`` when the error is not survivable
    (the listener itself is broken: EBADF, EINVAL, ...)."""
    if err.errno in PRESSURE:
        return BACKOFF_SECONDS
    if err.errno in SKIP:
        return 0.0
    return None


async def accept_forever(
    sock: socket.socket, serve: Callable[[socket.socket], None], *, listener: str
) -> None:
    """Accept on ``sock`` and hand each connection (non-blocking) to ``serve``, for ever.

    One reader stays on the listener for the loop's life, and each readiness accepts up to
    ``ACCEPT_BATCH`` connections (the reader fires again for the rest). ``loop.sock_accept``
    instead added and removed the listener's reader around every connection (uvloop makes and
    closes a poll handle each time: ``ioctl`` and three ``epoll_ctl``) and made a future and
    a callback handle for it. Ends only by cancellation or by raising what broke the listener
    (or ``serve``). The sockets are ``AcceptedSocket``s: they keep the peer address ``accept``
    returned (``agent.base.accepted``), so no handler asks the kernel for it again."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    accept = accepting(sock)
    ended: asyncio.Future[None] = loop.create_future()
    last_logged = float("-inf")
    backoff: asyncio.TimerHandle | None = None

    def resume() -> None:
        nonlocal backoff
        backoff = None
        loop.add_reader(fd, readable)

    def failed(reason: BaseException) -> None:
        loop.remove_reader(fd)
        if not ended.done():
            ended.set_exception(reason)

    def readable() -> None:
        nonlocal last_logged, backoff
        for _ in range(ACCEPT_BATCH):
            try:
                conn = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                wait = backoff_for(e)
                if wait is None:
                    failed(e)
                    return
                reason = errno.errorcode.get(e.errno or 0, "unknown")
                ACCEPT_ERRORS.labels(listener=listener, reason=reason).inc()
                if not wait:
                    continue
                now = time.monotonic()
                if now - last_logged >= LOG_EVERY_SECONDS:
                    last_logged = now
                    log.warning(
                        "accept on the %s listener failed (%s): the agent is out of file "
                        "descriptors or kernel memory; it keeps serving and retries every "
                        "%.1fs. Raise its open-files limit (LimitNOFILE, ulimit -n) if this "
                        "persists",
                        listener.lower(),
                        e.strerror or reason,
                        wait,
                    )
                loop.remove_reader(fd)
                backoff = loop.call_later(wait, resume)
                return
            conn.setblocking(False)
            try:
                serve(conn)
            except BaseException as e:  # as if raised by the loop: the accept task ends
                failed(e)
                return

    loop.add_reader(fd, readable)
    try:
        await ended
    finally:
        if backoff is not None:
            backoff.cancel()
        loop.remove_reader(fd)


async def drain(connections: set[asyncio.Future[None]], seconds: float) -> int:
    """Wait up to ``seconds`` for the accepted ``connections`` (handler tasks, and the relays
    handlers handed their connections to) to end, then cancel the rest; returns how many were
    cancelled. The set may grow meanwhile (a handler task that ends hands over its relay), so
    it is waited for again until it is empty or the time is up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while connections and (left := deadline - loop.time()) > 0:
        await asyncio.wait(set(connections), timeout=left)
    pending = list(connections)
    for conn in pending:
        conn.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return len(pending)
