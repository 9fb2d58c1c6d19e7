"""What one HBONE stream costs the codec from open to close, counted (issue 18, session 12).

Each test drives whole streams through a client and a server codec wired back to back (CONNECT,
200, 100 bytes each way, both ends, as a proxied connection does) and counts a call, an object
or a wake-up that the stream no longer pays for; the stream's events and bytes are checked too,
so a count cannot be bought by dropping behaviour.
"""

from __future__ import annotations

import sys
from typing import Any

import h2.config
import h2.connection
import h2.settings
import h2.stream
import pytest

from agent.proxy import h2wire, hbone
from agent.proxy import hbone_events as ev
from agent.proxy.hbone import HboneConnection
from tests.unit.proxy.test_hbone import Pair, data_of


def stream_life(p: Pair) -> int:
    """One proxied connection's stream: CONNECT, 200, 100 bytes each way, both halves ended,
    everything the peer sent consumed; checks the events each side saw."""
    sid = p.client.open_tunnel("10.0.0.2:8080", client_ip="10.0.0.1", service="default/server")
    p.pump()
    (req,) = p.take("server")
    assert isinstance(req, ev.TunnelRequested) and req.forwarded_for == "10.0.0.1"
    assert req.headers["nodemesh-service"] == "default/server"
    p.server.respond(sid, 200)
    p.pump()
    assert p.take("client") == [ev.TunnelAccepted(sid)]
    p.client.send(sid, b"c" * 100)
    p.client.end_stream(sid)
    p.pump()
    events = p.take("server")
    assert data_of(events, sid) == b"c" * 100 and events[-1] == ev.StreamEnded(sid)
    p.server.consumed(sid, 100)
    p.server.send(sid, b"s" * 100)
    p.server.end_stream(sid)
    p.pump()
    events = p.take("client")
    assert data_of(events, sid) == b"s" * 100 and events[-1] == ev.StreamEnded(sid)
    p.client.consumed(sid, 100)
    p.server.request_done(sid)
    for codec in (p.client, p.server):
        codec.release(sid)
        assert h2wire.stream_state(codec._h2, sid) in (None, h2.stream.StreamState.CLOSED)
    return sid


