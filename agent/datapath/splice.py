"""The kernel side of the same-node splice: putting two sockets in the splice maps.

``bpf/splice.bpf.c`` explains the mechanism. This module is what the proxy is handed (through
``agent.app``, as the ``agent.proxy.splice.Splicer`` interface): ``start(a, b)`` links the two
sockets by their cookies and makes each a redirect target, then a source, in that order, so that
no segment arrives on a source whose peer is not yet a target. Every map write goes through
``_update`` so that the map access has one seam.

Bytes that arrived before the sockets joined the maps are still in the receive queue, and the
verdict program only runs when a segment arrives: a client that sent its request right after
connecting, and now waits for the answer, would wait forever. Setting ``SO_RCVLOWAT`` makes TCP
call the socket's data-ready callback at once (``tcp_set_rcvlowat``), which now runs the verdict
over the whole queue, in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct

from agent.datapath import bpfsys
from agent.datapath.layout import SpliceLink

SO_COOKIE = 57  # <asm-generic/socket.h>; not exported by Python's socket module


def cookie(sock: socket.socket) -> int:
    """The kernel's cookie for ``sock``: what the splice maps are keyed by."""
    value: int = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    return value


def _update(m: bpfsys.Map, key: int, value: ctypes._CData) -> None:
    """The one place the splice writes a map (kept small for the bpfsys migration)."""
    m.update(ctypes.c_uint64(key), value)


class KernelSplicing:
    """One pair of spliced sockets (``KernelSplice.start``); ``moved``/``stop`` read the
    bytes the kernel redirected each way (a -> b, b -> a)."""

    def __init__(self, splice: KernelSplice, a: int, b: int) -> None:
        self._splice = splice
        self._cookies = (a, b)
        self._final: tuple[int, int] | None = None

    def moved(self) -> tuple[int, int]:
        if self._final is not None:
            return self._final
        a, b = self._cookies
        return self._splice.redirected(a), self._splice.redirected(b)

    def stop(self) -> tuple[int, int]:
        """Take both sockets out of the maps (the kernel stops redirecting) and return the
        final counts; idempotent."""
        if self._final is None:
            counts = self.moved()
            self._splice.remove(self._cookies)
            self._final = counts
        return self._final


class KernelSplice:
    """The three splice maps of one loaded generation."""

    def __init__(self, links: bpfsys.Map, targets: bpfsys.Map, sources: bpfsys.Map) -> None:
        self.links = links
        self.targets = targets
        self.sources = sources

    def start(self, a: socket.socket, b: socket.socket) -> KernelSplicing:
        """Splice ``a`` and ``b``. Raises ``OSError`` (``BpfError``) when the kernel refuses
        (map full, socket not established); the sockets are then left as they were."""
        ca, cb = cookie(a), cookie(b)
        try:
            _update(self.links, ca, SpliceLink(peer=cb))
            _update(self.links, cb, SpliceLink(peer=ca))
            for sock, c in ((a, ca), (b, cb)):
                _update(self.targets, c, ctypes.c_int(sock.fileno()))
            for sock, c in ((a, ca), (b, cb)):
                _update(self.sources, c, ctypes.c_int(sock.fileno()))
        except bpfsys.BpfError:
            self.remove((ca, cb))
            raise
        for sock in (a, b):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        return KernelSplicing(self, ca, cb)

    def redirected(self, c: int) -> int:
        link = SpliceLink()
        if not self.links.lookup_into(ctypes.c_uint64(c), link):
            return 0
        return int(link.bytes)

    def remove(self, cookies: tuple[int, int]) -> None:
        for c in cookies:
            key = ctypes.c_uint64(c)
            for m in (self.sources, self.targets, self.links):
                with contextlib.suppress(bpfsys.BpfError):
                    m.delete(key)
