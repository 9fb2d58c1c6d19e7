"""A hostile HBONE peer at the codec level: every pattern of issue 15 is refused with the right
HTTP/2 error and what it makes the server hold stays under the documented bound; ordinary peers
that look similar (a pinger that reads, sequential cancels, refused streams) are not refused."""

from __future__ import annotations

import dataclasses

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hpack import Encoder

from agent.proxy import hbone_events as ev
from agent.proxy.h2wire import MIB, HboneSettings
from agent.proxy.hbone import HboneConnection
from agent.proxy.hbone_events import Cause
from agent.proxy.hbone_limits import (
    MAX_STREAM_WINDOW,
    MAX_WRITE,
    MIN_STREAM_WINDOW,
    connection_memory_bound,
    with_stream_window,
)
from agent.proxy.relay import MAX_CHUNK
from tests.unit.proxy import hostile
from tests.unit.proxy.hostile import END_HEADERS, HEADERS, PING, RST_STREAM, Attack, frame
from tests.unit.proxy.test_hbone import raw_client

BOUND = connection_memory_bound(HboneSettings())

EXPECTED = {
    "ping_flood": (ErrorCodes.ENHANCE_YOUR_CALM, Cause.CONTROL_FLOOD),
    "settings_flood": (ErrorCodes.ENHANCE_YOUR_CALM, Cause.CONTROL_FLOOD),
    "data_on_reset_streams": (ErrorCodes.ENHANCE_YOUR_CALM, Cause.CONTROL_FLOOD),
    "many_streams_times_window": (ErrorCodes.FLOW_CONTROL_ERROR, Cause.FLOW_CONTROL),
    "data_before_connect_answered": (ErrorCodes.FLOW_CONTROL_ERROR, Cause.FLOW_CONTROL),
    "headers_continuation_flood": (ErrorCodes.ENHANCE_YOUR_CALM, Cause.OVERSIZED_FRAME),
    "header_block_flood": (ErrorCodes.ENHANCE_YOUR_CALM, Cause.HEADER_BLOCK),
    "rapid_reset": (ErrorCodes.ENHANCE_YOUR_CALM, Cause.RAPID_RESET),
}


def test_the_documented_bound_is_at_most_18_mib() -> None:
    assert BOUND <= 18 * MIB  # 17.5 MiB with the default 4 MiB / 16 MiB windows (ARCHITECTURE.md)
    assert MAX_WRITE == MAX_CHUNK  # the bound assumes the relay's largest write


# What ``--hbone-window`` allows, ends and middle included, next to the defaults.
WINDOWS = [MIN_STREAM_WINDOW, 1 * MIB, 4 * MIB, MAX_STREAM_WINDOW]


@pytest.mark.parametrize("window", [None, *WINDOWS])
@pytest.mark.parametrize("name", list(hostile.PATTERNS))
def test_each_hostile_pattern_is_refused_and_bounded(name: str, window: int | None) -> None:
    pattern, total = hostile.PATTERNS[name]
    settings = HboneSettings() if window is None else with_stream_window(window)
    attack = Attack(settings=settings)
    peak = 0
    send = attack.send

    def send_and_measure(wire: bytes) -> None:
        nonlocal peak
        send(wire)
        peak = max(peak, attack.held())

    attack.send = send_and_measure  # type: ignore[method-assign]
    pattern(attack, total)
    failed = attack.failed
    assert failed is not None, f"{name} was never refused"
    assert (failed.error_code, failed.cause) == EXPECTED[name]
    assert peak <= connection_memory_bound(settings)
    assert attack.server.receive(frame(PING, 0, 0, b"12345678")) == []  # failed for good


def test_replies_the_peer_reads_are_not_a_flood() -> None:
    attack = Attack()
    ping = frame(PING, 0, 0, b"12345678") * 1000
    for _ in range(20):  # 340 KB of PINGs, each read answered and written
        attack.send(ping)
        attack.server.output_accepted()
    assert attack.failed is None


def test_data_is_given_back_when_consumed_or_dropped() -> None:
    attack = Attack()
    kept, dropped = attack.open(), attack.open()
    attack.data(kept, 1000)
    attack.data(dropped, 3000)
    assert attack.server.held_bytes() == 4000
    attack.server.consumed(kept, 1000)
    attack.send(frame(RST_STREAM, 0, dropped, bytes(4)))
    attack.server.consumed(dropped, 3000)  # what the owner had queued for the reset stream
    assert attack.server.held_bytes() == 0


