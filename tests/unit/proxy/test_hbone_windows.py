"""Every window ``nodemesh agent --hbone-window`` allows keeps what the windows are for: a pod
that stops reading holds exactly its stream's window, leaves the other streams flowing, and
only ``STREAMS_PER_CONNECTION_WINDOW`` such streams stall the connection."""

from __future__ import annotations

import pytest

from agent.proxy import hbone_events as ev
from agent.proxy.h2wire import KIB, MIB, HboneSettings
from agent.proxy.hbone_limits import (
    MAX_STREAM_WINDOW,
    MIN_STREAM_WINDOW,
    STREAMS_PER_CONNECTION_WINDOW,
    with_stream_window,
)
from tests.unit.proxy.test_hbone import Pair, data_of

WINDOWS = [MIN_STREAM_WINDOW, 512 * KIB, 1 * MIB, 4 * MIB, MAX_STREAM_WINDOW]


def stalled(p: Pair, streams: int, offered: int) -> list[int]:
    """``streams`` tunnels whose receivers never consume, each offered ``offered`` bytes."""
    sids = [p.open(f"10.0.0.{2 + i}:80") for i in range(streams)]
    for sid in sids:
        p.client.send(sid, b"x" * offered)
    p.pump()
    return sids


@pytest.mark.parametrize("window", WINDOWS)
def test_a_stalled_stream_holds_its_window_and_leaves_another_flowing(window: int) -> None:
    p = Pair(with_stream_window(window))
    (slow,) = stalled(p, 1, 2 * window)
    assert len(data_of(p.take("server"), slow)) == window
    assert p.client.buffered(slow) == window
    fast = p.open("10.0.0.99:80")
    total = 2 * STREAMS_PER_CONNECTION_WINDOW * window  # more than the connection window
    p.client.send(fast, b"y" * total)
    got = 0
    for _ in range(1000):
        p.pump()
        for e in p.take("server"):
            if isinstance(e, ev.DataReceived) and e.stream_id == fast:
                got += len(e.data)
                p.server.consumed(fast, len(e.data))
        if got == total:
            break
    assert got == total
    assert p.client.buffered(slow) == window


@pytest.mark.parametrize("window", WINDOWS)
def test_as_many_stalled_streams_as_the_ratio_stall_the_connection(window: int) -> None:
    settings = with_stream_window(window)
    p = Pair(settings)
    sids = stalled(p, STREAMS_PER_CONNECTION_WINDOW, window)  # each fills its window
    received = p.take("server")
    assert sum(len(data_of(received, sid)) for sid in sids) == settings.connection_window
    other = p.open("10.0.0.99:80")
    p.client.send(other, b"z" * 1024)
    p.pump()
    assert data_of(p.take("server"), other) == b""  # the connection window is used up
    p.server.consumed(sids[0], window)  # one pod reads again: the others' bytes flow
    p.pump()
    assert data_of(p.take("server"), other) == b"z" * 1024


def test_the_defaults_are_a_choice_the_flag_allows() -> None:
    defaults = HboneSettings()
    assert with_stream_window(defaults.stream_window) == defaults
