"""HBONE's header blocks without ``h2``'s header path (``agent.proxy.hbone``): the CONNECT and
the answers framed by ``send_headers_on`` with ``TablelessEncoder``, received blocks decoded by
``LeanDecoder`` and checked by ``h2headers.check_block`` instead of ``h2``'s validation.

What must not change is what a peer sees and what the codec accepts: hypothesis sends blocks of
a stock ``h2`` peer (Huffman coding, dynamic table, several streams on one connection, valid and
malformed fields) to the codec and to an ``h2`` connection configured as HBONE's was before
(``h2wire.new_connection``: ``h2``'s own decoder and validation), and compares the outcomes;
and a stock ``h2`` peer decodes what the codec sends to the headers it was asked to send."""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy import h2data
from agent.proxy import hbone_events as ev
from agent.proxy.h2wire import HboneSettings, new_connection
from agent.proxy.hbone import HboneConnection, decode_headers

Fields = list[tuple[bytes, bytes]]
Outcome = tuple[Any, ...]

EXTRA_NAMES = [b"forwarded", b"nodemesh-service", b"x-a", b"X-Up", b"connection", b"te",
               b":path", b":scheme", b":protocol", b":status", b":method", b":authority",
               b"host", b"cookie", b"", b"a b"]  # fmt: skip
EXTRA_VALUES = [b"for=10.0.0.1", b'for="[fd00::1]"', b"default/web", b"trailers", b"gzip",
                b" lead", b"trail ", b"a\r\nb", b"nul\0", b"10.0.0.2:80", b"CONNECT", b"/", b"",
                b"x" * 40]  # fmt: skip
extras = st.lists(
    st.tuples(
        st.sampled_from(EXTRA_NAMES) | st.text("abc-:", max_size=6).map(str.encode),
        st.sampled_from(EXTRA_VALUES) | st.text("ab=;/ ", max_size=12).map(str.encode),
    ),
    max_size=4,
)
authorities = st.sampled_from([b"10.0.0.2:80", b"[fd00::2]:8443", b"web:80", b"10.0.0.2"])
requests = st.tuples(
    st.sampled_from([b"CONNECT", b"GET"]), authorities, extras, st.integers(0, 6)
).map(lambda r: _insert([(b":method", r[0]), (b":authority", r[1])], r[2], r[3]))
responses = st.tuples(st.sampled_from([b"200", b"503", b"401", b"100"]), extras, st.integers(0, 6))


def _insert(base: Fields, extra: Fields, at: int) -> Fields:
    """``extra`` inserted into ``base`` at ``at`` (past the end: appended)."""
    return base[:at] + extra + base[at:]