def test_sequential_cancels_never_trip_rapid_reset() -> None:
    """A client whose per-try timeout cancels a pending CONNECT, one at a time, forever (a
    burst still trips it: ``test_hbone.test_rapid_reset_flood_fails_connection``)."""
    raw, server = raw_client()
    for i in range(3 * HboneSettings().max_pending_resets):
        sid = 2 * i + 1
        raw.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
        (req,) = server.receive(raw.data_to_send())
        assert isinstance(req, ev.TunnelRequested)
        raw.reset_stream(sid, ErrorCodes.CANCEL)
        assert server.receive(raw.data_to_send()) == [
            ev.StreamReset(sid, ErrorCodes.CANCEL, remote=True)
        ]
        server.request_done(sid)  # the handler saw the reset and stopped
    assert not server.failed


def test_answering_a_reset_stream_sends_nothing_and_releases_it() -> None:
    raw, server = raw_client()
    raw.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.2:80")])
    server.receive(raw.data_to_send())
    raw.reset_stream(1)
    server.receive(raw.data_to_send())
    server.respond(1, 503)  # the handler finished connecting only now
    assert server.data_to_send() == b""


def raw_server_with_open_tunnel() -> tuple[h2.connection.H2Connection, HboneConnection, int]:
    """A plain h2 server (that may send any header) and our client codec with a CONNECT sent."""
    raw = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, validate_outbound_headers=False)
    )
    raw.initiate_connection()
    client = HboneConnection(client_side=True)
    raw.receive_data(bytes(client.data_to_send()))
    client.receive(raw.data_to_send())
    sid = client.open_tunnel("10.0.0.2:80")
    raw.receive_data(bytes(client.data_to_send()))
    return raw, client, sid


def test_a_refusal_without_reset_is_closed_by_the_client() -> None:
    """A server that only ends its half (as a plain h2 server does): the client resets."""
    raw, client, sid = raw_server_with_open_tunnel()
    raw.send_headers(sid, [(":status", "503")], end_stream=True)
    assert ev.TunnelRefused(sid, 503) in client.receive(raw.data_to_send())
    assert client.open_streams == 0
    events = raw.receive_data(bytes(client.data_to_send()))
    assert any(isinstance(e, h2.events.StreamReset) for e in events)
    assert raw.open_inbound_streams == 0


def test_invalid_utf8_in_a_request_header_is_a_clean_protocol_error() -> None:
    raw, server = raw_client()
    block = Encoder().encode([(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:80\xff")])
    (failed,) = server.receive(frame(HEADERS, END_HEADERS, 1, block))
    assert isinstance(failed, ev.ConnectionFailed)
    assert (failed.error_code, failed.cause) == (ErrorCodes.PROTOCOL_ERROR, Cause.INVALID_HEADER)
    (goaway,) = raw.receive_data(bytes(server.data_to_send()))
    assert isinstance(goaway, h2.events.ConnectionTerminated)
    assert goaway.error_code == ErrorCodes.PROTOCOL_ERROR


def test_invalid_utf8_in_a_response_header_fails_the_client_cleanly() -> None:
    raw, client, sid = raw_server_with_open_tunnel()
    raw.send_headers(sid, [(b":status", b"200"), (b"x-note", b"caf\xe9")])
    (failed,) = client.receive(raw.data_to_send())
    assert isinstance(failed, ev.ConnectionFailed)
    assert (failed.error_code, failed.cause) == (ErrorCodes.PROTOCOL_ERROR, Cause.INVALID_HEADER)
    events = raw.receive_data(bytes(client.data_to_send()))
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)


def test_any_other_failure_inside_h2_is_a_counted_rejection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """h2 parses hostile bytes: an exception that is not a ProtocolError still fails only that
    connection, cleanly, with a cause."""
    raw, server = raw_client()

    def broken(data: bytes) -> list[object]:
        raise ValueError("a bug in h2 reached by odd bytes")

    monkeypatch.setattr(server._h2, "receive_data", broken)
    raw.ping(b"12345678")
    (failed,) = server.receive(raw.data_to_send())
    assert isinstance(failed, ev.ConnectionFailed)
    assert (failed.error_code, failed.cause) == (ErrorCodes.PROTOCOL_ERROR, Cause.UNPARSEABLE)
    assert server.failed


@pytest.mark.parametrize("window", WINDOWS)
def test_a_window_choice_keeps_the_connection_four_streams_wide(window: int) -> None:
    settings = with_stream_window(window)
    assert settings.connection_window == 4 * settings.stream_window == 4 * window
    rest = dataclasses.replace(settings, stream_window=0, connection_window=0)
    assert rest == dataclasses.replace(HboneSettings(), stream_window=0, connection_window=0)
    # the bound moves with the connection window alone
    assert connection_memory_bound(settings) - settings.connection_window == (
        BOUND - HboneSettings().connection_window
    )


@pytest.mark.parametrize("window", [MIN_STREAM_WINDOW - 1, MAX_STREAM_WINDOW + 1, 0])
def test_a_window_outside_the_range_is_refused(window: int) -> None:
    with pytest.raises(ValueError, match="outside 64 KiB to 16 MiB"):
        with_stream_window(window)
