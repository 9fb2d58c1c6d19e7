"""The HBONE codec once its connection failed (a protocol error from the peer) or was closed:
its GOAWAY then was the last frame, so what the owner may still ask of it (a drain's
``goaway``, the keepalive's ``ping``) sends nothing more and raises nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agent.proxy import hbone_events as ev
from agent.proxy.hbone import HboneConnection
from tests.unit.proxy.test_hbone import Pair


def _failed_by_the_peer() -> HboneConnection:
    """A server whose client sent bytes that are not HTTP/2: ``ConnectionFailed``."""
    server = HboneConnection(client_side=False)
    (event,) = server.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(event, ev.ConnectionFailed)
    return server


def _closed_by_its_owner() -> HboneConnection:
    """A client with an open tunnel whose owner closed the connection (``close``)."""
    p = Pair()
    p.open()
    p.client.close()
    return p.client


ENDED: list[Callable[[], HboneConnection]] = [_failed_by_the_peer, _closed_by_its_owner]


@pytest.mark.parametrize("ended", ENDED, ids=["failed", "closed"])
def test_goaway_after_the_end_sends_no_second_goaway(ended: Callable[[], HboneConnection]) -> None:
    """The GOAWAY the failure (or ``close``) queued is the only one: a drain that reaches the
    connection afterwards marks it going away and frames nothing. Before, ``h2`` framed a
    second GOAWAY (17 bytes) for a transport that was closing."""
    codec = ended()
    assert codec.data_to_send()  # the end's own GOAWAY
    codec.goaway()
    assert codec.data_to_send() == b""
    assert codec.going_away and not codec.can_open_stream()
    codec.goaway()  # and again: still nothing
    assert codec.data_to_send() == b""


@pytest.mark.parametrize("ended", ENDED, ids=["failed", "closed"])
def test_ping_after_the_end_is_a_no_op(ended: Callable[[], HboneConnection]) -> None:
    """No PING goes out on an ended connection and none is awaited: ``ping`` answers None
    (the keepalive then holds no outstanding PING). Before, ``h2`` raised ProtocolError."""
    codec = ended()
    codec.data_to_send()
    assert codec.ping() is None
    assert codec.data_to_send() == b""
