"""hypothesis: arbitrary and near-HTTP bytes from either side never crash the HTTP/1.1 layer,
and the request parser alone turns any bytes into requests or one named refusal.

Whatever arrives, ``Http1Proxy`` must answer, refuse or close, never raise: an exception in the
shell would tear down the connection without the 400 the client is owed and without counting
the cause. ``make fuzz`` runs it with more examples (``tests.fuzzing``).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.proxy.http1 import Http1Proxy, Verdict
from agent.proxy.http1_codec import (
    AMBIGUOUS_LENGTH,
    HEADERS_TOO_LARGE,
    MALFORMED,
    UNSUPPORTED_CODING,
    Body,
    End,
    Head,
    Refusal,
    RequestReader,
)
from tests.fuzzing import fuzz_examples

EXAMPLES = fuzz_examples(150)

TOKENS = [
    b"GET / HTTP/1.1\r\n", b"POST /admin HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n",
    b"HTTP/1.1 100 Continue\r\n", b"HTTP/1.1 101 Switching Protocols\r\n", b"Host: s\r\n",
    b"Content-Length: 3\r\n", b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n",
    b"Connection: close\r\n", b"Connection: upgrade\r\n", b"Upgrade: websocket\r\n",
    b"Expect: 100-continue\r\n", b"\r\n", b"3\r\nabc\r\n", b"0\r\n\r\n", b"abc", b" ", b"\n",
]  # fmt: skip
pieces = st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=12)), max_size=30)


@pytest.mark.fuzz
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    client=pieces,
    upstream=pieces,
    order=st.lists(st.booleans(), max_size=60),
    deny=st.booleans(),
    eof=st.booleans(),
)
def test_arbitrary_bytes_from_both_sides_never_raise(
    client: list[bytes], upstream: list[bytes], order: list[bool], deny: bool, eof: bool
) -> None:
    p = Http1Proxy(authorize=lambda h: Verdict(not (deny and h.method == "POST"), "p"))
    client_left, upstream_left = list(client), list(upstream)
    for from_client in order:
        if from_client and client_left:
            p.receive_client(client_left.pop(0))
        elif upstream_left:
            p.receive_upstream(upstream_left.pop(0))
        p.take_to_client()
        p.take_to_upstream()
    if eof:
        p.receive_client(b"")
        p.receive_upstream(b"")
    p.header_timeout()
    p.upstream_failed()
    assert p.closing or p.tunnel  # whatever happened, the connection is now ending


CAUSES = {MALFORMED, HEADERS_TOO_LARGE, AMBIGUOUS_LENGTH, UNSUPPORTED_CODING}
REQUEST_TOKENS = [
    b"GET / HTTP/1.1\r\n", b"POST /a?b HTTP/1.1\r\n", b"GET / HTTP/1.0\r\n", b"HEAD / HTTP/1.1\r\n",
    b"Host: s\r\n", b"Content-Length: 3\r\n", b"Content-Length: 0\r\n", b"Content-Length: 03\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n", b"Connection: close\r\n",
    b"Connection: upgrade\r\n", b"Upgrade: websocket\r\n", b"Expect: 100-continue\r\n",
    b"\r\n", b"\n", b"3\r\nabc\r\n", b"3;x=y\r\nabc\r\n", b"0\r\n\r\n", b"0\r\nT: 1\r\n\r\n",
    b"abc", b" ", b"\t", b":", b"\x00",
]  # fmt: skip
request_bytes = st.lists(
    st.one_of(st.sampled_from(REQUEST_TOKENS), st.binary(max_size=12)), max_size=30
).map(b"".join)


def _events(reader: RequestReader) -> list[object]:
    """The reader's events with adjacent bodies merged (how bytes were split must not matter)."""
    out: list[object] = []
    for event in reader.events:
        if isinstance(event, Body) and out and isinstance(out[-1], Body):
            out[-1] = Body(out[-1].data + event.data)
        else:
            out.append(event)
    return out


@pytest.mark.fuzz
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire=request_bytes, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_the_request_parser_yields_requests_or_a_named_refusal(
    wire: bytes, cuts: list[int]
) -> None:
    whole = RequestReader(60 * 1024)
    whole.feed(wire)
    events = _events(whole)
    # Requests in order (head, bodies, end), or a refusal with a known cause as the last event.
    for event in events[:-1]:
        assert isinstance(event, Head | Body | End)
    if events and isinstance(events[-1], Refusal):
        assert events[-1].cause in CAUSES and events[-1].status in (400, 431, 501)
        assert whole.failed == events[-1]
    # The same bytes cut anywhere read the same (llhttp keeps no state a cut could confuse).
    split = RequestReader(60 * 1024)
    bounds = sorted({c for c in cuts if c < len(wire)} | {0, len(wire)})
    for start, end in itertools.pairwise(bounds):
        split.feed(wire[start:end])
    assert _events(split) == events
    assert split.upgraded == whole.upgraded
