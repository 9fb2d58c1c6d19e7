"""The HBONE codec, client talking to server in memory, plus what a hostile peer can send."""

from __future__ import annotations

import dataclasses
import ipaddress

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hypothesis import given
from hypothesis import strategies as st

from agent.proxy import hbone_events as ev
from agent.proxy.h2wire import MIB, HboneSettings
from agent.proxy.hbone import (
    AuthorityError,
    HboneConnection,
    canonical_ip,
    format_forwarded,
    parse_authority,
    parse_forwarded,
)


class Pair:
    """A client and a server codec wired back to back; ``pump`` moves bytes until quiet."""

    def __init__(self, settings: HboneSettings | None = None) -> None:
        self.client = HboneConnection(client_side=True, settings=settings)
        self.server = HboneConnection(client_side=False, settings=settings)
        self.client_events: list[ev.Event] = []
        self.server_events: list[ev.Event] = []
        self.pump()

    def pump(self) -> None:
        while True:
            c2s = self.client.data_to_send()
            s2c = self.server.data_to_send()
            if not c2s and not s2c:
                return
            if c2s:
                self.server_events += self.server.receive(c2s)
            if s2c:
                self.client_events += self.client.receive(s2c)

    def take(self, side: str) -> list[ev.Event]:
        events = self.client_events if side == "client" else self.server_events
        out = list(events)
        events.clear()
        return out

    def open(self, authority: str = "10.0.0.2:8080", client_ip: str = "10.0.0.1") -> int:
        sid = self.client.open_tunnel(authority, client_ip=client_ip)
        self.pump()
        (req,) = self.take("server")
        assert isinstance(req, ev.TunnelRequested)
        self.server.respond(sid, 200)
        self.pump()
        assert self.take("client") == [ev.TunnelAccepted(sid)]
        return sid


def data_of(events: list[ev.Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ev.DataReceived) and e.stream_id == sid)


def test_connect_carries_authority_and_forwarded_client_ip() -> None:
    p = Pair()
    sid = p.client.open_tunnel("10.0.0.2:8080", client_ip="10.0.0.1")
    p.pump()
    (req,) = p.take("server")
    assert isinstance(req, ev.TunnelRequested)
    assert (req.stream_id, req.host, req.port, req.forwarded_for) == (
        sid,
        "10.0.0.2",
        8080,
        "10.0.0.1",
    )
    assert req.headers["forwarded"] == "for=10.0.0.1"
    assert req.authority == "10.0.0.2:8080"


def test_data_both_ways_and_half_close_each_direction() -> None:
    p = Pair()
    sid = p.open()
    p.client.send(sid, b"request")
    p.client.end_stream(sid)
    p.pump()
    server_events = p.take("server")
    assert data_of(server_events, sid) == b"request"
    assert ev.StreamEnded(sid) in server_events
    p.server.send(sid, b"response after client half-closed")
    p.server.end_stream(sid)
    p.pump()
    client_events = p.take("client")
    assert data_of(client_events, sid) == b"response after client half-closed"
    assert ev.StreamEnded(sid) in client_events


@pytest.mark.parametrize("status", [400, 401, 503])
def test_refusal_status_reaches_client_and_closes_the_stream_on_both_sides(status: int) -> None:
    p = Pair()
    for _ in range(2 * HboneSettings().max_concurrent_streams):  # refusals never pile up
        sid = p.client.open_tunnel("10.0.0.2:80")
        p.pump()
        p.take("server")
        p.server.respond(sid, status)
        p.pump()
        assert ev.TunnelRefused(sid, status) in p.take("client")
    assert p.client.can_open_stream()
    assert (p.client.open_streams, p.server.open_streams) == (0, 0)


