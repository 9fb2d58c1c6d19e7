"""A hostile HBONE client at the codec level: the patterns of issue 15, and what they make the
server hold.

``Attack`` wires a server ``HboneConnection`` to a peer that writes raw frames and never reads:
everything the server wants to send stays "in the transport" (``unread``), and the owner answers
requests (or not) but never consumes what it receives. ``held()`` is what the server then holds
by its own accounting (``held_bytes``) plus the unread output, which a real transport would
buffer. Used by the unit tests (bounds, error codes) and by ``tests.bench.proxy.bench_hostile``
(before/after figures); written so that it also drives the codec from before the limits, which
has no ``held_bytes`` (``held()`` then counts the bytes delivered to the owner instead).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from hpack import Encoder

from agent.proxy import hbone_events as ev
from agent.proxy.h2wire import HboneSettings
from agent.proxy.hbone import HboneConnection

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADER = struct.Struct(">IBI")
DATA, HEADERS, RST_STREAM, SETTINGS, PING, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
MIB = 1024 * 1024


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def connect_block(authority: bytes = b"10.0.0.2:80") -> bytes:
    return Encoder().encode([(b":method", b"CONNECT"), (b":authority", authority)])


class Attack:
    """A server codec and a raw peer that never reads (module docstring)."""

    def __init__(self, *, answer: bool = True, settings: HboneSettings | None = None) -> None:
        self.server = HboneConnection(client_side=False, settings=settings)
        self.answer = answer
        self.events: list[ev.Event] = []
        self.delivered = 0
        self.unread = 0
        self.next_stream = 1
        # The send windows the server granted us, from its WINDOW_UPDATEs (a greedy peer that
        # sends exactly what it may).
        self.window = 65535
        self.stream_window: dict[int, int] = {}
        self.send(PREFACE + frame(SETTINGS, 0, 0) + frame(SETTINGS, ACK, 0))
        self.unread = 0  # the server's preface and SETTINGS: a client reads those

    @property
    def failed(self) -> ev.ConnectionFailed | None:
        return next((e for e in self.events if isinstance(e, ev.ConnectionFailed)), None)

    def send(self, wire: bytes) -> None:
        for event in self.server.receive(wire):
            if isinstance(event, ev.DataReceived):
                self.delivered += len(event.data)
                continue
            self.events.append(event)
            if isinstance(event, ev.TunnelRequested) and self.answer:
                self.server.respond(event.stream_id, 200)
        out = bytes(self.server.data_to_send())
        self.unread += len(out)
        self._window_updates(out)

    def _window_updates(self, out: bytes) -> None:
        pos = 0
        while pos + 9 <= len(out):
            length_type, _, sid = HEADER.unpack_from(out, pos)
            length = length_type >> 8
            if length_type & 0xFF == WINDOW_UPDATE:
                increment = int.from_bytes(out[pos + 9 : pos + 13]) & 0x7FFFFFFF
                if sid == 0:
                    self.window += increment
                else:
                    self.stream_window[sid] = self.stream_window.get(sid, 0) + increment
            pos += 9 + length

    def open(self) -> int:
        sid, self.next_stream = self.next_stream, self.next_stream + 2
        self.stream_window[sid] = self.server.settings.stream_window
        self.send(frame(HEADERS, END_HEADERS, sid, connect_block()))
        return sid

    def data(self, sid: int, most: int) -> int:
        """Send up to ``most`` bytes on ``sid`` as the windows allow; how many that was."""
        n = min(most, MIB, self.window, self.stream_window[sid])
        if n > 0:
            self.window -= n
            self.stream_window[sid] -= n
            self.send(frame(DATA, 0, sid, b"d" * n))
        return max(n, 0)

    def held(self) -> int:
        accounting = getattr(self.server, "held_bytes", None)
        inside = accounting() if accounting is not None else self.delivered
        return inside + self.unread


def repeated(one: bytes, total: int, attack: Attack, chunk: int = 64 * 1024) -> None:
    """Send ``one`` over and over, ``total`` bytes in reads of about ``chunk``, until refused."""
    batch = one * max(1, chunk // len(one))
    sent = 0
    while sent < total and not attack.failed:
        attack.send(batch)
        sent += len(batch)


def ping_flood(attack: Attack, total: int) -> None:
    repeated(frame(PING, 0, 0, b"12345678"), total, attack)


def settings_flood(attack: Attack, total: int) -> None:
    repeated(frame(SETTINGS, 0, 0), total, attack)


def data_on_reset_streams(attack: Attack, total: int) -> None:
    sid = attack.open()
    attack.send(frame(RST_STREAM, 0, sid, (8).to_bytes(4)))
    repeated(frame(DATA, 0, sid, b"x"), total, attack)


def _fill_streams(attack: Attack, total: int) -> None:
    """100 streams, each sent up to ``total / 100`` bytes as far as the windows allow; then one
    byte more than they allow."""
    sids = [attack.open() for _ in range(100)]
    per_stream = total // len(sids)
    for sid in sids:
        sent = 0
        while (
            sent < per_stream and not attack.failed and (n := attack.data(sid, per_stream - sent))
        ):
            sent += n
    if not attack.failed:
        attack.send(frame(DATA, 0, sids[-1], b"x"))


def many_streams_times_window(attack: Attack, total: int) -> None:
    _fill_streams(attack, total)


def data_before_connect_answered(attack: Attack, total: int) -> None:
    attack.answer = False
    _fill_streams(attack, total)


def headers_continuation_flood(attack: Attack, total: int) -> None:
    """One header block of 1 MiB frames that never ends (h2's CONTINUATION limit is 64)."""
    piece = b"\x00" * MIB
    attack.send(frame(HEADERS, 0, 1, piece))
    sent = MIB
    while sent < total and not attack.failed:
        attack.send(frame(CONTINUATION, 0, 1, piece))
        sent += MIB


def header_block_flood(attack: Attack, total: int) -> None:
    """The same with frames of an ordinary size (16 KiB)."""
    piece = b"\x00" * 16 * 1024
    attack.send(frame(HEADERS, 0, 1, piece))
    sent = len(piece)
    while sent < total and not attack.failed:
        attack.send(frame(CONTINUATION, 0, 1, piece))
        sent += len(piece)


def rapid_reset(attack: Attack, total: int) -> None:
    """CONNECT then RST_STREAM, stream after stream, while the server is still handling them
    (the owner does not answer)."""
    attack.answer = False
    block = connect_block()
    wire = bytearray()
    sid = 1
    while len(wire) < total:
        wire += frame(HEADERS, END_HEADERS, sid, block) + frame(RST_STREAM, 0, sid, bytes(4))
        sid += 2
    for start in range(0, len(wire), 64 * 1024):
        if attack.failed:
            break
        attack.send(bytes(wire[start : start + 64 * 1024]))


Pattern = Callable[[Attack, int], None]
PATTERNS: dict[str, tuple[Pattern, int]] = {
    # name: (pattern, bytes the peer sends)
    "ping_flood": (ping_flood, 2 * MIB),
    "settings_flood": (settings_flood, 2 * MIB),
    "data_on_reset_streams": (data_on_reset_streams, 2 * MIB),
    "many_streams_times_window": (many_streams_times_window, 400 * MIB),
    "data_before_connect_answered": (data_before_connect_answered, 400 * MIB),
    "headers_continuation_flood": (headers_continuation_flood, 64 * MIB),
    "header_block_flood": (header_block_flood, 1 * MIB),
    "rapid_reset": (rapid_reset, 1 * MIB),
}
