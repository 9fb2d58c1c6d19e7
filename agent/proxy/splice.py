"""Relaying a same-node connection with the kernel moving the bytes (the same-node splice).

For a same-node connection that policy admitted and that needs nothing done per byte, the
datapath can redirect each segment arriving on one of the proxy's two sockets to the other's
send side (ARCHITECTURE.md, "Same-node splice"). The proxy keeps owning both sockets: closing
them (policy re-check, drain, an error) ends the splice, and the registry, the access log and
metrics see the connection as before, with byte counts read from the kernel at scrape and at
close (``ConnectionRecord.sync``).

What stays in user space is the end of each direction. The kernel forwards data but not a FIN:
it drops the empty skb that marks it (redirected, the peer's send side would fail with EPIPE).
So each direction has a watcher that waits until its source socket reports EOF, then until the
peer's socket has taken every byte the kernel redirected to it (the redirect is queued to a
kernel worker, so data can still be on its way when the FIN is seen), and only then shuts the
peer's write side. "Taken" is ``tcpi_bytes_acked`` plus the send queue (``SIOCOUTQ``), from a
baseline read before the splice started. A watcher that reads data (the kernel keeps a segment
on its own socket when the peer was being removed) forwards it the same way, after the
in-flight bytes, so order is kept.

The proxy reaches the kernel only through the ``Splicer`` interface handed in by the app: the
proxy does not import the datapath.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import struct
import termios
from typing import Protocol

from agent.proxy.relay import MIN_CHUNK, both, relay_sockets
from agent.telemetry.records import ConnectionRecord

log = logging.getLogger(__name__)

_TCP_INFO_LEN = 232
_OFF_BYTES_ACKED = 120  # struct tcp_info.tcpi_bytes_acked (u64), Linux >= 4.1
# Polling the peer while a FIN waits for in-flight bytes: short first, then backing off.
_DRAIN_FIRST_WAIT = 0.0005
_DRAIN_MAX_WAIT = 0.05


class Splicing(Protocol):
    """One spliced pair of sockets (a = client side, b = upstream)."""

    def moved(self) -> tuple[int, int]:
        """Bytes the kernel redirected so far: a -> b, b -> a."""
        ...

    def stop(self) -> tuple[int, int]:
        """Take the sockets out of the kernel's path; the final ``moved()``. Idempotent."""
        ...


class Splicer(Protocol):
    def start(self, a: socket.socket, b: socket.socket) -> Splicing:
        """Start moving bytes between ``a`` and ``b``; raises ``OSError`` when the kernel
        refuses (then nothing changed)."""
        ...


def written(sock: socket.socket) -> int:
    """Bytes ``sock``'s TCP took for sending: acknowledged ones plus the send queue. The
    handshake counts too (the SYN is acknowledged), so callers compare against a baseline."""
    raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    acked: int = struct.unpack_from("=Q", raw, _OFF_BYTES_ACKED)[0]
    queued: int = struct.unpack("=i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return acked + queued


class _Direction:
    """One way of a spliced connection: src -> dst, the kernel's share at ``index``."""

    def __init__(self, src: socket.socket, dst: socket.socket, index: int) -> None:
        self.src, self.dst = src, dst
        self.index = index
        self.baseline = written(dst)  # read before the splice starts
        self.splicing: Splicing | None = None
        self.by_proxy = 0  # bytes the watcher forwarded itself

    def total(self) -> int:
        assert self.splicing is not None
        return self.splicing.moved()[self.index] + self.by_proxy

    async def _delivered(self) -> None:
        """Wait until ``dst`` took every byte sent its way so far."""
        wait = _DRAIN_FIRST_WAIT
        while written(self.dst) - self.baseline < self.total():
            # A peer that failed will never take them: the kernel reports its error there.
            if err := self.dst.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                raise OSError(err, f"spliced peer failed: {os.strerror(err)}")
            await asyncio.sleep(wait)
            wait = min(wait * 2, _DRAIN_MAX_WAIT)

    async def watch(self) -> None:
        loop = asyncio.get_running_loop()
        while data := await loop.sock_recv(self.src, MIN_CHUNK):
            await self._delivered()
            await loop.sock_sendall(self.dst, data)
            self.by_proxy += len(data)
        await self._delivered()
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError as e:
            log.debug("splice: forwarding a half-close failed: %s", e)


async def relay_spliced(
    client: socket.socket, upstream: socket.socket, record: ConnectionRecord, splicer: Splicer
) -> None:
    """Like ``relay_sockets`` (until both directions ended; closes neither socket), with the
    kernel moving the bytes; falls back to ``relay_sockets`` when the kernel refuses."""
    sent = _Direction(client, upstream, 0)
    received = _Direction(upstream, client, 1)
    try:
        splicing = splicer.start(client, upstream)
    except OSError as e:
        log.warning("splice refused for %s (%s): relaying in user space", record.source, e)
        await relay_sockets(client, upstream, record)
        return
    sent.splicing = received.splicing = splicing

    def sync() -> None:
        record.bytes_sent, record.bytes_received = sent.total(), received.total()

    record.sync = sync
    try:
        await both(asyncio.create_task(sent.watch()), asyncio.create_task(received.watch()))
    finally:
        splicing.stop()
        sync()
        record.sync = None