def test_room_for_a_stream_is_known_without_counting_until_near_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pool asks ``can_open_stream`` before every open: h2 counts its open streams by
    walking them all, so that is left for a connection with as many streams as the limit."""
    counted: list[int] = []
    walk = h2.connection.H2Connection.open_outbound_streams

    def counting(conn: h2.connection.H2Connection) -> int:
        counted.append(1)
        return walk.fget(conn)  # type: ignore[attr-defined]

    monkeypatch.setattr(h2.connection.H2Connection, "open_outbound_streams", property(counting))
    p = Pair(dataclasses.replace(HboneSettings(), max_concurrent_streams=3))
    sids = [p.open() for _ in range(2)]
    counted.clear()
    assert p.client.can_open_stream()
    assert counted == []
    sids.append(p.open())
    assert not p.client.can_open_stream()  # three open: at the limit
    p.client.end_stream(sids[0])
    p.server.end_stream(sids[0])
    p.pump()
    assert p.client.can_open_stream()  # two open, one closed stream h2 still knows


def test_large_transfer_is_byte_exact_with_consumer_acks() -> None:
    p = Pair()
    sid = p.open()
    payload = bytes(range(256)) * (40 * 1024)  # 10 MiB: more than the 4 MiB stream window
    received = bytearray()
    p.client.send(sid, payload)
    for _ in range(1000):
        p.pump()
        for e in p.take("server"):
            if isinstance(e, ev.DataReceived):
                received += e.data
                p.server.consumed(sid, len(e.data))
        if len(received) == len(payload):
            break
    assert bytes(received) == payload
    assert p.client.buffered(sid) == 0


def test_slow_stream_does_not_stall_another() -> None:
    p = Pair()
    window = HboneSettings().stream_window
    slow, fast = p.open(), p.open("10.0.0.3:80")
    p.client.send(slow, b"x" * (2 * window))  # receiver never consumes: stalls at its window
    p.pump()
    assert len(data_of(p.take("server"), slow)) == window
    assert p.client.buffered(slow) == window
    p.client.send(fast, b"y" * (8 * MIB))
    got = 0
    for _ in range(100):
        p.pump()
        for e in p.take("server"):
            if isinstance(e, ev.DataReceived) and e.stream_id == fast:
                got += len(e.data)
                p.server.consumed(fast, len(e.data))
        if got == 8 * MIB:
            break
    assert got == 8 * MIB
    assert p.client.buffered(slow) == window


def test_an_end_with_nothing_queued_goes_at_once_without_a_drained_event() -> None:
    p = Pair()
    sid = p.open()
    assert p.client.send(sid, b"request") == []
    assert p.client.end_stream(sid) == []
    p.pump()
    events = p.take("server")
    assert data_of(events, sid) == b"request"
    assert events[-1] == ev.StreamEnded(sid)


def test_an_end_after_queued_data_waits_for_it_then_drains() -> None:
    p = Pair()
    sid = p.open()
    window = HboneSettings().stream_window
    assert p.client.send(sid, b"a" * (window + 1000)) == []  # 1000 bytes left queued
    assert p.client.end_stream(sid) == []
    p.pump()
    events = p.take("server")
    assert ev.StreamEnded(sid) not in events
    p.server.consumed(sid, len(data_of(events, sid)))
    p.pump()
    events = p.take("server")
    assert data_of(events, sid) == b"a" * 1000
    assert events[-1] == ev.StreamEnded(sid)
    assert ev.StreamDrained(sid) in p.take("client")


def test_drained_event_after_window_reopens() -> None:
    p = Pair()
    sid = p.open()
    window = HboneSettings().stream_window
    assert p.client.send(sid, b"a" * (window + 1000)) == []  # 1000 bytes left queued
    p.pump()
    received = data_of(p.take("server"), sid)
    p.server.consumed(sid, len(received))
    p.pump()
    assert ev.StreamDrained(sid) in p.take("client")


def test_reset_reaches_peer() -> None:
    p = Pair()
    sid = p.open()
    p.client.reset(sid)
    p.pump()
    assert p.take("server") == [ev.StreamReset(sid, ErrorCodes.CANCEL, remote=True)]


def test_ping_is_acknowledged() -> None:
    p = Pair()
    opaque = p.client.ping()
    p.pump()
    assert p.take("client") == [ev.PingAcknowledged(opaque)]


def test_graceful_goaway_refuses_new_streams_but_lets_open_ones_finish() -> None:
    p = Pair()
    sid = p.open()
    p.server.goaway()
    p.pump()
    assert p.take("client") == [ev.GoAwayReceived(ErrorCodes.NO_ERROR, sid)]
    assert not p.client.can_open_stream()
    p.client.send(sid, b"still flowing")
    p.pump()
    assert data_of(p.take("server"), sid) == b"still flowing"


def test_server_refuses_streams_after_its_goaway() -> None:
    p = Pair()
    p.server.goaway()
    p.pump()
    p.take("client")
    sid = p.client.open_tunnel("10.0.0.2:80")  # a client that ignores GOAWAY
    p.pump()
    assert p.take("server") == [ev.RequestRejected(sid, 0, "connection is draining (GOAWAY sent)")]
    assert ev.StreamReset(sid, ErrorCodes.REFUSED_STREAM, remote=True) in p.take("client")


# ---- hostile or broken peers -------------------------------------------------------------------


def raw_client(*, obey_settings: bool = True) -> tuple[h2.connection.H2Connection, HboneConnection]:
    """A plain h2 client; with ``obey_settings=False`` it never learns the server's limits."""
    raw = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    raw.initiate_connection()
    server = HboneConnection(client_side=False)
    preface = server.data_to_send()
    if obey_settings:
        raw.receive_data(preface)
    server.receive(raw.data_to_send())
    if obey_settings:
        raw.receive_data(server.data_to_send())
    return raw, server


