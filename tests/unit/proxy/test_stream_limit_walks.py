"""A new stream's limit check on either side of a CONNECT counts h2's open streams (a walk over
every stream it knows) only when enough streams are known to reach the limit
(``h2wire.WALK_FROM``); the limit itself holds as before, and closed streams are still
forgotten, by the walk, once that many are known."""

from __future__ import annotations

import dataclasses

import h2.connection
import h2.settings
import pytest
from h2.exceptions import TooManyStreamsError

from agent.proxy import h2wire
from agent.proxy.h2proxy import H2Limits
from agent.proxy.h2proxy import new_connection as new_proxy_connection
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


def test_h2proxys_connections_walk_on_every_new_stream_as_h2_does(walks: list[str]) -> None:
    """Only HBONE's connections skip the walk: ``H2Proxy``'s are held to ``h2``'s own stream
    table (closed streams forgotten at the next stream), which its equivalence tests compare."""
    hbone = h2wire.new_connection(client_side=True, settings=HboneSettings())
    proxy = new_proxy_connection(client_side=True, limits=H2Limits())
    assert hbone.walk_from == h2wire.WALK_FROM
    assert proxy.walk_from == 0
    request = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")]
    for sid in (1, 3, 5):
        h2wire.send_headers_on(proxy, sid, request, end_stream=True)
    assert len(walks) == 3


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
