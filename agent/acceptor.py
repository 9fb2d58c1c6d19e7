"""Accepting captured connections, and surviving the errors ``accept`` can return.

Why its own module: ``accept`` fails for two kinds of reasons that must never stop a node's
proxy. Running out of descriptors or kernel memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) is
pressure, not a bug: the agent backs off briefly so the pending connections it already holds
can finish, logs the fix once per episode, and keeps accepting. A connection that died in the
queue (ECONNABORTED, and the network errors accept(2) says to treat "like EAGAIN") is simply
skipped. Every failure is counted by reason. Before this, one EMFILE under 10,000 idle
connections ended the accept task and so the whole agent.

Before EMFILE can happen, the accept loops refuse: a connection past its source's limit or
the process's cap (``agent.base.conncaps``, a listener's ``Gate``) is reset the moment it is
accepted, before a task exists, and counted; its descriptor is free again at once. The cap
leaves a reserve of descriptors, so the agent's control plane (watches, CA calls, the metrics,
readiness and admin servers) never meets EMFILE because of captured traffic. The backoff above
stays for what the cap does not count (pooled HBONE connections, other processes'
descriptors under a system-wide ENFILE); an HBONE stream's pod socket is charged by the node
proxy before its connect (``ConnectionCaps.take_stream``). Without the cap, at EMFILE the capture
listeners' pending connections waited in the kernel's queue while the loop retried every 0.1 s,
and uvloop's own servers (metrics, readiness, admin) accepted and closed every connection at
once (libuv's reserve-descriptor trick), so the agent stopped answering its probes.

``serve_accepted`` is what each accepted connection's task runs (in the agent and in each
worker); ``drain`` is the other end of what the accept loops start: waiting for the accepted
connections at shutdown, whether a handler task still serves them or a relay without a task.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from functools import partial

from agent.base.accepted import abort, accepting, peer_of
from agent.base.conncaps import Gate
from agent.base.constants import Listener
from agent.base.metrics import counter
from agent.base.quiet import quiet_context

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
    sock: socket.socket,
    serve: Callable[[socket.socket], None],
    *,
    listener: str,
    gate: Gate | None = None,
) -> None:
    """Accept on ``sock`` and hand each connection (non-blocking) to ``serve``, for ever.

    One reader stays on the listener for the loop's life, and each readiness accepts up to
    ``ACCEPT_BATCH`` connections (the reader fires again for the rest). ``loop.sock_accept``
    instead added and removed the listener's reader around every connection (uvloop makes and
    closes a poll handle each time: ``ioctl`` and three ``epoll_ctl``) and made a future and
    a callback handle for it. Ends only by cancellation or by raising what broke the listener
    (or ``serve``). The sockets are ``AcceptedSocket``s: they keep the peer address ``accept``
    returned (``agent.base.accepted``), so no handler asks the kernel for it again. ``gate``:
    a connection it does not admit is reset at once and never reaches ``serve``; one it admits
    holds its slot until ``gate.release`` (``serve_accepted`` does it)."""
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
            if gate is not None and not gate.admit(conn.peer[0]):
                abort(conn)  # the client sees a reset at once; the descriptor is free
                continue
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


Handle = Callable[[socket.socket, Listener], Awaitable["asyncio.Future[None] | None"]]


async def serve_accepted(
    handle: Handle,
    conn: socket.socket,
    slot: Listener,
    connections: set[asyncio.Future[None]],
    gate: Gate | None = None,
) -> None:
    """Serve one accepted connection with ``handle`` (``agent.app.ConnectionHandler``): close
    it when the handler returns nothing; else track the future it returned (a relay without a
    task, which owns ``conn`` from then on) in ``connections`` until it ends, for the drain.
    ``gate``: the slot ``accept_forever`` took is released when the connection ended, whichever
    way."""
    source = peer_of(conn)[0] if gate is not None else ""
    rest = None
    try:
        rest = await handle(conn, slot)
    except Exception:
        log.exception("handler failed on a %s connection", slot.name.lower())
    finally:
        if rest is None:
            conn.close()
            if gate is not None:
                gate.release(source)
    if rest is not None:  # the drain waits for (and at its deadline cancels) it instead
        connections.add(rest)
        # Not in a copy of this task's context: it would live as long as the connection. One
        # callback for both ends of the bookkeeping (each is scheduled as a handle of its own).
        ended = connections.discard if gate is None else partial(_ended, connections, gate, source)
        rest.add_done_callback(ended, context=quiet_context())


def _ended(
    connections: set[asyncio.Future[None]], gate: Gate, source: str, done: asyncio.Future[None]
) -> None:
    connections.discard(done)
    gate.release(source)


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
