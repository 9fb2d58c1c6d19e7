"""``MessageEnds``: whether bytes cut anywhere end on a gRPC message boundary."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from agent.proxy.grpcframing import MessageEnds


def _framed(message: bytes) -> bytes:
    return b"\0" + len(message).to_bytes(4) + message


@given(st.lists(st.binary(max_size=40), max_size=6), st.data())
def test_whole_exactly_at_the_ends_of_messages_however_the_bytes_are_cut(
    messages: list[bytes], data: st.DataObject
) -> None:
    wire = b"".join(_framed(m) for m in messages)
    ends, at = set(), 0
    for m in messages:
        at += 5 + len(m)
        ends.add(at)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(wire)))) | {0, len(wire)})
    tracker = MessageEnds()
    for start, stop in itertools.pairwise(cuts):
        tracker.feed(wire[start:stop])
        assert tracker.whole == (stop in ends or stop == 0), (start, stop)
    assert tracker.whole
