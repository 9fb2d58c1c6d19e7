"""The llhttp-based HTTP/1.1 codec, byte for byte: every refusal it owes, both halves apart."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.proxy.http1 import UPSTREAM_PROTOCOL, Http1Proxy, RequestHead, Verdict
from agent.proxy.http1_codec import (
    AMBIGUOUS_LENGTH,
    DEFAULT_MAX_FIELDS,
    DETAIL_LIMIT,
    HEADERS_TOO_LARGE,
    MALFORMED,
    NOTED,
    TRAILERS_TOO_LARGE,
    UNSUPPORTED_CODING,
    Body,
    End,
    Head,
    Refusal,
    RequestReader,
    ResponseReader,
    bounded,
    forwarded_headers,
)

H = b"POST / HTTP/1.1\r\nHost: s\r\n"

REFUSED = [
    # Request smuggling: two framings, two lengths, a length two parsers could read apart.
    (H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, AMBIGUOUS_LENGTH),
    (H + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400, AMBIGUOUS_LENGTH),
    (H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\n", 400, AMBIGUOUS_LENGTH),
    (H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\n", 400, AMBIGUOUS_LENGTH),
    (H + b"Content-Length: 3, 3\r\n\r\n", 400, AMBIGUOUS_LENGTH),
    (H + b"Content-Length: -1\r\n\r\n", 400, AMBIGUOUS_LENGTH),
    (H + b"Content-Length: 1 2\r\n\r\n", 400, AMBIGUOUS_LENGTH),
    (H + b"Content-Length: +3\r\n\r\n", 400, AMBIGUOUS_LENGTH),
    # Codings only some parsers would honour.
    (H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 501, UNSUPPORTED_CODING),
    (H + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 501, UNSUPPORTED_CODING),
    (H + b"Transfer-Encoding: gzip\r\n\r\n", 501, UNSUPPORTED_CODING),
    (
        H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        501,
        "unsupported_transfer_coding",
    ),
    # Malformed heads.
    (b"GET /\x00 HTTP/1.1\r\nHost: s\r\n\r\n", 400, MALFORMED),
    (b"G\xffT / HTTP/1.1\r\nHost: s\r\n\r\n", 400, MALFORMED),
    (b"GET / HTTP/1.1\r\nHost: s\r\nBad Header: x\r\n\r\n", 400, MALFORMED),
    (b"GET / HTTP/1.1\r\nHost: s\r\nBad\x01: x\r\n\r\n", 400, MALFORMED),
    (b"GET / HTTP/1.1\r\nHost: s\r\nX: \x01\r\n\r\n", 400, MALFORMED),
    (b"GET / HTTP/1.1\r\nHost: s\r\nX: a\r\n folded\r\n\r\n", 400, MALFORMED),
    (b"GET / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding : chunked\r\n\r\n", 400, MALFORMED),
    (b"GET / HTTP/1.1\nHost: s\n\n", 400, MALFORMED),
    (b"GET / HTTP/1.1\r\n\r\n", 400, MALFORMED),  # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, MALFORMED),
    (b"GET / HTTP/2.0\r\nHost: s\r\n\r\n", 400, MALFORMED),
    (b"GET / HTTP/1.1 x\r\nHost: s\r\n\r\n", 400, MALFORMED),
    (b"CONNECT s:443 HTTP/1.1\r\nHost: s:443\r\n\r\n", 400, MALFORMED),
    # A bad chunk once the head was forwarded.
    (H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400, MALFORMED),
    (H + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n", 400, MALFORMED),
    (H + b"Transfer-Encoding: chunked\r\n\r\n3 \r\nabc\r\n", 400, MALFORMED),
    # Request targets no origin server reads (RFC 9112 3.2), and TE in HTTP/1.0 (6.1).
    (b"GET * HTTP/1.1\r\nHost: s\r\n\r\n", 400, MALFORMED),
    (b"GET ftp://s/a HTTP/1.1\r\nHost: s\r\n\r\n", 400, MALFORMED),
    (b"GET http://u:p@s/a HTTP/1.1\r\nHost: s\r\n\r\n", 400, MALFORMED),
    (b"GET http:///a HTTP/1.1\r\nHost: s\r\n\r\n", 400, MALFORMED),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, MALFORMED),
]


@pytest.mark.parametrize(("wire", "status", "cause"), REFUSED)
def test_request_reader_refuses_by_name(wire: bytes, status: int, cause: str) -> None:
    whole = RequestReader(60 * 1024)
    whole.feed(wire)
    refusal = whole.events[-1]
    assert isinstance(refusal, Refusal) and (refusal.status, refusal.cause) == (status, cause)
    # Byte by byte the verdict is the same, and nothing is read after it.
    trickled = RequestReader(60 * 1024)
    for i in range(len(wire)):
        trickled.feed(wire[i : i + 1])
    trickled.feed(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    assert trickled.events[-1] == refusal
    assert trickled.failed == refusal


@pytest.mark.parametrize(("wire", "status", "cause"), REFUSED)
def test_the_proxy_answers_each_refusal_and_forwards_nothing_after_it(
    wire: bytes, status: int, cause: str
) -> None:
    p = Http1Proxy(authorize=lambda h: Verdict(True), new_request_id=lambda: "r")
    p.receive_client(wire + b"GET /smuggled HTTP/1.1\r\nHost: s\r\n\r\n")
    out = p.take_to_client()
    assert out.startswith(b"HTTP/1.1 %d " % status) and b"connection: close\r\n" in out
    assert b"/smuggled" not in p.take_to_upstream()
    assert p.closing and p.take_rejections() == [cause]


def test_a_head_over_the_limit_is_refused_whole_in_pieces_or_by_its_target() -> None:
    for wire in (
        b"GET / HTTP/1.1\r\nHost: s\r\nX: " + b"a" * 2000 + b"\r\n\r\n",
        b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: s\r\n\r\n",
    ):
        for step in (len(wire), 7):
            r = RequestReader(1024)
            for i in range(0, len(wire), step):
                r.feed(wire[i : i + step])
            assert r.failed == Refusal(431, HEADERS_TOO_LARGE, "head over the size limit")
    # One header that never ends is bounded by what was fed, not by its completion.
    r = RequestReader(1024)
    r.feed(b"GET / HTTP/1.1\r\nHost: s\r\nX: ")
    for _ in range(20):
        r.feed(b"b" * 100)
    assert r.failed is not None and r.failed.cause == HEADERS_TOO_LARGE


CHUNKED = b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"
TRAILERS_REFUSED = Refusal(431, HEADERS_TOO_LARGE, TRAILERS_TOO_LARGE)


def test_trailers_are_bounded_whole_in_pieces_or_as_one_that_never_ends() -> None:
    """A peer's trailers once grew without bound (llhttp has no limit, ``httptools`` keeps an
    unfinished field): whole trailers past twice the head limit, and any read within a body
    that gives no event past the limit, are refused; the reader then holds nothing more."""
    many = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 90) for i in range(30))  # about 3 KiB
    for step in (len(CHUNKED) + len(many), 7, 100):
        r = RequestReader(1024)
        wire = CHUNKED + many
        for i in range(0, len(wire), step):
            r.feed(wire[i : i + step])
        assert r.failed == TRAILERS_REFUSED
    # One trailer that never ends: refused once more than the limit came without an event.
    r = RequestReader(1024)
    r.feed(CHUNKED + b"X-Endless: ")
    fed = 0
    while r.failed is None:
        r.feed(b"b" * 100)
        fed += 100
        assert fed <= 1024 + 100
    assert r.failed == TRAILERS_REFUSED
    # The same for a response's trailers (an upstream's).
    resp = ResponseReader(1024)
    resp.expect(b"GET")
    resp.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX: ")
    for _ in range(12):
        resp.feed(b"b" * 100)
    assert resp.failed == TRAILERS_REFUSED


def test_trailers_within_the_bound_and_slow_chunked_bodies_are_read() -> None:
    """Well-behaved input is unchanged: trailers up to the head limit, and a body whose
    chunk sizes and data come in separate small reads, however long the body."""
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 90) for i in range(10))  # about 1 KiB
    r = RequestReader(1024)
    r.feed(CHUNKED + trailers + b"\r\n")
    assert r.failed is None and isinstance(r.events[-1], End) and len(r.events[-1].trailers) == 10
    slow = RequestReader(1024)
    slow.feed(b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(500):  # 500 chunk-size lines and their data, apart: 3.5 KiB of framing
        slow.feed(b"1\r\n")
        slow.feed(b"a\r\n")
    slow.feed(b"0\r\n\r\n")
    assert slow.failed is None and isinstance(slow.events[-1], End)


TINY = b"1\r\na\r\n"  # the smallest chunk: one byte of body in six of framing


def test_a_body_of_tiny_chunks_is_one_event_per_read_and_held_in_about_its_bytes() -> None:
    """llhttp hands each chunk over apart, and a 64 KiB read of tiny chunks, the body of a
    pipelined request waiting behind another, was about 10,900 ``Body`` events (527 KB,
    tracemalloc); a response's the same. Now the pieces that follow a queued body are that
    body, whichever half reads them, also from a later read while it waits; its end and
    trailers, and the messages around it, stay events of their own."""
    first = b"GET /a HTTP/1.1\r\nHost: s\r\n\r\n"
    head = b"POST /b HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunks = (65536 - len(first) - len(head)) // len(TINY)
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    readers: list[tuple[RequestReader | ResponseReader, bytes, bytes, list[str]]] = [
        (RequestReader(60 * 1024), first, head, ["Head", "End", "Head", "Body"]),
        (ResponseReader(60 * 1024), b"", response, ["Head", "Body"]),
    ]
    for reader, before_it, chunked, kinds in readers:
        wire = before_it + chunked + TINY * chunks
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            reader.feed(wire)
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert [type(e).__name__ for e in reader.events] == kinds
        assert reader.events[-1] == Body(b"a" * chunks) and held < len(wire) // 2
        next_message = chunked + b"1\r\nd\r\n1\r\ne\r\n0\r\n\r\n"
        reader.feed(TINY * 2 + b"2\r\nbc\r\n0\r\nX-T: 1\r\n\r\n" + next_message)
        *_, body, end, next_head, next_body, next_end = reader.events
        assert body == Body(b"a" * (chunks + 2) + b"bc") and end == End([(b"x-t", b"1")])
        assert isinstance(next_head, Head) and (next_body, next_end) == (Body(b"de"), End([]))


def test_request_reader_events_for_lengths_chunks_trailers_and_pipelining() -> None:
    r = RequestReader(60 * 1024)
    r.feed(
        b"PUT /a?x HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nX-A: 1\r\n\r\nabc"
        b"POST /b HTTP/1.1\r\nhost: s\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n"
        b"\r\n2\r\nhi\r\n0\r\nX-Trailer: t\r\n\r\n"
        b"GET /c HTTP/1.0\r\n\r\n"
    )
    events = list(r.events)
    a, body_a, end_a, b, body_b, end_b, c, end_c = events
    assert isinstance(a, Head) and (a.method, a.target, a.length, a.chunked) == (
        b"PUT",
        b"/a?x",
        3,
        False,
    )
    assert a.headers == [(b"host", b"s"), (b"content-length", b"3"), (b"x-a", b"1")]
    assert body_a == Body(b"abc") and end_a == End([])
    assert isinstance(b, Head) and b.chunked and b.expect_continue and b.keep_alive
    assert body_b == Body(b"hi") and end_b == End([(b"x-trailer", b"t")])
    assert isinstance(c, Head) and c.http10 and not c.keep_alive and end_c == End([])
    assert not r.mid_message


def test_response_reader_head_informational_eof_delimited_and_upgrade() -> None:
    r = ResponseReader(60 * 1024)
    r.expect(b"HEAD")
    r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")  # HEAD: no body follows
    r.expect(b"GET")
    r.feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nuntil")
    r.feed(b" close")
    assert r.eof()
    kinds = [(type(e).__name__, getattr(e, "status", None)) for e in r.events]
    assert kinds == [
        ("Head", 200),
        ("End", None),
        ("Head", 100),
        ("End", None),
        ("Head", 200),
        ("Body", None),  # both reads' bytes, not yet taken: one event
        ("End", None),
    ]
    final, body = r.events[4], r.events[5]
    assert isinstance(final, Head) and not final.keep_alive
    assert body == Body(b"until close")
    up = ResponseReader(60 * 1024)
    up.expect(b"GET")
    up.feed(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\nConnection: upgrade\r\n\r\nws!")
    assert up.upgraded == b"ws!"
    bad = ResponseReader(60 * 1024)
    bad.feed(b"HTTP/1.1 2000 OK\r\n\r\n")
    assert isinstance(bad.failed, Refusal)


def _proxy() -> Http1Proxy:
    ids = itertools.count(1)
    return Http1Proxy(authorize=lambda h: Verdict(True), new_request_id=lambda: f"r{next(ids)}")


def test_pipelined_requests_wait_for_the_response_before_them() -> None:
    p = _proxy()
    p.receive_client(b"GET /a HTTP/1.1\r\nHost: s\r\n\r\nGET /b HTTP/1.1\r\nHost: s\r\n\r\n")
    assert p.take_to_upstream() == b"GET /a HTTP/1.1\r\nhost: s\r\nx-request-id: r1\r\n\r\n"
    assert p.client_paused  # /b waits: the shell stops reading the client
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert p.take_to_upstream() == b"GET /b HTTP/1.1\r\nhost: s\r\nx-request-id: r2\r\n\r\n"
    assert not p.client_paused


def test_a_head_request_is_answered_without_waiting_for_a_body() -> None:
    p = _proxy()
    p.receive_client(b"HEAD / HTTP/1.1\r\nHost: s\r\n\r\n")
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n")
    assert p.take_to_client() == b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n"
    assert [e.status for e in p.take_completed()] == [200] and not p.closing


def test_an_http10_client_gets_the_body_unchunked_and_the_connection_closed() -> None:
    p = _proxy()
    p.receive_client(b"GET / HTTP/1.0\r\n\r\n")
    # Forwarded as HTTP/1.1, which a server must refuse without a Host (RFC 9112 3.2): an empty
    # one, no authority being known.
    upstream = p.take_to_upstream()
    assert upstream.startswith(b"GET / HTTP/1.1\r\n")
    assert upstream.count(b"host: \r\n") == 1 and b"connection: close\r\n" in upstream
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
    assert p.take_to_client() == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nhi"
    assert p.closing


def test_a_response_delimited_by_the_close_ends_with_it() -> None:
    p = _proxy()
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    p.receive_upstream(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    p.receive_upstream(b"")
    assert p.take_to_client() == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it"
    (done,) = p.take_completed()
    assert (done.status, done.flags, done.response_bytes) == (200, "-", 9) and p.closing


def test_a_declined_upgrade_reads_what_followed_as_requests() -> None:
    p = _proxy()
    p.receive_client(
        b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n"
        b"GET /next HTTP/1.1\r\nHost: s\r\n\r\n"
    )
    assert p.take_to_upstream().startswith(b"GET /ws ")
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert not p.tunnel
    assert p.take_to_upstream() == b"GET /next HTTP/1.1\r\nhost: s\r\nx-request-id: r2\r\n\r\n"


def test_response_trailers_are_forwarded_without_hop_by_hop_ones() -> None:
    p = _proxy()
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\nTE: trailers\r\n\r\n")
    p.receive_upstream(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: grpc-status\r\n\r\n"
        b"1\r\nx\r\n0\r\ngrpc-status: 0\r\nConnection: x\r\n\r\n"
    )
    assert p.take_to_client() == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\nx\r\n0\r\ngrpc-status: 0\r\n\r\n"
    )


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/9.9 200 OK\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
    ],
)
def test_an_upstream_that_garbles_its_response_head_gets_the_client_a_502(response: bytes) -> None:
    p = _proxy()
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    p.receive_upstream(response)
    assert p.take_to_client().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert p.take_rejections() == [UPSTREAM_PROTOCOL] and p.closing
    (done,) = p.take_completed()
    assert (done.status, done.flags) == (502, "UC")


def test_a_response_nobody_asked_for_ends_the_connection() -> None:
    p = _proxy()
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert p.take_rejections() == [UPSTREAM_PROTOCOL] and p.closing
    assert p.take_to_client() == b""


def test_details_from_the_input_are_bounded_and_escaped() -> None:
    assert bounded("HTTP version 2.0") == "HTTP version 2.0"
    assert bounded("a\x00b\n\u200b") == "a\\x00b\\n\\u200b"
    long = bounded("x" * 500)
    assert long == "x" * DETAIL_LIMIT + "..."


_NAMES = [
    "Host", "Connection", "Keep-Alive", "TE", "Trailer", "Upgrade", "Proxy-Connection",
    "X-Request-Id", "traceparent", "B3", "Content-Length", "Expect", "Accept", "X-Custom",
]  # fmt: skip
_VALUES = ["x-custom", "close, X-Custom", "upgrade", "trailers", "websocket", "1", "a b"]


@given(
    st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=8),
    st.booleans(),
)
def test_a_head_notes_what_its_passes_read_and_forwarding_by_them_changes_nothing(
    fields: list[tuple[str, str]], keep_upgrade: bool
) -> None:
    """``Head.noted`` is exactly the headers named in ``NOTED``, in order, and forwarding by
    them (no pass over every header when none is hop-by-hop) removes what the full pass does."""
    wire = b"GET / HTTP/1.0\r\n" + b"".join(f"{n}: {v}\r\n".encode() for n, v in fields)
    reader = RequestReader(60 * 1024)
    reader.feed(wire + b"\r\n")
    event = reader.events[0]
    if not isinstance(event, Head):
        return  # refused (two lengths, a bad one): nothing is forwarded
    assert event.noted == [(n, v) for n, v in event.headers if n in NOTED]
    assert forwarded_headers(
        event.headers, keep_upgrade=keep_upgrade, noted=event.noted
    ) == forwarded_headers(event.headers, keep_upgrade=keep_upgrade)


def _fields(count: int) -> bytes:
    return b"".join(b"x%d: v\r\n" % i for i in range(count))


def test_heads_and_trailer_blocks_past_the_field_count_are_refused_and_the_limit_passes() -> None:
    """A head of tiny fields once became about 20 times its bytes in objects (60 KiB of ``a:``
    is 15,000 fields): past ``DEFAULT_MAX_FIELDS`` (Envoy's 100) a head or a trailer block is
    refused as the field comes, whichever side sent it; exactly the limit is read."""
    too_many = Refusal(431, HEADERS_TOO_LARGE, "more than 100 header fields")
    assert DEFAULT_MAX_FIELDS == 100
    for extra, refused in ((0, None), (1, too_many)):
        r = RequestReader(60 * 1024)
        r.feed(b"GET / HTTP/1.1\r\nHost: s\r\n" + _fields(99 + extra) + b"\r\n")
        assert r.failed == refused
        if refused is None:
            head = r.events[0]
            assert isinstance(head, Head) and len(head.headers) == 100
        u = ResponseReader(60 * 1024)
        u.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + _fields(99 + extra) + b"\r\n")
        assert u.failed == refused
        t = RequestReader(60 * 1024)
        t.feed(CHUNKED + _fields(100 + extra) + b"\r\n")
        assert t.failed == refused
        if refused is None:
            end = t.events[-1]
            assert isinstance(end, End) and len(end.trailers) == 100
    # Also when the fields come one read at a time, and a smaller limit is kept.
    r = RequestReader(60 * 1024, max_fields=3)
    for piece in (b"GET / HTTP/1.1\r\nHost: s\r\n", b"a: 1\r\n", b"b: 2\r\n", b"c: 3\r\n", b"d"):
        r.feed(piece)
    assert r.failed == Refusal(431, HEADERS_TOO_LARGE, "more than 3 header fields")
    # A HEAD response's head, read apart, is bounded the same.
    u = ResponseReader(60 * 1024)
    u.expect(b"HEAD")
    u.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n" + _fields(100) + b"\r\n")
    assert u.failed == too_many


def test_each_half_runs_its_own_bytecode_of_the_shared_callbacks() -> None:
    """A callback both halves ran saw two types at each attribute and was not specialized
    (docs/performance/http1-cost.md, "Shared callbacks given to each half")."""
    for name in ("on_message_begin", "on_header", "on_message_complete", "_execute"):
        request, response = getattr(RequestReader, name), getattr(ResponseReader, name)
        assert request.__code__ is not response.__code__, name
        assert request.__qualname__ == f"RequestReader.{name}"


def _recording() -> tuple[Http1Proxy, list[tuple[str, str]]]:
    """A proxy that allows every request, and the (path, host) policy saw of each."""
    seen: list[tuple[str, str]] = []

    def authorize(head: RequestHead) -> Verdict:
        seen.append((head.path, head.host))
        return Verdict(True)

    return Http1Proxy(authorize=authorize, new_request_id=lambda: "r"), seen


def test_an_absolute_form_target_is_forwarded_in_origin_form_with_its_host() -> None:
    """RFC 9112 3.2.2: the target's authority replaces Host. Before, policy and routes saw
    ``http://evil/admin`` (no ``/admin*`` rule matched it) while the pod served ``/admin``."""
    p, seen = _recording()
    p.receive_client(b"GET HTTP://evil:8080/admin?x=1#frag HTTP/1.1\r\nHost: s\r\n\r\n")
    assert seen == [("/admin", "evil:8080")]
    assert (
        p.take_to_upstream()
        == b"GET /admin?x=1 HTTP/1.1\r\nhost: evil:8080\r\nx-request-id: r\r\n\r\n"
    )
    p.receive_upstream(b"HTTP/1.1 204 No Content\r\n\r\n")
    p.receive_client(b"GET http://h?q HTTP/1.0\r\n\r\n")  # no path; HTTP/1.0 without Host
    assert seen[-1] == ("/", "h")
    assert p.take_to_upstream().startswith(b"GET /?q HTTP/1.1\r\nhost: h\r\n")


def test_a_fragment_is_dropped_and_options_asterisk_passes() -> None:
    p = _proxy()
    p.receive_client(b"GET /a#/../admin HTTP/1.1\r\nHost: s\r\n\r\n")
    assert p.take_to_upstream().startswith(b"GET /a HTTP/1.1\r\n")
    p.receive_upstream(b"HTTP/1.1 204 No Content\r\n\r\n")
    p.receive_client(b"OPTIONS * HTTP/1.1\r\nHost: s\r\n\r\n")
    assert p.take_to_upstream().startswith(b"OPTIONS * HTTP/1.1\r\n")


def test_an_h2c_upgrade_is_dropped_and_what_follows_is_read_as_requests() -> None:
    """Envoy strips it: a pod that switched to h2c would carry requests no policy sees."""
    p = _proxy()
    p.receive_client(
        b"GET /a HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\nGET /b HTTP/1.1\r\nHost: s\r\n\r\n"
    )
    assert p.take_to_upstream() == b"GET /a HTTP/1.1\r\nhost: s\r\nx-request-id: r1\r\n\r\n"
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert p.take_to_upstream() == b"GET /b HTTP/1.1\r\nhost: s\r\nx-request-id: r2\r\n\r\n"
    # Proposed with another protocol, only h2c goes.
    q = _proxy()
    q.receive_client(
        b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: H2C, websocket\r\n\r\n"
    )
    assert b"upgrade: websocket\r\n" in q.take_to_upstream()


@pytest.mark.parametrize("status", [b"099", b"600", b"999"])
def test_a_response_status_outside_1xx_to_5xx_gets_the_client_a_502(status: bytes) -> None:
    p = _proxy()
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    p.receive_upstream(b"HTTP/1.1 " + status + b" X\r\nContent-Length: 0\r\n\r\n")
    assert p.take_to_client().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert p.take_rejections() == [UPSTREAM_PROTOCOL]


def test_an_http10_keep_alive_client_is_told_its_connection_goes_on() -> None:
    """Before, the response carried no ``Connection``: an HTTP/1.0 client (``ab -k``) reads
    such a response until the close, which never came."""
    p = Http1Proxy(authorize=lambda h: Verdict(h.path != "/no"), new_request_id=lambda: "r")
    p.receive_client(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert p.take_to_client() == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nok"
    )
    p.receive_client(b"GET /no HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")  # denied here
    assert b"\r\nconnection: keep-alive\r\n\r\nRBAC" in p.take_to_client()
    assert not p.closing


@pytest.mark.parametrize(
    ("target", "path", "sent"),
    [
        (b"/public/../admin", "/admin", b"/admin"),
        (b"/./admin/", "/admin/", b"/admin/"),
        (b"/%61dmin?x=/../%61", "/admin", b"/admin?x=/../%61"),  # the query as it came
        (b"/a/%2E%2e/admin", "/admin", b"/admin"),
        (b"/a\\..\\admin", "/admin", b"/admin"),
        (b"/../../admin/x/..", "/admin/", b"/admin/"),
        (b"//admin%2Fx", "//admin%2Fx", b"//admin%2Fx"),  # kept, as Istio's BASE keeps them
        (b"/file.tar.gz", "/file.tar.gz", b"/file.tar.gz"),
    ],
)
def test_a_path_is_normalized_as_istio_does_before_policy_and_the_pod_see_it(
    target: bytes, path: str, sent: bytes
) -> None:
    """Before, policy saw the path as sent: a DENY on ``/admin`` let ``/public/../admin``
    through to a pod that served it as ``/admin``."""
    p, seen = _recording()
    p.receive_client(b"GET " + target + b" HTTP/1.1\r\nHost: s\r\n\r\n")
    assert seen == [(path, "s")]
    assert p.take_to_upstream().startswith(b"GET " + sent + b" HTTP/1.1\r\n")
