"""Relaying a same-node connection with the kernel moving the bytes (the same-node splice).

For a same-node connection that policy admitted and that needs nothing done per byte, the
datapath can redirect each segment arriving on one of the proxy's two sockets to the other's
send side (ARCHITECTURE.md, "Same-node splice"). The proxy keeps owning both sockets: closing
them (policy re-check, drain, an error) ends the splice, and the registry, the access log and
metrics see the connection as before, with byte counts read from the kernel at scrape and at
close (``ConnectionRecord.sync``).

What stays in user space, per direction:

- *Credit.* The kernel queues redirected bytes for the peer without a limit, so the proxy grants
  each direction a limit ``WINDOW`` bytes ahead of what the peer's TCP took, raised by a refresher
  every few milliseconds while bytes move. Past it, the kernel keeps the bytes on their socket
  (where TCP's receive window holds the sender back) and the watcher forwards them, after the
  bytes the kernel redirected before them. The kernel keeps every later byte too until the proxy
  has forwarded all kept ones (it tells the kernel how many with each grant), so the order never
  changes; a direction returns to the kernel at the first pause in its sender's stream.
- *End of stream.* The kernel forwards data but not a FIN (it drops the empty skb that marks it).
  The watcher sees EOF on its source, waits until the peer's socket took every byte sent its
  way (the redirect goes through a kernel worker, so bytes can still be on their way), and only
  then shuts the peer's write side. "Took" is ``tcpi_bytes_acked`` plus the send queue
  (``SIOCOUTQ``), counted from a baseline read before the splice started.

How it fits the task-free relay (``agent.proxy.relay``): ``start_spliced`` is called where
``start_sockets`` would be and returns a future the same way, whose end tells the same ``Owner``
(registry, sockets), and which the registry cancels on a policy re-check or a drain. The
spliced connection keeps one task (both watchers and the refresher run in it): unlike the
user-space relay it has work that waits on time (the refresher, waiting for the peer to take
bytes before a half-close), and it exists only for same-node connections, whose bytes cost no
user-space copies.

The proxy reaches the kernel only through the ``Splicer`` interface handed in by the app: the
proxy does not import the datapath. In a worker process (``--workers N``) the interface is built
on the map descriptors the main process passed down (``agent.workers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import logging
import os
import socket
import struct
import termios
from typing import Protocol

from agent.base.metrics import counter
from agent.proxy.relay import MAX_CHUNK, Owner, start_sockets
from agent.telemetry.records import ConnectionRecord

log = logging.getLogger(__name__)

# Bytes the kernel may have queued for a peer beyond what the peer's TCP took. With the
# refresher's period, it bounds a direction at WINDOW / REFRESH_FAST bytes/s before the proxy
# has to forward some bytes itself (4 GB/s), and bounds the kernel memory a slow receiver pins.
WINDOW = 16 * 1024 * 1024
REFRESH_FAST = 0.004
REFRESH_IDLE = 1.0

# What the program's retransmission trim saved from being delivered twice (a TCP segment that
# overlaps bytes already passed on reaches the verdict whole: ARCHITECTURE, "Same-node splice").
# Counted when a spliced connection ends; rare, so a growing count is worth a look at the node.
TRIMMED = counter(
    "nodemesh_splice_trimmed_bytes_total",
    "Bytes of retransmitted TCP segments that overlapped bytes already passed on, which the "
    "same-node splice cut off instead of delivering them twice (--splice)",
)

_TCP_INFO_LEN = 232
_OFF_BYTES_ACKED = 120  # struct tcp_info.tcpi_bytes_acked (u64), Linux >= 4.1
# Polling the peer while a FIN waits for bytes still on their way: short first, then backing off.
_DRAIN_FIRST_WAIT = 0.0005
_DRAIN_MAX_WAIT = 0.05


class Splicing(Protocol):
    """One spliced pair of sockets (a = client side, b = upstream). ``index`` 0 is a -> b,
    1 is b -> a."""

    def moved(self) -> tuple[int, int]:
        """Bytes the kernel redirected so far, each way."""
        ...

    def kept(self, index: int) -> int:
        """Bytes the kernel left on the source socket for the proxy to forward."""
        ...

    def trimmed(self) -> int:
        """Bytes of retransmitted segments that overlapped bytes already passed on, which the
        kernel's program cut off (both ways; ``splice.bpf.c``, ``nm_splice_trim``)."""
        ...

    def grant(self, index: int, limit: int, taken: int) -> None:
        """Let the kernel redirect while ``moved()[index]`` stays within ``limit``, once the
        proxy forwarded ``taken`` of the kept bytes (all of them)."""
        ...

    def stop(self) -> tuple[int, int]:
        """Take the sockets out of the kernel's path; the final ``moved()``. Idempotent."""
        ...


class Splicer(Protocol):
    def start(self, a: socket.socket, b: socket.socket, window: int) -> Splicing:
        """Start moving bytes between ``a`` and ``b`` (``window``: the first limit each way);
        raises ``OSError`` when the kernel refuses (then nothing changed)."""
        ...