def test_non_connect_gets_405() -> None:
    raw, server = raw_client()
    headers = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a:1")]
    raw.send_headers(1, headers, end_stream=True)
    events = server.receive(raw.data_to_send())
    assert events == [ev.RequestRejected(1, 405, "method 'GET' is not CONNECT"), ev.StreamEnded(1)]
    response = raw.receive_data(server.data_to_send())[0]
    assert isinstance(response, h2.events.ResponseReceived)
    assert response.headers == [(b":status", b"405")]


@pytest.mark.parametrize(
    "authority", ["server.default:80", "10.0.0.2", "10.0.0.2:0", "10.0.0.2:65536", "10.0.0.2:x"]
)
def test_bad_authority_gets_400(authority: str) -> None:
    raw, server = raw_client()
    raw.send_headers(1, [(":method", "CONNECT"), (":authority", authority)])
    (event,) = server.receive(raw.data_to_send())
    assert isinstance(event, ev.RequestRejected)
    assert event.status == 400
    assert authority in event.reason


def test_oversized_headers_close_the_connection() -> None:
    raw, server = raw_client()
    headers = [(":method", "CONNECT"), (":authority", "10.0.0.2:80"), ("x-big", "a" * 20000)]
    raw.send_headers(1, headers)
    (event,) = server.receive(raw.data_to_send())
    assert isinstance(event, ev.ConnectionFailed)
    assert event.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert server.failed and server.receive(b"more") == []


def test_connect_with_path_is_a_protocol_error() -> None:
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    raw.initiate_connection()
    server = HboneConnection(client_side=False)
    raw.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.2:80"), (":path", "/")])
    (event,) = server.receive(raw.data_to_send())
    assert isinstance(event, ev.ConnectionFailed)
    assert event.error_code == ErrorCodes.PROTOCOL_ERROR


def test_stream_flood_beyond_max_concurrent_streams_fails_connection() -> None:
    raw, server = raw_client(obey_settings=False)
    events: list[ev.Event] = []
    for i in range(101):
        raw.send_headers(2 * i + 1, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
        events += server.receive(raw.data_to_send())
    assert sum(isinstance(e, ev.TunnelRequested) for e in events) == 100
    assert isinstance(events[-1], ev.ConnectionFailed)


def test_rapid_reset_flood_fails_connection() -> None:
    raw, server = raw_client()
    events: list[ev.Event] = []
    for i in range(HboneSettings().max_pending_resets + 1):
        raw.send_headers(2 * i + 1, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
        raw.reset_stream(2 * i + 1)
        events += server.receive(raw.data_to_send())
    failed = [e for e in events if isinstance(e, ev.ConnectionFailed)]
    assert len(failed) == 1 and "rapid reset" in failed[0].reason
    assert (failed[0].error_code, failed[0].cause) == (ErrorCodes.ENHANCE_YOUR_CALM, "rapid_reset")


def test_garbage_bytes_fail_the_connection() -> None:
    server = HboneConnection(client_side=False)
    (event,) = server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(event, ev.ConnectionFailed)


# ---- helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("10.1.2.3:80", ("10.1.2.3", 80)), ("[fd00::1]:443", ("fd00::1", 443))],
)
def test_parse_authority(text: str, expected: tuple[str, int]) -> None:
    assert parse_authority(text) == expected


def test_parse_authority_rejects_names() -> None:
    with pytest.raises(AuthorityError, match="not an IP address"):
        parse_authority("example.com:80")


def _ipaddress_form(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _canonical_or_none(text: str) -> str | None:
    try:
        return canonical_ip(text)
    except ValueError:
        return None


@given(
    st.one_of(
        st.ip_addresses().map(str),
        st.lists(st.integers(0, 300).map(str), min_size=1, max_size=5).map(".".join),
        st.text(alphabet="0123456789abcdefx.:[]% \x00", max_size=20),
    )
)
def test_canonical_ip_agrees_with_ipaddress(text: str) -> None:
    assert _canonical_or_none(text) == _ipaddress_form(text)


def test_a_canonical_dotted_quad_is_not_parsed_by_ipaddress(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every CONNECT carries two (target, ``forwarded``): they take the C round trip."""

    def refuse(text: str) -> object:
        raise AssertionError(f"ipaddress parsed {text!r}")

    monkeypatch.setattr(ipaddress, "ip_address", refuse)
    assert parse_authority("10.244.1.17:8080") == ("10.244.1.17", 8080)
    assert parse_forwarded(format_forwarded("10.244.0.5")) == "10.244.0.5"


@pytest.mark.parametrize("ip", ["10.0.0.1", "fd00::7"])
def test_forwarded_round_trip(ip: str) -> None:
    assert parse_forwarded(format_forwarded(ip)) == ip


def test_forwarded_ignores_non_ip() -> None:
    assert parse_forwarded("for=_hidden;proto=https") is None
