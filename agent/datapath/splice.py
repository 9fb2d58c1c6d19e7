"""The kernel side of the same-node splice: the splice maps, per pair of sockets.

``bpf/splice.bpf.c`` explains the mechanism. This module is what the proxy is handed (through
``agent.app``, as the ``agent.proxy.splice.Splicer`` interface; a worker process of
``--workers N`` builds it on the map descriptors it inherited from the main process:
``from_fds``). ``start(a, b, window)`` links the two sockets by their cookies, grants each
``window`` bytes of credit, and makes each a redirect target, then a source, in that order, so
that no segment arrives on a source whose peer is not yet a target. Every map write goes
through ``_update``, so that map access has one seam.

Bytes that arrived before a socket became a source are still in its receive queue, and the
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
from agent.datapath.layout import SpliceCredit, SpliceLink

SO_COOKIE = 57  # <asm-generic/socket.h>; not exported by Python's socket module


def cookie(sock: socket.socket) -> int:
    """The kernel's cookie for ``sock``: what the splice maps are keyed by."""
    value: int = struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]
    return value


def _update(m: bpfsys.Map, key: int, value: ctypes._CData) -> None:
    """The one place the splice writes a map (kept small for the bpfsys migration)."""
    m.update(ctypes.c_uint64(key), value)


def _kick(sock: socket.socket) -> None:
    """Run the verdict over what already waits in ``sock``'s receive queue."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


class KernelSplicing:
    """One pair of spliced sockets (``KernelSplice.start``). Index 0 is the direction a -> b,
    1 is b -> a, in every method."""

    def __init__(self, splice: KernelSplice, a: socket.socket, b: socket.socket) -> None:
        self._splice = splice
        self._cookies = (cookie(a), cookie(b))
        self._final: tuple[SpliceLink, SpliceLink] | None = None

    def _links(self) -> tuple[SpliceLink, SpliceLink]:
        if self._final is not None:
            return self._final
        a, b = self._cookies
        return self._splice.link(a), self._splice.link(b)

    def moved(self) -> tuple[int, int]:
        a, b = self._links()
        return int(a.bytes), int(b.bytes)

    def kept(self, index: int) -> int:
        return int(self._links()[index].kept)

    def trimmed(self) -> int:
        a, b = self._links()
        return int(a.trimmed) + int(b.trimmed)

    def grant(self, index: int, limit: int, taken: int) -> None:
        if self._final is None:
            _update(self._splice.credits, self._cookies[index], SpliceCredit(limit, taken))

    def stop(self) -> tuple[int, int]:
        """Take both sockets out of the maps (the kernel stops redirecting) and return the
        final ``moved()``; idempotent."""
        if self._final is None:
            final = self._links()
            self._splice.remove(self._cookies)
            self._final = final
        return self.moved()


class KernelSplice:
    """The four splice maps of one loaded generation."""

    NAMES = ("nm_splice_links", "nm_splice_credits", "nm_splice_targets", "nm_splice_sources")

    @classmethod
    def from_fds(cls, fds: list[int]) -> KernelSplice:
        """The maps from descriptors inherited in ``fds()``'s order: how a worker process
        (``--workers N``) gets them from the main process, which opened the pins."""
        if len(fds) != len(cls.NAMES):
            raise ValueError(f"the splice needs {len(cls.NAMES)} map descriptors, not {fds}")
        links, credits, targets, sources = (
            bpfsys.Map(fd, name) for fd, name in zip(fds, cls.NAMES, strict=True)
        )
        return cls(links, credits, targets, sources)

    def fds(self) -> list[int]:
        """The maps' descriptors, in ``from_fds``'s order (for a worker to inherit)."""
        return [self.links.fd, self.credits.fd, self.targets.fd, self.sources.fd]

    def __init__(
        self, links: bpfsys.Map, credits: bpfsys.Map, targets: bpfsys.Map, sources: bpfsys.Map
    ) -> None:
        self.links = links
        self.credits = credits
        self.targets = targets
        self.sources = sources

    def start(self, a: socket.socket, b: socket.socket, window: int) -> KernelSplicing:
        """Splice ``a`` and ``b``, each allowed ``window`` bytes before the proxy grants more.
        Raises ``OSError`` (``BpfError``) when the kernel refuses (map full, socket not
        established); the sockets are then left as they were."""
        pair = KernelSplicing(self, a, b)
        ca, cb = pair._cookies
        try:
            _update(self.links, ca, SpliceLink(peer=cb))
            _update(self.links, cb, SpliceLink(peer=ca))
            for c in (ca, cb):
                _update(self.credits, c, SpliceCredit(limit=window))
            for sock, c in ((a, ca), (b, cb)):
                _update(self.targets, c, ctypes.c_int(sock.fileno()))
            for sock, c in ((a, ca), (b, cb)):
                _update(self.sources, c, ctypes.c_int(sock.fileno()))
        except bpfsys.BpfError:
            self.remove((ca, cb))
            raise
        for sock in (a, b):
            _kick(sock)
        return pair

    def link(self, c: int) -> SpliceLink:
        """The program's counters for socket cookie ``c`` (zero when it is not linked)."""
        link = SpliceLink()
        self.links.lookup_into(ctypes.c_uint64(c), link)
        return link

    def remove(self, cookies: tuple[int, int]) -> None:
        for c in cookies:
            key = ctypes.c_uint64(c)
            for m in (self.sources, self.targets, self.credits, self.links):
                with contextlib.suppress(bpfsys.BpfError):
                    m.delete(key)
