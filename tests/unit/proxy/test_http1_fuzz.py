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
    ResponseReader,
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


class _Pieces(RequestReader):
    """The reader as it was before it gathered bodies: a ``Body`` per piece llhttp hands over
    (a chunk, or what of a body one feed holds), the reference the gathering one must match."""

    def on_body(self, body: bytes) -> None:
        self._body_left -= len(body)
        self.events.append(Body(body))


class _ResponsePieces(ResponseReader):
    """``_Pieces`` for responses."""

    def on_body(self, body: bytes) -> None:
        self.events.append(Body(body))


TAKEN = "taken"  # where the owner took every event: the bodies on either side stay apart


def _taken(reader: RequestReader | ResponseReader, out: list[object]) -> None:
    """Take every event queued into ``out`` (Body events merged: where a body is cut into them
    is the reader's), after checking that a gathering reader queued no body right after
    another (a tiny chunk's piece is more of the queued body, not an event: its objects are
    bounded by its bytes)."""
    events = reader.events
    if not isinstance(reader, _Pieces | _ResponsePieces):
        assert not any(type(a) is type(b) is Body for a, b in itertools.pairwise(events))
    while events:
        event = events.popleft()
        if out and isinstance(event, Body) and isinstance(out[-1], Body):
            out[-1] = Body(out[-1].data + event.data)
        else:
            out.append(event)


def _read_all(reader: RequestReader, reads: list[bytes], takes: list[bool]) -> list[object]:
    """What a reader gives for ``reads`` when its owner takes every event and releases what
    it held after the reads ``takes`` says (cycled) and after the last."""
    out: list[object] = []

    def take() -> None:
        while True:
            _taken(reader, out)
            if not reader.held or reader.failed is not None:
                out.append(TAKEN)
                return
            reader.release()

    for data, now in zip(reads, itertools.cycle(takes), strict=False):
        if data:
            reader.feed(data)
            assert reader.waiting <= reader.max_waiting
            if now:
                take()
    take()
    return [*out, bytes(reader.upgraded or b""), reader.in_head]


PIPELINED = [
    b"GET /a HTTP/1.1\r\nHost: s\r\n\r\n", b"GET /b HTTP/1.0\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: s\r\nContent-Length: 8\r\n\r\n\r\n\r\n\r\n\r\n",
    b"POST /d HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"4\r\n\r\n\r\n\r\n0\r\nx-t: 1\r\n\r\n",
    b"POST /f HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"1\r\na\r\n2\r\nbc\r\n0\r\n\r\n",
    b"GET /e HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
]  # fmt: skip


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.one_of(st.sampled_from(PIPELINED), st.sampled_from(PIPELINED),
                          st.sampled_from(TOKENS), st.binary(max_size=12)), max_size=60),
       st.lists(st.integers(1, 40), min_size=1, max_size=10),
       st.lists(st.booleans(), min_size=1, max_size=10))  # fmt: skip
def test_parsing_a_few_pipelined_requests_at_a_time_reads_what_parsing_all_reads(
    tokens: list[bytes], sizes: list[int], takes: list[bool]
) -> None:
    """However the bytes come and whatever they are, and whenever the owner takes the events,
    the reader that parses at most two requests ahead gives the events, refusal and upgrade
    bytes that parsing all at once gives, and gathering a body's pieces into the body queued
    before them gives the bytes, ends and trailers a ``Body`` per piece gave."""
    wire = b"".join(tokens)
    reads = _cut(wire, sizes)
    bounded_reader = RequestReader(60 * 1024, max_waiting=2)
    whole_reader = RequestReader(60 * 1024, max_waiting=10**9)
    read = _read_all(bounded_reader, reads, takes)
    assert read == _read_all(whole_reader, reads, takes)
    assert read == _read_all(_Pieces(60 * 1024, max_waiting=2), reads, takes)


def _cut(wire: bytes, sizes: list[int]) -> list[bytes]:
    """``wire`` in reads of ``sizes`` (cycled) times 8 bytes."""
    reads: list[bytes] = []
    at, turns = 0, itertools.cycle(sizes)
    while at < len(wire):
        size = next(turns) * 8
        reads.append(wire[at : at + size])
        at += size
    return reads


RESPONSES = [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1\r\na\r\n", b"3\r\nabc\r\n",
    b"0\r\n\r\n", b"0\r\nx-t: 1\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.1 204 OK\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n",
]  # fmt: skip


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.one_of(*[st.sampled_from(RESPONSES)] * 4,
                          st.sampled_from(TOKENS), st.binary(max_size=12)), max_size=60),
       st.lists(st.integers(1, 40), min_size=1, max_size=10),
       st.lists(st.booleans(), min_size=1, max_size=10), st.booleans())  # fmt: skip
def test_a_response_reader_gathering_bodies_reads_what_a_body_per_piece_reads(
    tokens: list[bytes], sizes: list[int], takes: list[bool], eof: bool
) -> None:
    """The same for responses: whatever the bytes, their reads and when the owner takes the
    events, the gathering reader's bodies are the pieces' bytes between the same heads, ends
    (one by the connection's end too) and refusals."""
    reads = _cut(b"".join(tokens), sizes)
    got: list[list[object]] = []
    for reader in (ResponseReader(60 * 1024), _ResponsePieces(60 * 1024)):
        out: list[object] = []
        for data, now in zip(reads, itertools.cycle(takes), strict=False):
            reader.feed(data)
            if now:
                _taken(reader, out)
                out.append(TAKEN)
        if eof:
            reader.eof()
        _taken(reader, out)
        got.append([*out, reader.upgraded, reader.failed, reader.mid_message])
    assert got[0] == got[1]