def stock_peer(*, client_side: bool) -> h2.connection.H2Connection:
    """A stock ``h2`` peer that sends whatever it is given: Huffman, dynamic table, no checks."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=client_side, validate_outbound_headers=False, header_encoding=None
        )
    )
    conn.initiate_connection()
    return conn


def _reference(received: list[h2.events.Event]) -> Outcome:
    """What the old HBONE connection (``h2``'s header path) made of one block."""
    for event in received:
        if isinstance(event, h2.events.RequestReceived | h2.events.ResponseReceived):
            return ("headers", decode_headers(event.headers or ()))
        if isinstance(event, h2.events.InformationalResponseReceived):
            return ("informational",)
    return ("nothing",)


def _expected_request(reference: Outcome) -> Outcome:
    """The codec's event kind for a request the reference decoded to ``reference``."""
    if reference[0] != "headers":
        return reference
    headers: dict[str, str] = reference[1]
    return ("request", headers) if headers[":method"] == "CONNECT" else ("rejected", 405)


def _ours_request(events: list[ev.Event]) -> Outcome:
    (event,) = [e for e in events if not isinstance(e, ev.StreamEnded)]
    if isinstance(event, ev.ConnectionFailed):
        return ("failed", event.error_code)
    if isinstance(event, ev.TunnelRequested):
        return ("request", event.headers)
    assert isinstance(event, ev.RequestRejected)
    return ("rejected", 405) if event.status == 405 else ("request", "400: " + event.reason)


@settings(max_examples=300, deadline=None)
@given(st.lists(requests, min_size=1, max_size=4))
def test_requests_from_a_stock_client_are_taken_as_h2s_header_path_took_them(
    blocks: list[Fields],
) -> None:
    client = stock_peer(client_side=True)
    ours = HboneConnection(client_side=False)
    reference = new_connection(client_side=False, settings=HboneSettings())
    preface = client.data_to_send()
    ours.receive(preface)
    reference.receive_data(preface)
    client.receive_data(ours.data_to_send())
    for i, block in enumerate(blocks):
        try:
            client.send_headers(2 * i + 1, block)
        except ProtocolError:  # the stock client's own state machine refused (":status: 1xx")
            return
        wire = client.data_to_send()
        try:
            expected = _expected_request(_reference(reference.receive_data(wire)))
        except ProtocolError:
            expected = ("failed", ErrorCodes.PROTOCOL_ERROR)
        got = _ours_request(ours.receive(wire))
        if got[0] == "request" and isinstance(got[1], str):  # refused as 400 by the codec
            assert expected[0] == "request", (block, expected, got)
        else:
            assert got == expected, block
        if expected[0] == "failed":
            return


@settings(max_examples=200, deadline=None)
@given(responses)
def test_answers_from_a_stock_server_are_taken_as_h2s_header_path_took_them(
    response: tuple[bytes, Fields, int],
) -> None:
    status, extra, at = response
    server = stock_peer(client_side=False)
    ours = HboneConnection(client_side=True)
    reference = new_connection(client_side=True, settings=HboneSettings())
    server.receive_data(ours.data_to_send())
    reference.data_to_send()  # the same preface and SETTINGS
    preface = server.data_to_send()
    ours.receive(preface)
    reference.receive_data(preface)
    sid = ours.open_tunnel("10.0.0.2:80", client_ip="10.0.0.1")
    server.receive_data(ours.data_to_send())
    reference.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
    reference.data_to_send()
    server.send_headers(sid, _insert([(b":status", status)], extra, at))
    wire = server.data_to_send()
    try:
        expected = _reference(reference.receive_data(wire))
    except ProtocolError:
        expected = ("failed",)
    got = ours.receive(wire)
    if expected[0] == "failed":
        (failed,) = got
        assert isinstance(failed, ev.ConnectionFailed)
        assert failed.error_code == ErrorCodes.PROTOCOL_ERROR
    elif expected[0] == "informational":
        assert got == []
    elif expected[1][":status"] == "200":
        assert got == [ev.TunnelAccepted(sid)]
    else:
        assert got == [ev.TunnelRefused(sid, int(status))]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["10.0.0.2:80", "[fd00::2]:443", "10.1.2.3:65535"]),
            st.sampled_from([None, "10.0.0.1", "fd00::1"]),
            st.sampled_from([None, "default/web", "team-a/api"]),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_a_stock_server_reads_the_connects_and_the_client_its_answers(
    tunnels: list[tuple[str, str | None, str | None]],
) -> None:
    """Both directions of one connection: the codec's CONNECTs as a stock ``h2`` server (with
    validation) decodes them, and its answers as a stock client decodes them."""
    client = HboneConnection(client_side=True)
    server = HboneConnection(client_side=False)
    stock_server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    stock_client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    stock_server.initiate_connection()
    stock_client.initiate_connection()
    client.receive(stock_server.data_to_send())
    stock_server.receive_data(client.data_to_send())
    server.receive(stock_client.data_to_send())
    stock_client.receive_data(server.data_to_send())
    for i, (authority, client_ip, service) in enumerate(tunnels):
        sid = client.open_tunnel(authority, client_ip=client_ip, service=service)
        # Besides the request: the WINDOW_UPDATE a new stream may bring (``agent.proxy.budget``)
        (request,) = [
            e
            for e in stock_server.receive_data(client.data_to_send())
            if not isinstance(e, h2.events.WindowUpdated)
        ]
        assert isinstance(request, h2.events.RequestReceived)
        expected = [(":method", "CONNECT"), (":authority", authority)]
        if client_ip:
            expected.append(("forwarded", f"for={client_ip}" if "." in client_ip else
                             f'for="[{client_ip}]"'))  # fmt: skip
        if service:
            expected.append(("nodemesh-service", service))
        assert [(bytes(k).decode(), bytes(v).decode()) for k, v in request.headers] == expected
        status = 200 if i % 2 == 0 else 503
        server_sid = 2 * i + 1
        stock_client.send_headers(server_sid, [(":method", "CONNECT"), (":authority", authority)])
        server.receive(stock_client.data_to_send())
        server.respond(server_sid, status)
        answer = stock_client.receive_data(server.data_to_send())
        assert isinstance(answer[0], h2.events.ResponseReceived)
        assert answer[0].headers == [(b":status", str(status).encode())]
        assert sid == server_sid


