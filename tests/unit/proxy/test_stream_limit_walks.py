"""A new stream's limit check on either side of a CONNECT counts h2's open streams (a walk over
every stream it knows) only when enough streams are known to reach the limit
(``h2wire.WALK_FROM``); the limit itself holds as before, and closed streams are still
forgotten, by the walk, once that many are known."""

from __future__ import annotations

import dataclasses

import h2.config
import h2.connection
import h2.settings
import pytest
from h2.errors import ErrorCodes
from h2.exceptions import TooManyStreamsError
from hyperframe.frame import (
    DataFrame,
    Frame,
    HeadersFrame,
    PriorityFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)

from agent.proxy import h2wire
from agent.proxy.h2limits import H2Limits
from agent.proxy.h2limits import new_connection as new_proxy_connection
from agent.proxy.h2wire import HboneSettings
from tests.unit.proxy.test_hbone import Pair


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    counted: list[str] = []
    for name in ("open_outbound_streams", "open_inbound_streams"):
        walk = getattr(h2.connection.H2Connection, name)

        def counting(conn: h2.connection.H2Connection, walk: property = walk, n: str = name) -> int:
            counted.append(n)
            return walk.fget(conn)  # type: ignore[misc]

        monkeypatch.setattr(h2.connection.H2Connection, name, property(counting))
    return counted


def _one_stream(p: Pair) -> None:
    """Open a tunnel, answer it, end it both ways: what each proxied connection does."""
    sid = p.open()
    p.client.end_stream(sid)
    p.server.end_stream(sid)
    p.pump()
    p.take("client"), p.take("server")


def test_streams_one_after_another_are_counted_once_per_walk_from_streams(
    walks: list[str],
) -> None:
    p = Pair()
    for _ in range(64):
        _one_stream(p)
    # Before: two walks per stream (the CONNECT sent, and received): 128.
    assert len(walks) <= 2 * (64 // (h2wire.WALK_FROM - 1) + 1)
    for codec in (p.client, p.server):
        assert len(codec._h2.streams) <= h2wire.WALK_FROM  # closed ones forgotten by the walk


def test_the_peers_stream_limit_still_holds_below_walk_from() -> None:
    p = Pair(dataclasses.replace(HboneSettings(), max_concurrent_streams=3))
    assert h2wire.WALK_FROM > 3
    for _ in range(3):
        p.open()
    with pytest.raises(TooManyStreamsError):
        h2wire.send_headers_on(p.client._h2, 7, [(b":method", b"CONNECT")], end_stream=False)


def test_the_limit_still_holds_with_closed_streams_known(walks: list[str]) -> None:
    """Closed streams the walk has not forgotten yet count as known, not as open."""
    p = Pair(dataclasses.replace(HboneSettings(), max_concurrent_streams=3))
    for _ in range(5):
        _one_stream(p)
    for _ in range(3):
        p.open()
    with pytest.raises(TooManyStreamsError):
        h2wire.send_headers_on(p.client._h2, 99, [(b":method", b"CONNECT")], end_stream=False)


def test_h2proxys_connections_walk_from_walk_from_streams_as_hbones_do(walks: list[str]) -> None:
    """``H2Proxy``'s connections skip the walk as HBONE's do (``walk_from``): fewer streams
    known than ``WALK_FROM`` cannot be at a limit of more (they walked at every new stream,
    two walks per proxied call)."""
    hbone = h2wire.new_connection(client_side=True, settings=HboneSettings())
    proxy = new_proxy_connection(client_side=True, limits=H2Limits())
    assert hbone.walk_from == proxy.walk_from == h2wire.WALK_FROM
    request = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
    for sid in (1, 3, 5):
        h2wire.send_headers_on(proxy, sid, request, end_stream=True)
    assert walks == []


_REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a"), (b":authority", b"a")]
_RESPONSE = [(b":status", b"200")]


def _closed_streams(proxy_is_client: bool) -> tuple[h2.connection.H2Connection, object]:
    """A proxy connection (``H2Proxy``'s, on either side) whose streams 1, 3, 5 are closed,
    each its own way: 1 ended both ways, 3 reset by the proxy, 5 reset by the peer; and the
    peer (an ``h2`` connection) that sends the late frames."""
    proxy = new_proxy_connection(client_side=proxy_is_client, limits=H2Limits())
    peer = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=not proxy_is_client, header_encoding=None)
    )
    peer.initiate_connection()
    for _ in range(2):
        h2wire.receive_on(proxy, peer.data_to_send())
        peer.receive_data(proxy.data_to_send())
    opener, answerer = (proxy, peer) if proxy_is_client else (peer, proxy)
    for sid in (1, 3, 5):
        if opener is proxy:
            h2wire.send_headers_on(proxy, sid, _REQUEST, end_stream=sid == 1)
            peer.receive_data(proxy.data_to_send())
        else:
            peer.send_headers(sid, _REQUEST, end_stream=sid == 1)
            h2wire.receive_on(proxy, peer.data_to_send())
    if answerer is proxy:
        h2wire.send_headers_on(proxy, 1, _RESPONSE, end_stream=True)
        peer.receive_data(proxy.data_to_send())
    else:
        peer.send_headers(1, _RESPONSE, end_stream=True)
        h2wire.receive_on(proxy, peer.data_to_send())
    proxy.reset_stream(3)
    peer.receive_data(proxy.data_to_send())
    peer.reset_stream(5)
    h2wire.receive_on(proxy, peer.data_to_send())
    assert all(proxy.streams[sid].closed for sid in (1, 3, 5))
    return proxy, peer