def written(sock: socket.socket) -> int:
    """Bytes ``sock``'s TCP took for sending: acknowledged ones plus the send queue. The
    handshake counts too (the SYN is acknowledged), so callers compare against a baseline."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    acked: int = struct.unpack_from("=Q", raw, _OFF_BYTES_ACKED)[0]
    queued: int = struct.unpack("=i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return acked + queued


class _Direction:
    """One way of a spliced connection: src -> dst, ``index`` in the ``Splicing``."""

    def __init__(self, src: socket.socket, dst: socket.socket, index: int) -> None:
        self.src, self.dst = src, dst
        self.index = index
        self.baseline = written(dst)  # read before the splice starts
        self.splicing: Splicing | None = None
        self.by_proxy = 0  # kept bytes the watcher forwarded

    @property
    def _splicing(self) -> Splicing:
        assert self.splicing is not None, "relay_spliced sets it before the watchers start"
        return self.splicing

    def total(self) -> int:
        return self._splicing.moved()[self.index] + self.by_proxy

    def grant(self) -> None:
        took = written(self.dst) - self.baseline
        self._splicing.grant(self.index, took - self.by_proxy + WINDOW, self.by_proxy)

    async def _delivered(self) -> None:
        """Wait until ``dst`` took every byte sent its way so far."""
        wait = _DRAIN_FIRST_WAIT
        while written(self.dst) - self.baseline < self.total():
            # A peer that failed will never take them: the kernel reports its error there.
            if err := self.dst.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                raise OSError(err, f"spliced peer failed: {os.strerror(err)}")
            await asyncio.sleep(wait)
            wait = min(wait * 2, _DRAIN_MAX_WAIT)

    async def _forward(self, data: bytes) -> None:
        """Send kept bytes after everything the kernel redirected before them."""
        await self._delivered()
        await asyncio.get_running_loop().sock_sendall(self.dst, data)
        self.by_proxy += len(data)

    async def watch(self) -> None:
        """Forward what the kernel keeps, and the end of the stream."""
        loop = asyncio.get_running_loop()
        wait = _DRAIN_FIRST_WAIT
        while True:
            if data := await loop.sock_recv(self.src, MAX_CHUNK):
                await self._forward(data)
                self.grant()  # all kept bytes forwarded: the kernel may redirect again
                continue
            # EOF, unless kept bytes are still on their way to the socket's queue: a kept
            # segment waits behind the bytes the other direction redirected to this socket.
            if self._splicing.kept(self.index) <= self.by_proxy:
                break
            await asyncio.sleep(wait)
            wait = min(wait * 2, _DRAIN_MAX_WAIT)
        await self._delivered()
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as e:
            log.debug("splice: forwarding a half-close failed: %s", e)


async def _refresh(splicing: Splicing, directions: tuple[_Direction, _Direction]) -> None:
    """Raise both limits as the peers take bytes: often while bytes move, rarely when idle."""
    period, last = REFRESH_FAST, splicing.moved()
    while True:
        await asyncio.sleep(period)
        for d in directions:
            d.grant()
        moved = splicing.moved()
        period = REFRESH_FAST if moved != last else min(period * 2, REFRESH_IDLE)
        last = moved


async def _both(first: asyncio.Task[None], second: asyncio.Task[None]) -> None:
    """Wait for both watchers; the first failure cancels the other and is re-raised. Cancelled
    (policy re-check, drain), both are cancelled and awaited before the sockets are closed."""
    try:
        done, pending = await asyncio.wait((first, second), return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        for task in (first, second):
            task.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        raise
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for task in done:
        task.result()


async def _spliced(
    splicing: Splicing, directions: tuple[_Direction, _Direction], record: ConnectionRecord
) -> None:
    """Watch a started splice until both directions ended, then take it out of the kernel."""
    sent, received = directions

    def sync() -> None:
        record.bytes_sent, record.bytes_received = sent.total(), received.total()

    record.sync = sync
    refresher = asyncio.create_task(_refresh(splicing, directions))
    try:
        await _both(asyncio.create_task(sent.watch()), asyncio.create_task(received.watch()))
    finally:
        refresher.cancel()
        splicing.stop()
        if trimmed := splicing.trimmed():
            TRIMMED.inc(trimmed)
        sync()
        record.sync = None
        await asyncio.gather(refresher, return_exceptions=True)


def start_spliced(
    client: socket.socket,
    upstream: socket.socket,
    record: ConnectionRecord,
    owner: Owner,
    splicer: Splicer,
) -> asyncio.Future[None]:
    """``relay.start_sockets`` with the kernel moving the bytes: returns a future that ends
    when both directions ended (closes neither socket; ``owner`` is told, as by the relay), and
    that the registry cancels to stop the connection. Falls back to ``start_sockets`` when the
    kernel refuses the splice."""
    sent = _Direction(client, upstream, 0)
    received = _Direction(upstream, client, 1)
    try:
        splicing = splicer.start(client, upstream, WINDOW)
    except OSError as e:
        log.warning("splice refused for %s (%s): relaying in user space", record.source, e)
        return start_sockets(client, upstream, record, owner)
    sent.splicing = received.splicing = splicing
    # An empty context, as ``relay.start_*``: the handler's context must not live as long as
    # the connection.
    task = contextvars.Context().run(
        asyncio.ensure_future, _spliced(splicing, (sent, received), record)
    )
    task.add_done_callback(lambda done: owner.relay_ended(done, record, client, upstream))
    return task