def test_header_blocks_are_sent_without_h2s_send_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kw: object) -> None:
        raise AssertionError("h2's send_headers ran")

    monkeypatch.setattr(h2.connection.H2Connection, "send_headers", refuse)
    client, server = HboneConnection(client_side=True), HboneConnection(client_side=False)
    server.receive(client.data_to_send())
    client.receive(server.data_to_send())
    events: list[ev.Event] = []
    for status in (200, 503):
        sid = client.open_tunnel("10.0.0.2:80", client_ip="10.0.0.1", service="default/web")
        wire = client.data_to_send()
        assert b"10.0.0.2:80" in wire and b"default/web" in wire  # literals, not Huffman
        server.receive(wire)
        server.respond(sid, status)
        events += client.receive(server.data_to_send())
    assert events[0] == ev.TunnelAccepted(1)
    assert ev.TunnelRefused(3, 503) in events


def test_a_whole_connect_is_taken_without_h2s_frame_parsing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, server = HboneConnection(client_side=True), HboneConnection(client_side=False)
    while wire := client.data_to_send():  # prefaces, SETTINGS and their ACKs
        server.receive(wire)
        client.receive(server.data_to_send())
    # The connection's first tunnel grants both connection windows (WINDOW_UPDATEs, which h2
    # parses: ``agent.proxy.budget``); a pooled connection's later ones find them open.
    first = client.open_tunnel("10.0.0.2:80")
    server.receive(client.data_to_send())
    server.respond(first, 200)
    client.receive(server.data_to_send())
    client.reset(first)
    server.receive(client.data_to_send())
    calls: list[bytes] = []
    real_receive = h2.connection.H2Connection.receive_data

    def counting(self: h2.connection.H2Connection, data: bytes) -> object:
        calls.append(data)
        return real_receive(self, data)

    monkeypatch.setattr(h2.connection.H2Connection, "receive_data", counting)
    sid = client.open_tunnel("10.0.0.2:80", client_ip="10.0.0.1")
    (request,) = server.receive(client.data_to_send())
    assert isinstance(request, ev.TunnelRequested) and request.authority == "10.0.0.2:80"
    server.respond(sid, 200)
    assert client.receive(server.data_to_send()) == [ev.TunnelAccepted(sid)]
    assert calls == []


@pytest.mark.parametrize(
    ("flags", "cut", "whole"),
    [
        (0x4, None, True),  # END_HEADERS
        (0x5, None, True),  # END_HEADERS | END_STREAM
        (0x0, None, False),  # CONTINUATION follows
        (0x4 | 0x20, None, False),  # PRIORITY
        (0x4 | 0x8, None, False),  # PADDED
        (0x4, 12, False),  # the frame split across two reads
    ],
)
def test_the_splitter_hands_over_only_whole_simple_header_frames(
    flags: int, cut: int | None, whole: bool
) -> None:
    splitter = h2data.InboundSplitter(max_frame_size=1 << 20)
    frame = h2data.headers_frame(3, flags, b"\x82\x84\x86" + b"x" * 20)
    reads = [frame] if cut is None else [frame[:cut], frame[cut:]]
    tokens = [t for read in reads for t in splitter.feed(read)]
    if whole:
        assert tokens == [(h2data.HEADERS, 3, flags, 0, frame[9:])]
    else:
        assert {t[0] for t in tokens} == {h2data.H2}
        assert b"".join(t[4] for t in tokens) == frame
