"""The HBONE codec: HTTP/2 CONNECT tunnels as a sans-IO state machine.

HBONE (Istio's "HTTP-Based Overlay Network Environment") carries each proxied TCP connection as
one HTTP/2 stream opened with ``CONNECT`` (``:authority`` = ``podIP:port``, header ``forwarded:
for=<client IP>``, and ``nodemesh-service: <namespace>/<name>`` when a Service was dialled) over
mutual TLS to port 15008. The server answers 200 once the upstream is connected and authorized,
or 400 (malformed request), 401 (not authorized), 405 (not CONNECT) or 503 (upstream
unreachable); the bytes then flow as DATA frames and a TCP half-close becomes END_STREAM.

``HboneConnection`` is fed bytes (``receive``) and returns events (``agent.proxy.hbone_events``);
what it wants to send accumulates in ``data_to_send``. It does no I/O and reads no clock, so the
asyncio layer stays thin and every protocol decision is tested without sockets.

Flow control: both windows are replenished only when the owner reports (``consumed``) that the
bytes were written to the stream's TCP socket (or dropped with the stream), so what a peer can
make us hold is bounded by the connection window; a stream's window is a quarter of it, so a
receiver that stops reading stops its own stream and leaves the rest of the connection flowing.
The connection window is granted from the process's buffer budget (``budget``, an
``agent.proxy.budget.HboneBudget``; ``close_budget`` when the transport is gone), which bounds
what all connections together hold and promise.
Outgoing data beyond the peer's window is queued per stream; ``buffered`` lets the owner pause
reading that stream's socket and ``StreamDrained`` tells it to resume.

What a hostile peer cannot do (the limits and the memory figure: ``agent.proxy.hbone_limits``):
make us queue unbounded replies (PING and SETTINGS ACKs, RST_STREAMs) while it does not read
(``max_unsent_replies``: the owner calls ``output_accepted`` whenever the transport took what it
was given); make ``h2`` buffer large frames or header blocks (``agent.proxy.h2data``); reset
streams before we answer them faster than we finish handling them (rapid reset: a reset stream
counts until the owner calls ``request_done``); crash the codec with headers that are not UTF-8.
Each refusal carries a ``cause`` for the owner's metric.

The DATA fast path: DATA frames never go through ``h2`` (why: ``agent.proxy.h2data``, which
splits the incoming bytes; windows and framing: ``agent.proxy.hbone_flow``). Every other frame
does, and ``h2`` still sees one empty DATA frame where the stream cannot take data (unknown,
closed, reset), so that its state machine answers with the right stream or connection error.
A peer's END_STREAM on a stream that may receive goes through ``h2``'s state machines without
the frame (``h2wire.receive_end_stream_on``), and ours is framed by ``h2wire.send_data_on``.

What repeats per stream is done once per connection (a pooled connection carries the same few
CONNECTs again and again): the client builds a CONNECT's fields once per target, client and
Service; the server keeps, for the fields of each well-formed CONNECT it received, what it found
(target, ``forwarded`` client, the headers as strings), so the same fields again are not
checked, decoded and parsed again (a bounded few per connection, short ones only); the client
takes an answer that is exactly ``:status: 200`` as accepted without decoding it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable, Sequence

import h2.events as h2e
from h2.errors import ErrorCodes
from h2.exceptions import DenialOfServiceError, ProtocolError
from h2.stream import StreamState

from agent.proxy import h2data, h2wire
from agent.proxy import hbone_events as ev
from agent.proxy.budget import HboneBudget
from agent.proxy.h2data import DATA_CHUNK, DATA_END, DATA_START, H2, HEADERS
from agent.proxy.h2headers import Block, MalformedHeaders, check_block
from agent.proxy.h2wire import (
    HboneSettings,
    HeaderBlock,
    header_block,
    max_concurrent_streams,
    new_connection,
    send_block_on,
    send_data_on,
    send_headers_on,
)
from agent.proxy.hbone_events import Cause
from agent.proxy.hbone_flow import DataFlow

FORWARDED_HEADER = "forwarded"
# The Service the client dialled (``namespace/name``), when it dialled one: for the far node's
# telemetry labels only (``agent.proxy.inbound``), never for policy.
SERVICE_HEADER = "nodemesh-service"
# h2 keeps a stream's request method for the stream's life (``H2Stream.request_method``): given
# as bytes it is this one object, not a copy encoded for each tunnel.
_METHOD_CONNECT = (b":method", b"CONNECT")
_FORWARDED, _SERVICE = FORWARDED_HEADER.encode(), SERVICE_HEADER.encode()
_STATUS_200 = [(b":status", b"200")]
_ACCEPTED = header_block(_STATUS_200)  # every tunnel's answer, encoded once
# What each received block is checked as (``h2headers.check_block``, h2's own check being off).
_BLOCKS = {
    h2e.RequestReceived: Block.REQUEST,
    h2e.ResponseReceived: Block.RESPONSE,
    h2e.InformationalResponseReceived: Block.RESPONSE,
    h2e.TrailersReceived: Block.TRAILERS,
}
# The CONNECTs a connection keeps checked and parsed (``HboneConnection._connects``), and the
# largest one kept (header names and values, bytes): a pooled connection carries the same few
# requests (a client pod, a target, a Service) again and again. At most about 23 KiB per
# connection with fields a peer chose at these bounds; a proxy's CONNECT (4 fields) about 1.3.
_CONNECTS = 8
_CONNECT_BYTES = 256
_CONNECT_FIELDS = 8
# Non-DATA bytes are handed to h2 at most this many at a time, so that the replies one read can
# make us queue are checked against ``max_unsent_replies`` every few hundred frames.
H2_SLICE = 16 * 1024


class HeaderDecodeError(ValueError):
    """A header name or value from the peer is not UTF-8."""


def decode_headers(headers: Sequence[tuple[bytes | str, bytes | str]]) -> dict[str, str]:
    """Header tuples from ``h2`` (bytes) as a dict of UTF-8 strings."""
    out: dict[str, str] = {}
    try:
        for k, v in headers:
            out[k.decode() if isinstance(k, bytes) else k] = (
                v.decode() if isinstance(v, bytes) else v
            )
    except UnicodeDecodeError as e:
        raise HeaderDecodeError(f"a header is not UTF-8 ({e.reason} at byte {e.start})") from e
    return out


class AuthorityError(ValueError):
    """A CONNECT ``:authority`` is not ``<IP literal>:<port>``."""


def parse_authority(authority: str) -> tuple[str, int]:
    """``10.0.0.1:80`` or ``[fd00::1]:80`` -> (ip, port); names are refused (HBONE targets IPs)."""
    host, sep, port_text = authority.rpartition(":")
    if not sep or not port_text.isdigit() or len(port_text) > 5:
        raise AuthorityError(f"{authority!r} is not <ip>:<port>")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise AuthorityError(f"{authority!r}: port {port} is outside 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return canonical_ip(host), port
    except ValueError as e:
        raise AuthorityError(f"{authority!r}: {host!r} is not an IP address") from e


def canonical_ip(text: str) -> str:
    """``text`` as ``str(ipaddress.ip_address(text))`` writes it; ValueError if it is no IP.
    A dotted quad already in that form (what every proxy's CONNECT carries, twice: target and
    ``forwarded``) is recognised by a round trip through ``inet_pton``/``inet_ntop`` in C,
    about a seventh of ``ipaddress``'s parse; anything else is ``ipaddress``'s to judge."""
    try:
        if socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, text)) == text:
            return text
    except (OSError, ValueError):  # not a dotted quad (or a NUL in it)
        pass
    return str(ipaddress.ip_address(text))


def format_forwarded(client_ip: str) -> str:
    """RFC 7239 ``for=`` as ztunnel writes it (IPv6 quoted and bracketed)."""
    return f'for="[{client_ip}]"' if ":" in client_ip else f"for={client_ip}"


def parse_forwarded(value: str) -> str | None:
    """The ``for=`` address of the first element of a ``forwarded`` header, if it is an IP."""
    for pair in value.split(",")[0].split(";"):
        key, _, raw = pair.strip().partition("=")
        if key.lower() == "for":
            text = raw.strip('"').removeprefix("[").split("]")[0]
            try:
                return canonical_ip(text)
            except ValueError:
                return None
    return None


class HboneConnection:
    """One HBONE connection (client or server side); see the module docstring."""

    def __init__(
        self,
        *,
        client_side: bool,
        settings: HboneSettings | None = None,
        budget: HboneBudget | None = None,
    ) -> None:
        self.settings = settings or HboneSettings()
        self.client_side = client_side
        self._h2 = new_connection(client_side=client_side, settings=self.settings)
        # Header blocks: sent without Huffman coding or dynamic table and decoded in one loop
        # (a peer's Huffman-coded, indexed blocks too), checked by ``check_block``:
        # docs/performance/connection-cost.md, "HBONE's header blocks without `h2`'s header path".
        h2wire.tableless_headers(self._h2)
        self._h2.config.validate_inbound_headers = False
        self._h2.config.normalize_inbound_headers = False
        self._flow = DataFlow(self._h2, self.settings, client_side=client_side, budget=budget)
        self._out: dict[int, bytearray] = {}
        # Outgoing bytes of all streams waiting for the peer's windows (in ``_out``): a plain
        # attribute, read by the owner before every write (``HboneProtocol.out_full``).
        self.queued = 0
        self._end_after_flush: set[int] = set()
        self._unanswered: set[int] = set()  # requests we have not answered
        self._reset_pending: set[int] = set()  # unanswered requests the peer reset, not done
        self._unsent_replies = 0
        self.going_away = False
        self.failed = False
        # Our CONNECTs' header fields by target, client and Service (``open_tunnel``): the
        # same few on a pooled connection, built and encoded once (nothing downstream changes
        # the list).
        self._requests: dict[tuple[str, str | None, str | None], HeaderBlock] = {}
        # Received CONNECTs found well formed, by their fields: the target, the ``forwarded``
        # client and the headers as strings (``_on_request``).
        self._connects: dict[
            tuple[tuple[bytes, bytes], ...], tuple[str, int, str | None, dict[str, str]]
        ] = {}

    # ---- bytes in, events out ------------------------------------------------------------

    def receive(self, data: bytes | bytearray | memoryview) -> list[ev.Event]:
        stream_id = self.take_data_frame(data)
        if stream_id:
            return [ev.DataReceived(stream_id, bytes(data[h2data.HEADER_SIZE :]))]
        return self.receive_frames(data)

    def receive_frames(self, data: bytes | bytearray | memoryview) -> list[ev.Event]:
        """``receive`` of a read that ``take_data_frame`` did not take (its caller asked it
        first), through the splitter."""
        if self.failed:
            return []
        flow = self._flow
        out: list[ev.Event] = []
        to_h2 = bytearray()
        for kind, stream_id, a, b, payload in flow.splitter.feed(data):
            if kind == DATA_CHUNK:
                if stream_id == flow.deliver_to:
                    out.append(ev.DataReceived(stream_id, payload))
                elif stream_id == flow.counted:  # its stream ended meanwhile: nobody gets these
                    flow.consumed(stream_id, len(payload))
            elif kind == H2:
                to_h2 += payload
            elif kind == HEADERS:
                if to_h2:  # the frames before it, in order
                    out += self._h2_receive(to_h2)
                    to_h2.clear()
                if not self.failed:
                    out += self._headers_received(stream_id, a, payload)
            elif kind == DATA_START:
                if to_h2:  # the frames before this one may have opened or closed its stream
                    out += self._h2_receive(to_h2)
                    to_h2.clear()
                error = None if self.failed else flow.start(stream_id, a, a - b)
                if error:
                    out.append(self._fail(error[1], error[0], Cause.FLOW_CONTROL))
            elif kind == DATA_END:
                if a and stream_id == flow.deliver_to:
                    # END_STREAM on a stream that may receive (``to_h2`` is empty: it was
                    # handed on at DATA_START): h2's state machines, without the frame.
                    out += self._end_received(stream_id)
                elif stream_id != flow.deliver_to:
                    # A stream that cannot take data: h2's state machine decides.
                    to_h2 += h2data.data_frame_header(0, stream_id, end_stream=bool(a))
                flow.deliver_to = flow.counted = 0
            else:
                code, cause, reason = flow.splitter.error or (
                    ErrorCodes.PROTOCOL_ERROR,
                    Cause.PROTOCOL_ERROR,
                    "bad frame",
                )
                out.append(self._fail(reason, code, cause))
            if self.failed:
                return out
        if to_h2:
            out += self._h2_receive(to_h2)
        return out

    def take_data_frame(self, data: bytes | bytearray | memoryview) -> int:
        """``receive`` of one read that is one whole DATA frame for a stream that may receive it
        within the windows (the read of every relayed message), without an event: returns the
        stream id, and its payload, ``data[h2data.HEADER_SIZE:]``, is the owner's to deliver
        and give back with ``consumed`` as a ``DataReceived``'s. 0: not such a read, nothing
        taken; ``receive`` it (``hbone_flow.DataFlow.take_single``)."""
        if self.failed or type(data) is not bytes:
            return 0
        return self._flow.take_single(data)

    def _h2_receive(self, data: bytes | bytearray) -> list[ev.Event]:
        out: list[ev.Event] = []
        for start in range(0, len(data), H2_SLICE):
            out += self._h2_receive_slice(bytes(data[start : start + H2_SLICE]))
            if self.failed:
                break
        return out

    def _headers_received(self, stream_id: int, flags: int, block: bytes) -> list[ev.Event]:
        """A HEADERS frame that is a whole header block (``h2data.HEADERS``): through ``h2``'s
        state machines without its frame parsing where ``h2wire.receive_headers_on`` takes
        it, else to ``h2`` as the frame it was."""
        self._flow.take_h2_output()
        try:
            h2_events = h2wire.receive_headers_on(
                self._h2, stream_id, block, end_stream=bool(flags & h2data.FLAG_END_STREAM)
            )
        except Exception as e:
            return [self._h2_failure(e)]
        if h2_events is None:
            return self._h2_receive(h2data.headers_frame(stream_id, flags, block))
        return self._h2_events(h2_events)

    def _h2_failure(self, e: Exception) -> ev.ConnectionFailed:
        """The connection failure for what ``h2`` raised on the peer's frames."""
        if isinstance(e, DenialOfServiceError):
            reason = f"peer exceeded a limit: {e}"
            return self._fail(reason, ErrorCodes.ENHANCE_YOUR_CALM, Cause.H2_LIMIT)
        if isinstance(e, ProtocolError):
            reason = f"HTTP/2 protocol error from peer: {e}"
            return self._fail(reason, e.error_code, Cause.PROTOCOL_ERROR)
        # h2 parses hostile bytes: any other failure is still theirs
        reason = f"h2 could not process the peer's frames: {e!r}"
        return self._fail(reason, ErrorCodes.PROTOCOL_ERROR, Cause.UNPARSEABLE)

    def _h2_receive_slice(self, data: bytes) -> list[ev.Event]:
        self._flow.take_h2_output()  # what our own commands queued is not a reply
        try:
            h2_events = self._h2.receive_data(data)
        except Exception as e:
            return [self._h2_failure(e)]
        return self._h2_events(h2_events)

    def _h2_events(self, h2_events: Sequence[h2e.Event]) -> list[ev.Event]:
        out: list[ev.Event] = []
        for h2_event in h2_events:
            out.extend(self._translate(h2_event))
            if self.failed:
                return out
        self._unsent_replies += self._flow.take_h2_output()
        if self._unsent_replies > self.settings.max_unsent_replies:
            reason = (
                f"peer made us queue {self._unsent_replies} bytes of replies (PING/SETTINGS "
                "ACKs, RST_STREAMs) that it does not read"
            )
            out.append(self._fail(reason, ErrorCodes.ENHANCE_YOUR_CALM, Cause.CONTROL_FLOOD))
        return out

    def _end_received(self, stream_id: int) -> list[ev.Event]:
        try:
            h2_events = h2wire.receive_end_stream_on(self._h2, stream_id)
        except ProtocolError as e:  # a declared content-length the stream did not carry
            reason = f"HTTP/2 protocol error from peer: {e}"
            return [self._fail(reason, e.error_code, Cause.PROTOCOL_ERROR)]
        out: list[ev.Event] = []
        for h2_event in h2_events:
            if type(h2_event) is not h2e.DataReceived:  # the empty frame's: nothing for us
                out.extend(self._translate(h2_event))
        return out

    def output_accepted(self) -> None:
        """The transport took everything ``data_to_send`` returned so far without exceeding its
        buffer limit: the replies queued until now no longer count against the peer."""
        self._unsent_replies = 0

    def data_to_send(self) -> bytes | bytearray:
        """Everything to write to the transport, in order (a fresh object on every call)."""
        return self._flow.data_to_send()

    def _translate(self, event: h2e.Event) -> Sequence[ev.Event]:
        kind = type(event)
        if kind is h2e.ResponseReceived and event.headers == _STATUS_200:  # type: ignore[attr-defined]
            # Every tunnel's answer: a block that ``check_block`` passes and that decodes to
            # ``:status: 200`` (the path below, without its checks, decoding and dict).
            return [ev.TunnelAccepted(event.stream_id)]  # type: ignore[attr-defined]
        if kind is h2e.RequestReceived:
            kept = self._connect_kept(event)  # type: ignore[arg-type]
            if kept is not None:
                return [kept]
        block = _BLOCKS.get(kind)
        if block is not None:
            try:  # split cookies come back joined, as h2's normalisation joined them
                event.headers = check_block(event.headers or (), block)  # type: ignore[attr-defined]
            except MalformedHeaders as e:
                reason = f"HTTP/2 protocol error from peer: {e}"
                return [self._fail(reason, ErrorCodes.PROTOCOL_ERROR, Cause.PROTOCOL_ERROR)]
        if isinstance(event, h2e.RequestReceived):
            return [self._on_request(event)]
        if isinstance(event, h2e.ResponseReceived):
            return [self._on_response(event)]
        if isinstance(event, h2e.StreamEnded):
            self._flow.forget(event.stream_id)  # the peer sends nothing more
            return [ev.StreamEnded(event.stream_id)]
        if isinstance(event, h2e.StreamReset):
            return self._on_reset(event)
        if isinstance(event, h2e.WindowUpdated):
            return self._flush_all() if event.stream_id == 0 else self._flush(event.stream_id)
        if isinstance(event, h2e.ConnectionTerminated):
            self.going_away = True
            return [ev.GoAwayReceived(int(event.error_code or 0), event.last_stream_id or 0)]
        if isinstance(event, h2e.PingAckReceived):
            return [ev.PingAcknowledged(bytes(event.ping_data or b""))]
        if isinstance(event, h2e.RemoteSettingsChanged):
            return self._flush_all()
        return []

    def _headers(
        self, event: h2e.RequestReceived | h2e.ResponseReceived
    ) -> dict[str, str] | ev.ConnectionFailed:
        """The event's headers as strings, or the connection failure if one is not UTF-8."""
        try:
            return decode_headers(event.headers or ())
        except HeaderDecodeError as e:
            reason = f"headers on stream {event.stream_id}: {e}"
            return self._fail(reason, ErrorCodes.PROTOCOL_ERROR, Cause.INVALID_HEADER)

    def _on_request(self, event: h2e.RequestReceived) -> ev.Event:
        sid = event.stream_id
        fields = event.headers
        headers = self._headers(event)
        if isinstance(headers, ev.ConnectionFailed):
            return headers
        if self.going_away:
            self.reset(sid, ErrorCodes.REFUSED_STREAM)
            return ev.RequestRejected(sid, 0, "connection is draining (GOAWAY sent)")
        if headers.get(":method") != "CONNECT":
            return self._reject(sid, 405, f"method {headers.get(':method')!r} is not CONNECT")
        try:
            host, port = parse_authority(headers.get(":authority", ""))
        except AuthorityError as e:
            return self._reject(sid, 400, f"bad :authority: {e}")
        fwd = headers.get(FORWARDED_HEADER)
        forwarded_for = parse_forwarded(fwd) if fwd else None
        if (
            fields
            and len(fields) <= _CONNECT_FIELDS
            and sum(len(n) + len(v) for n, v in fields) <= _CONNECT_BYTES
        ):
            if len(self._connects) >= _CONNECTS:
                self._connects.clear()
            self._connects[tuple(fields)] = (host, port, forwarded_for, headers)
        self._unanswered.add(sid)
        return ev.TunnelRequested(sid, host, port, forwarded_for, dict(headers))

    def _connect_kept(self, event: h2e.RequestReceived) -> ev.Event | None:
        """A CONNECT whose fields this connection found well formed before (``_connects``):
        the event ``_on_request`` made then for this stream, without checking, decoding and
        parsing the same fields again; None for any other block (it takes the full path)."""
        fields = event.headers
        if not fields or len(fields) > _CONNECT_FIELDS or not self._connects:
            return None
        kept = self._connects.get(tuple(fields))
        if kept is None:
            return None
        sid = event.stream_id
        if self.going_away:
            self.reset(sid, ErrorCodes.REFUSED_STREAM)
            return ev.RequestRejected(sid, 0, "connection is draining (GOAWAY sent)")
        host, port, forwarded_for, headers = kept
        self._unanswered.add(sid)
        return ev.TunnelRequested(sid, host, port, forwarded_for, dict(headers))

    def _reject(self, stream_id: int, status: int, reason: str) -> ev.Event:
        self._end_refused(stream_id, status)
        return ev.RequestRejected(stream_id, status, reason)

    def _end_refused(self, stream_id: int, status: int) -> None:
        """Answer ``status`` and close the stream on both sides: the complete response, then
        RST_STREAM(NO_ERROR) (RFC 9113 section 8.1), so that the stream stops counting against
        either side's concurrency limit whether or not the client ends its half. A stream the
        peer already reset (in the same read as its request) gets nothing."""
        self._forget(stream_id)
        if h2wire.stream_state(self._h2, stream_id) in (None, StreamState.CLOSED):
            return
        send_headers_on(self._h2, stream_id, [(b":status", b"%d" % status)], end_stream=True)
        if h2wire.stream_state(self._h2, stream_id) is not StreamState.CLOSED:
            self._h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)

    def _on_response(self, event: h2e.ResponseReceived) -> ev.Event:
        sid = event.stream_id
        headers = self._headers(event)
        if isinstance(headers, ev.ConnectionFailed):
            return headers
        status = headers.get(":status", "")
        code = int(status) if status.isdigit() else 0
        if code == 200:
            return ev.TunnelAccepted(sid)
        # A refusal: close our half too (the server may not reset it), so a refused stream
        # never counts against the connection's stream limit.
        self.reset(sid, ErrorCodes.CANCEL)
        return ev.TunnelRefused(sid, code)

    def _on_reset(self, event: h2e.StreamReset) -> list[ev.Event]:
        sid = event.stream_id
        self._forget(sid)
        if event.remote_reset and sid in self._unanswered:
            self._unanswered.discard(sid)
            self._reset_pending.add(sid)
            if len(self._reset_pending) > self.settings.max_pending_resets:
                reason = (
                    f"peer reset {len(self._reset_pending)} streams before we answered them, "
                    "faster than we finished handling them (rapid reset)"
                )
                return [self._fail(reason, ErrorCodes.ENHANCE_YOUR_CALM, Cause.RAPID_RESET)]
        return [ev.StreamReset(sid, int(event.error_code or 0), bool(event.remote_reset))]

    def _fail(self, reason: str, code: int, cause: str) -> ev.ConnectionFailed:
        self.failed = True
        self._h2.close_connection(error_code=code)
        return ev.ConnectionFailed(reason, int(code), cause)

    # ---- commands from the owner -----------------------------------------------------------

    def open_tunnel(
        self, authority: str, *, client_ip: str | None = None, service: str | None = None
    ) -> int:
        """Client side: send CONNECT; returns the stream id (``TunnelAccepted`` follows).
        ``service``: the dialled Service as ``namespace/name`` (``SERVICE_HEADER``)."""
        sid = self._h2.get_next_available_stream_id()
        key = (authority, client_ip, service)
        request = self._requests.get(key)
        if request is None:
            headers = [_METHOD_CONNECT, (b":authority", authority.encode())]
            if client_ip:
                headers.append((_FORWARDED, format_forwarded(client_ip).encode()))
            if service:
                headers.append((_SERVICE, service.encode()))
            if len(self._requests) >= _CONNECTS:
                self._requests.clear()
            self._requests[key] = request = header_block(headers)
        send_block_on(self._h2, sid, request, end_stream=False)
        self._flow.stream_opened(sid)
        return sid

    def can_open_stream(self) -> bool:
        """Room for one more stream of ours (the pool asks before every open). h2 counts its
        open streams by walking all of them; fewer streams known to it at all than the limit
        answers the same without the walk (the common case), so the walk is left for a
        connection near its limit."""
        if self.going_away or self.failed:
            return False
        limit = min(
            max_concurrent_streams(self._h2.remote_settings), self.settings.max_concurrent_streams
        )
        return len(self._h2.streams) < limit or self._h2.open_outbound_streams < limit

    def respond(self, stream_id: int, status: int) -> None:
        """Server side: 200 opens the tunnel; any other status ends and closes the stream. A
        stream the peer reset (or a connection that failed) gets no answer."""
        self._unanswered.discard(stream_id)
        if self.failed or h2wire.stream_state(self._h2, stream_id) in (None, StreamState.CLOSED):
            self._reset_pending.discard(stream_id)
            return
        if status == 200:
            send_block_on(self._h2, stream_id, _ACCEPTED, end_stream=False)
            self._flow.stream_opened(stream_id)
        else:
            self._end_refused(stream_id, status)

    def request_done(self, stream_id: int) -> None:
        """Server side: the owner finished handling the request (answered it, or stopped after
        the peer reset it): it no longer counts as pending (rapid-reset detection)."""
        self._unanswered.discard(stream_id)
        self._reset_pending.discard(stream_id)

    def send(self, stream_id: int, data: bytes | bytearray | memoryview) -> list[ev.Event]:
        """Queue tunnel bytes; what the peer's windows allow goes out now."""
        if stream_id not in self._out and not self.failed:
            # Nothing queued: frame what the windows allow straight from ``data``.
            sent = self._flow.send(stream_id, memoryview(data))
            if sent == len(data):
                return []
            data = memoryview(data)[sent:]
        self._out.setdefault(stream_id, bytearray()).extend(data)
        self.queued += len(data)
        return self._flush(stream_id)

    def buffered(self, stream_id: int) -> int:
        return len(self._out.get(stream_id, b""))

    def unsent(self) -> int:
        """DATA bytes framed for the transport that ``data_to_send`` has not handed out yet
        (the owner flushes them at the end of the loop's pass: ``HboneProtocol.flush_soon``).
        ``DataFlow.unsent``, read here: the owner asks before every write."""
        return len(self._flow._wire)

    def held_bytes(self) -> int:
        """Everything this connection holds in memory because of the peer: received bytes the
        owner has not consumed, outgoing bytes queued for windows or for ``data_to_send``, and
        partial frames or a header block inside ``h2``. The owner adds its transport's buffer."""
        flow = self._flow
        return flow.held + self.queued + flow.unsent() + flow.splitter.h2_buffered()

    def end_stream(self, stream_id: int) -> list[ev.Event]:
        """Half-close our side once the queued data is out. With nothing queued END_STREAM
        goes now and no ``StreamDrained`` follows: nothing had to drain, and the event woke
        every stream of the connection (``HboneProtocol``) at the end of every tunnel."""
        if stream_id in self._out or self.failed:
            self._end_after_flush.add(stream_id)
            self._out.setdefault(stream_id, bytearray())
            return self._flush(stream_id)
        if h2wire.stream_state(self._h2, stream_id) in (None, StreamState.CLOSED):
            self._forget(stream_id)
        else:
            send_data_on(self._h2, stream_id, b"", end_stream=True)
        return []

    def consumed(self, stream_id: int, n: int) -> None:
        """The owner wrote ``n`` received bytes onwards: let the peer send that much more."""
        self._flow.consumed(stream_id, n)

    def release(self, stream_id: int) -> None:
        """The owner is done with the stream: received bytes it still holds are given back."""
        self._flow.release(stream_id)

    @property
    def held_received(self) -> int:
        """Received DATA bytes delivered and not yet ``consumed`` (or released)."""
        return self._flow.held

    @property
    def promised(self) -> int:
        """Bytes the peer may send without asking (the open connection window): with the
        received bytes the owner holds, what this connection is charged to the buffer budget."""
        return self._flow.promised

    @property
    def budget(self) -> HboneBudget:
        """The process's buffer budget this connection draws from (the send side's part,
        ``budget.queue``, is charged by the owner: ``tunnel.HboneProtocol``)."""
        return self._flow.budget

    def on_budget_room(self, callback: Callable[[], bool]) -> None:
        """A window grant the exhausted budget refused waits for freed budget; ``callback``
        (a bound method of the owner, held weakly; it must only schedule ``regrant``, and
        answers False when the connection is closing) says it is this connection's turn."""
        self._flow.on_budget_room(callback)

    def regrant(self) -> None:
        """Take this connection's turn at freed budget (``hbone_flow.DataFlow.regrant``)."""
        self._flow.regrant()

    def close_budget(self) -> None:
        """The transport is gone: what this connection held and promised goes back to the
        buffer budget (``agent.proxy.budget``)."""
        self._flow.close_budget()

    def reset(self, stream_id: int, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        """Reset the stream (forgotten here either way). Nothing is sent on a connection that
        failed or was closed: its GOAWAY was the last frame, and ``h2`` raises for any other
        (a relay finishing its stream before ``connection_lost`` came did meet that)."""
        self._forget(stream_id)
        if not self.failed and h2wire.stream_state(self._h2, stream_id) not in (
            None,
            StreamState.CLOSED,
        ):
            self._h2.reset_stream(stream_id, code)

    def ping(self) -> bytes | None:
        """Send a PING; returns its opaque data, which the peer's ``PingAcknowledged`` carries
        back. ``None`` on a connection that failed or was closed: its GOAWAY was the last
        frame (``h2`` raises for a PING then), so nothing is sent and no answer will come."""
        if self.failed:
            return None
        opaque = os.urandom(8)
        self._h2.ping(opaque)
        return opaque

    def goaway(self, code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        """Graceful: refuse new streams, let the open ones finish (drain). A connection that
        failed or was closed sent its GOAWAY then: it refuses new streams already and sends
        no second one (``h2`` would frame it, for a transport that is closing)."""
        if not self.going_away:
            self.going_away = True
            if not self.failed:
                self._h2.send_goaway(code, self._h2.highest_inbound_stream_id)

    def close(self, code: ErrorCodes = ErrorCodes.NO_ERROR) -> None:
        """Abrupt: GOAWAY and no further frames."""
        if not self.failed:
            self.failed = True
            self._h2.close_connection(error_code=code)

    @property
    def open_streams(self) -> int:
        return int(self._h2.open_outbound_streams + self._h2.open_inbound_streams)

    # ---- internals ---------------------------------------------------------------------------

    def _flush(self, stream_id: int) -> list[ev.Event]:
        buf = self._out.get(stream_id)
        if buf is None or self.failed:
            return []
        if h2wire.stream_state(self._h2, stream_id) in (None, StreamState.CLOSED):
            self._forget(stream_id)
            return []
        if buf:
            with memoryview(buf) as view:
                sent = self._flow.send(stream_id, view)
            del buf[:sent]
            self.queued -= sent
            if buf:
                return []
        if stream_id in self._end_after_flush:
            self._end_after_flush.discard(stream_id)
            send_data_on(self._h2, stream_id, b"", end_stream=True)
        del self._out[stream_id]
        return [ev.StreamDrained(stream_id)]

    def _flush_all(self) -> list[ev.Event]:
        out: list[ev.Event] = []
        for sid in list(self._out):
            out.extend(self._flush(sid))
        return out

    def _forget(self, stream_id: int) -> None:
        self.queued -= len(self._out.pop(stream_id, b""))
        self._end_after_flush.discard(stream_id)
        self._flow.forget(stream_id)