def _late_frame(peer: h2.connection.H2Connection, kind: str, sid: int) -> bytes:
    """A frame of ``kind`` from the peer on ``sid``, as bytes (``h2`` would refuse to send
    most of them on a closed stream)."""
    frame: Frame
    if kind == "data":
        frame = DataFrame(sid, b"late", flags=["END_STREAM"])
    elif kind == "headers":
        block = peer.encoder.encode([(b"grpc-status", b"0")])
        frame = HeadersFrame(sid, block, flags=["END_HEADERS", "END_STREAM"])
    elif kind == "rst":
        frame = RstStreamFrame(sid, error_code=ErrorCodes.CANCEL)
    elif kind == "window":
        frame = WindowUpdateFrame(sid, window_increment=100)
    else:
        frame = PriorityFrame(sid, depends_on=0, stream_weight=16)
    return frame.serialize()


@pytest.mark.parametrize("proxy_is_client", [True, False])
@pytest.mark.parametrize("kind", ["data", "headers", "rst", "window", "priority"])
@pytest.mark.parametrize("sid", [1, 3, 5])
def test_a_late_frame_on_a_closed_stream_is_answered_alike_kept_or_forgotten(
    proxy_is_client: bool, kind: str, sid: int
) -> None:
    """A closed stream a proxy connection still knows (no walk since it closed: up to
    ``WALK_FROM`` of them) and one the walk forgot get the same answer to every kind of frame
    the peer may send late on it, however it was closed: the same events, output, refusal, and
    then the same answer to a new stream."""
    outcomes = []
    for forget in (False, True):
        proxy, peer = _closed_streams(proxy_is_client)
        if forget:
            assert proxy.open_outbound_streams + proxy.open_inbound_streams == 0
            assert not proxy.streams
        else:
            assert len(proxy.streams) == 3
        try:
            events = h2wire.receive_on(proxy, _late_frame(peer, kind, sid))
            outcome: object = [(type(e).__name__, getattr(e, "stream_id", None)) for e in events]
        except Exception as e:
            outcome = type(e).__name__
        after = bytes(proxy.data_to_send())
        if isinstance(outcome, str):
            outcomes.append((outcome, after))
            continue
        if proxy_is_client:  # and a new stream still goes as before
            h2wire.send_headers_on(proxy, 7, _REQUEST, end_stream=True)
        else:
            peer.send_headers(7, _REQUEST, end_stream=True)
            outcome += [(type(e).__name__, getattr(e, "stream_id", None))
                        for e in h2wire.receive_on(proxy, peer.data_to_send())]  # fmt: skip
        outcomes.append((outcome, after, bytes(proxy.data_to_send())))
    assert outcomes[0] == outcomes[1]


def test_a_caller_that_counted_already_makes_no_one_read_the_peers_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``below_limit``: ``H2Proxy`` counted the upstream's open streams against its limit just
    before; the peer's settings are not read again."""
    proxy = new_proxy_connection(client_side=True, limits=H2Limits())
    request = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
    reads: list[int] = []
    read = h2wire.max_concurrent_streams

    def counting(settings: h2.settings.Settings) -> int:
        reads.append(1)
        return read(settings)

    monkeypatch.setattr(h2wire, "max_concurrent_streams", counting)
    h2wire.send_headers_on(proxy, 1, request, end_stream=True, below_limit=True)
    assert reads == []
    h2wire.send_headers_on(proxy, 3, request, end_stream=True)
    assert reads == [1]  # without ``below_limit`` the limit is read, and checked