def test_a_streams_life_copies_no_output_out_of_h2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The codec takes ``h2``'s queued output before every frame it builds and around every
    frame it hands ``h2``, most times with nothing queued: ``h2``'s ``data_to_send`` copied the
    queue into new bytes and made a new queue each time. ``h2wire.move_output`` and
    ``take_output`` move the bytes themselves; the peer still gets every frame (the stream's
    life completes on both sides)."""
    p = Pair()
    stream_life(p)
    calls = []
    real = h2.connection.H2Connection.data_to_send

    def counted(self: h2.connection.H2Connection, amount: int | None = None) -> bytes:
        calls.append(amount)
        return real(self, amount)

    monkeypatch.setattr(h2.connection.H2Connection, "data_to_send", counted)
    for _ in range(3):
        stream_life(p)
    assert calls == []


def test_output_queued_by_h2_leaves_in_order_with_ours() -> None:
    """What ``h2`` queued (a PING's ACK) goes out before a frame the codec builds after it, and
    ``data_to_send`` hands out each byte once."""
    p = Pair()
    sid = p.open()
    p.client.ping()
    p.server.receive(p.client.data_to_send())  # the ACK waits in h2's queue
    p.server.send(sid, b"after the ack")
    wire = p.server.data_to_send()
    assert p.server.data_to_send() == b""
    events = p.client.receive(wire)
    assert [type(e) for e in events] == [ev.PingAcknowledged, ev.DataReceived]


def test_a_new_stream_looks_up_no_stream_id_parity_enum(monkeypatch: pytest.MonkeyPatch) -> None:
    """``AllowedStreamIDs(client_side)`` is an enum look-up by value, made for every stream on
    each side; the two members are constants now."""

    def refuse(*_args: object) -> None:
        raise AssertionError("AllowedStreamIDs looked up per stream")

    monkeypatch.setattr(h2wire, "AllowedStreamIDs", refuse)
    p = Pair()
    for _ in range(3):
        stream_life(p)


def test_a_pooled_streams_connect_and_answer_are_checked_and_decoded_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pooled connection carries the same CONNECT (target, client, Service) again and again,
    and every answer is ``:status: 200``: each was checked (``check_block``), decoded into a
    dict and parsed (target, ``forwarded``) per stream. Now the server keeps what it found for
    a CONNECT's fields, and the client takes the bare 200 as accepted; the events are the
    same (``stream_life`` checks them)."""
    p = Pair()
    stream_life(p)
    calls: list[str] = []
    for name in ("check_block", "decode_headers", "parse_authority", "parse_forwarded"):
        real = getattr(hbone, name)

        def counted(*args: Any, _real: Any = real, _name: str = name) -> Any:
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(hbone, name, counted)
    for _ in range(3):
        stream_life(p)
    assert calls == []


def test_a_pooled_streams_connect_and_answer_are_encoded_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CONNECT of a pooled connection's target and every 200 were encoded and scanned (for
    their method, authority and whether they are informational) for each stream: seven calls
    a stream, 21 in three streams' lives. Now the client encodes and scans a target's CONNECT
    once and the 200 is prepared at import (``h2wire.header_block``); the peer reads the same
    streams (``stream_life`` checks the events)."""
    p = Pair()
    stream_life(p)
    calls: list[str] = []
    real_encode = h2wire.TablelessEncoder.encode

    def encode(self: h2wire.TablelessEncoder, headers: Any, huffman: bool = False) -> bytes:
        calls.append("encode")
        return real_encode(self, headers, huffman)

    monkeypatch.setattr(h2wire.TablelessEncoder, "encode", encode)
    for name in ("is_informational_response", "extract_method_header", "authority_from_headers"):
        real = getattr(h2wire, name)

        def counted(headers: Any, _real: Any = real, _name: str = name) -> Any:
            if sys._getframe(1).f_code.co_name != "_stream_headers":  # a received block's
                calls.append(_name)
            return _real(headers)

        monkeypatch.setattr(h2wire, name, counted)
    for _ in range(3):
        stream_life(p)
    assert calls == []


def test_a_clients_connect_fields_are_built_once_per_target(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = Pair()
    made: list[str] = []
    real = hbone.format_forwarded

    def counted(client_ip: str) -> str:
        made.append(client_ip)
        return real(client_ip)

    monkeypatch.setattr(hbone, "format_forwarded", counted)
    for _ in range(3):
        stream_life(p)
    sid = p.client.open_tunnel("10.0.0.2:8080", client_ip="10.0.0.9")
    p.pump()
    (req,) = p.take("server")
    assert isinstance(req, ev.TunnelRequested) and (req.stream_id, req.forwarded_for) == (
        sid,
        "10.0.0.9",
    )
    assert made == ["10.0.0.1", "10.0.0.9"]


def raw_client() -> tuple[h2.connection.H2Connection, HboneConnection]:
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
    )
    raw.initiate_connection()
    server = HboneConnection(client_side=False)
    server.receive(raw.data_to_send())
    raw.receive_data(bytes(server.data_to_send()))
    return raw, server


CONNECT = [
    (b":method", b"CONNECT"),
    (b":authority", b"10.0.0.2:80"),
    (b"forwarded", b"for=1.2.3.4"),
]


def test_a_kept_connect_is_a_fresh_event_and_other_fields_take_the_full_path() -> None:
    """Fields seen before get the same event (a dict of their own); the same fields with one
    more, malformed, fail the connection as ever; a draining connection refuses a kept one."""
    raw, server = raw_client()
    events = []
    for sid in (1, 3):
        raw.send_headers(sid, CONNECT)
        (req,) = server.receive(raw.data_to_send())
        assert isinstance(req, ev.TunnelRequested)
        assert (req.stream_id, req.host, req.port, req.forwarded_for) == (
            sid,
            "10.0.0.2",
            80,
            "1.2.3.4",
        )
        events.append(req)
    events[0].headers["x"] = "changed by its owner"
    assert events[1].headers == {
        ":method": "CONNECT",
        ":authority": "10.0.0.2:80",
        "forwarded": "for=1.2.3.4",
    }
    server.goaway()
    raw.send_headers(5, CONNECT)
    (refused,) = server.receive(raw.data_to_send())
    assert isinstance(refused, ev.RequestRejected) and refused.stream_id == 5
    raw, server = raw_client()
    raw.send_headers(1, CONNECT)
    server.receive(raw.data_to_send())
    raw.send_headers(3, [*CONNECT, (b"connection", b"close")])
    (failed,) = server.receive(raw.data_to_send())
    assert isinstance(failed, ev.ConnectionFailed) and failed.cause == "protocol_error"


def test_the_kept_connects_are_bounded_per_connection() -> None:
    raw, server = raw_client()
    for i in range(20):
        sid = 2 * i + 1
        raw.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:%d" % (i + 1))])
        (req,) = server.receive(raw.data_to_send())
        assert isinstance(req, ev.TunnelRequested) and req.port == i + 1
        server.respond(sid, 503)
        raw.receive_data(bytes(server.data_to_send()))
    assert 0 < len(server._connects) <= hbone._CONNECTS
    server._connects.clear()
    raw.send_headers(41, [*CONNECT, (b"x-long", b"v" * hbone._CONNECT_BYTES)])
    (req,) = server.receive(raw.data_to_send())
    assert isinstance(req, ev.TunnelRequested) and not server._connects


def test_a_new_stream_is_made_without_h2s_key_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """``H2Connection._get_or_create_stream`` looks the stream up, catches the ``KeyError``
    and calls ``_begin_new_stream``: for a stream known to be new (the CONNECT sent, the
    CONNECT received) ``h2wire`` calls ``_begin_new_stream`` itself."""

    def refuse(*_args: object) -> None:
        raise AssertionError("_get_or_create_stream called for a new stream")

    monkeypatch.setattr(h2.connection.H2Connection, "_get_or_create_stream", refuse)
    p = Pair()
    for _ in range(3):
        stream_life(p)


def test_a_streams_life_feeds_h2s_stream_machines_without_process_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each stream input went through ``H2StreamStateMachine.process_input`` (an ``isinstance``
    and a Python-level ``Enum.__hash__`` per input, 12 a proxied connection); a new stream
    through ``_begin_new_stream`` (three no-op debug calls, the settings read through
    properties and ``Settings.__getitem__``); a received END_STREAM through
    ``H2Stream.receive_data``. ``h2wire`` does each itself (reaches 10, 15, 16): none of them
    is called in three streams' lives, which still complete on both sides."""
    p = Pair()
    stream_life(p)
    calls: list[str] = []

    def refuse(name: str, real: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return counted

    for owner, name in (
        (h2.stream.H2StreamStateMachine, "process_input"),
        (h2.stream.H2Stream, "receive_data"),
        (h2.connection.H2Connection, "_begin_new_stream"),
        (h2.settings.Settings, "__getitem__"),
    ):
        monkeypatch.setattr(owner, name, refuse(name, getattr(owner, name)))
    for _ in range(3):
        stream_life(p)
    assert calls == []
