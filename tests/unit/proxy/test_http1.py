"""The destination's HTTP/1.1 layer, byte for byte and without sockets (agent.proxy.http1)."""

from __future__ import annotations

import itertools
import os
import uuid

import pytest

from agent.proxy.http1 import (
    AMBIGUOUS_LENGTH,
    HEADER_TIMEOUT,
    HEADERS_TOO_LARGE,
    MALFORMED,
    UNSUPPORTED_CODING,
    UPSTREAM_PROTOCOL,
    Http1Proxy,
    RequestHead,
    RequestIds,
    Verdict,
    request_record,
)
from agent.proxy.http1_codec import MAX_WAITING


def _proxy(deny: str = "POST", max_head_bytes: int = 60 * 1024) -> Http1Proxy:
    ids = itertools.count(1)
    return Http1Proxy(
        authorize=lambda h: Verdict(h.method != deny, "ns/deny-post"),
        clock=lambda: 5.0,
        new_request_id=lambda: f"rid-{next(ids)}",
        max_head_bytes=max_head_bytes,
    )


def test_keep_alive_requests_are_forwarded_one_by_one_with_hop_by_hop_headers_removed() -> None:
    p = _proxy()
    p.receive_client(
        b"GET /a?q=1 HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Connection: x\r\nTE: trailers\r\nTrailer: x\r\n"
        b"traceparent: 00-abc-def-01\r\n\r\n"
    )
    assert p.take_to_upstream() == (
        b"GET /a?q=1 HTTP/1.1\r\nhost: svc\r\nte: trailers\r\n"
        b"traceparent: 00-abc-def-01\r\nx-request-id: rid-1\r\n\r\n"
    )
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\n\r\nok")
    assert p.take_to_client() == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    (done,) = p.take_completed()
    assert (done.head.method, done.head.path, done.head.host, done.status) == (
        "GET",
        "/a",
        "svc",
        200,
    )
    assert (done.response_bytes, done.flags) == (2, "-")
    # The same connection serves the next request; an x-request-id present is kept.
    p.receive_client(b"GET /b HTTP/1.1\r\nHost: svc\r\nX-Request-Id: mine\r\n\r\n")
    assert p.take_to_upstream() == b"GET /b HTTP/1.1\r\nhost: svc\r\nx-request-id: mine\r\n\r\n"
    assert not p.closing


def test_chunked_request_and_response_are_reframed() -> None:
    p = _proxy()
    p.receive_client(
        b"PUT /up HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n"
    )
    # The chunks of one read go on as one (the extension dropped): chunking is a hop's own
    assert p.take_to_upstream() == (
        b"PUT /up HTTP/1.1\r\nhost: s\r\ntransfer-encoding: chunked\r\nx-request-id: rid-1\r\n\r\n"
        b"5\r\nabcde\r\n0\r\n\r\n"
    )
    p.receive_upstream(
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
    )
    assert p.take_to_client() == (
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n"
    )
    (done,) = p.take_completed()
    assert (done.request_bytes, done.response_bytes, done.status) == (5, 1, 201)


def test_a_body_of_tiny_chunks_waits_as_one_event_and_goes_on_as_one_chunk_per_read() -> None:
    """A request of tiny chunks behind another waits as its head and one body (it was an
    event per chunk), and a body's chunks read at once are forwarded as one chunk, either way;
    what comes in a later read is a chunk of its own, and the ends are where they were."""
    p = _proxy()
    tiny = b"1\r\na\r\n" * 1000
    p.receive_client(
        b"GET /a HTTP/1.1\r\nHost: s\r\n\r\n"
        b"PUT /b HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n" + tiny
    )
    assert p.take_to_upstream().startswith(b"GET /a ") and len(p.client.events) == 2
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + tiny)
    p.receive_upstream(b"2\r\nbc\r\n0\r\n\r\n")
    assert p.take_to_client() == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3e8\r\n" + b"a" * 1000 + b"\r\n2\r\nbc\r\n0\r\n\r\n"
    )
    p.receive_client(b"2\r\nbc\r\n0\r\n\r\n")
    assert p.take_to_upstream() == (
        b"PUT /b HTTP/1.1\r\nhost: s\r\ntransfer-encoding: chunked\r\nx-request-id: rid-2\r\n\r\n"
        b"3e8\r\n" + b"a" * 1000 + b"\r\n2\r\nbc\r\n0\r\n\r\n"
    )
    assert [done.request_bytes for done in p.take_completed()] == [0]


def test_expect_100_continue_passes_the_pods_100_back() -> None:
    p = _proxy()
    p.receive_client(
        b"PUT /x HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    assert b"expect: 100-continue\r\n" in p.take_to_upstream()
    p.receive_upstream(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert p.take_to_client() == b"HTTP/1.1 100 Continue\r\n\r\n"
    p.receive_client(b"hi")
    assert p.take_to_upstream() == b"hi"
    p.receive_upstream(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert p.take_to_client() == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert [e.status for e in p.take_completed()] == [204]


def test_a_final_answer_to_a_client_waiting_for_100_is_the_connections_last() -> None:
    """RFC 9110 10.1.1: a client told 417 (or anything final) before it sent its body may
    never send it. Before, the connection waited for the body, and the client's next
    request was forwarded to the pod as those 5 bytes, the rest refused as garbage."""
    p = _proxy()
    p.receive_client(
        b"PUT /x HTTP/1.1\r\nHost: s\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    p.take_to_upstream()
    p.receive_upstream(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
    assert p.take_to_client() == (
        b"HTTP/1.1 417 Expectation Failed\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    assert p.closing and p.lingers  # what the client still sends is read and dropped
    assert [e.status for e in p.take_completed()] == [417]
    p.receive_client(b"GET /next HTTP/1.1\r\nHost: s\r\n\r\n")
    assert p.take_to_upstream() == b"" and p.take_to_client() == b""


def test_a_denied_request_gets_403_and_the_connection_keeps_serving() -> None:
    p = _proxy(deny="POST")
    p.receive_client(
        b"POST /admin/x HTTP/1.1\r\nHost: s\r\nContent-Length: 4\r\n\r\nbody"
        b"GET /ok HTTP/1.1\r\nHost: s\r\n\r\n"
    )
    assert p.take_to_client() == (
        b"HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 19\r\n\r\n"
        b"RBAC: access denied"
    )
    # The denied request never reaches the pod (nor its body); the GET after it does.
    assert p.take_to_upstream() == b"GET /ok HTTP/1.1\r\nhost: s\r\nx-request-id: rid-2\r\n\r\n"
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    denied, ok = p.take_completed()
    assert (denied.status, denied.flags, denied.denied_by, denied.request_bytes) == (
        403,
        "RBAC",
        "ns/deny-post",
        4,
    )
    assert (ok.status, ok.flags) == (200, "-")
    assert not p.closing and not p.take_rejections()


def test_the_records_name_the_refusing_policy_and_a_dry_run_policys_would_deny() -> None:
    """What ``authorize`` answered reaches the request's record: the policy of a refusal, and
    the dry-run policies that would have denied a request, let through or not."""
    verdicts = {
        "/admin": Verdict(False, "ns/deny-admin", dry_run="ns/try-a"),
        "/try": Verdict(True, dry_run="ns/try-a,ns/try-b"),
    }
    p = Http1Proxy(
        authorize=lambda h: verdicts.get(h.path, Verdict(True)),
        clock=lambda: 5.0,
        new_request_id=lambda: "rid",
    )
    p.receive_client(b"GET /admin HTTP/1.1\r\nHost: s\r\n\r\nGET /try HTTP/1.1\r\nHost: s\r\n\r\n")
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    p.receive_client(b"GET /ok HTTP/1.1\r\nHost: s\r\n\r\n")
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    records = [request_record(e) for e in p.take_completed()]
    assert [(r.path, r.response_flags, r.policy, r.dry_run_policy) for r in records] == [
        ("/admin", "RBAC", "ns/deny-admin", "ns/try-a"),
        ("/try", "-", "", "ns/try-a,ns/try-b"),
        ("/ok", "-", "", ""),
    ]


def test_a_denied_request_waiting_for_100_continue_closes_the_connection() -> None:
    p = _proxy(deny="POST")
    p.receive_client(
        b"POST /a HTTP/1.1\r\nHost: s\r\nContent-Length: 9\r\nExpect: 100-continue\r\n\r\n"
    )
    out = p.take_to_client()
    assert out.startswith(b"HTTP/1.1 403 Forbidden\r\n") and b"connection: close\r\n" in out
    assert p.take_to_upstream() == b""


@pytest.mark.parametrize(
    ("wire", "status", "cause"),
    [
        # Smuggling: two framings, two lengths, a coding only some parsers would honour.
        (
            b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n",
            400,
            AMBIGUOUS_LENGTH,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n"
            b"\r\n",
            400,
            AMBIGUOUS_LENGTH,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            400,
            AMBIGUOUS_LENGTH,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            501,
            UNSUPPORTED_CODING,
        ),
        (b"GET /\x00 HTTP/1.1\r\nHost: s\r\n\r\n", 400, MALFORMED),
        (b"GET / HTTP/1.1\r\nHost: s\r\nBad Header: x\r\n\r\n", 400, MALFORMED),
        (b"GET / HTTP/1.1\r\n\r\n", 400, MALFORMED),  # no Host
    ],
)
def test_bad_requests_are_refused_and_the_connection_closed(
    wire: bytes, status: int, cause: str
) -> None:
    p = _proxy()
    p.receive_client(wire)
    out = p.take_to_client()
    assert out.startswith(b"HTTP/1.1 %d " % status)
    assert b"connection: close\r\n" in out
    assert p.take_to_upstream() == b""
    assert p.closing and p.take_rejections() == [cause]
    # Nothing more is read from a refused connection.
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    assert p.take_to_upstream() == b"" and p.take_to_client() == b""


def test_an_http2_preface_is_told_how_to_declare_the_port_http2() -> None:
    p = _proxy()
    p.receive_client(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00\x00\x00\x00\x00")
    body = (
        b"malformed: an HTTP/2 connection preface (PRI * HTTP/2.0) on a port declared HTTP/1.1;"
        b" declaring the port HTTP/2 or gRPC (Service port appProtocol http2, kubernetes.io/h2c"
        b" or grpc, or a name http2-*/grpc-*) makes it carry HTTP/2\n"
    )
    assert p.take_to_client() == (
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )
    assert p.take_rejections() == [MALFORMED]  # counted by cause, as any malformed request
    assert p.refusal == body.decode().rstrip("\n")  # what the shell's log line carries


@pytest.mark.parametrize(
    ("wire", "body"),
    [
        (b"GET / HTTP/2.0\r\nHost: s\r\n\r\n", b"malformed: HTTP version 2.0\n"),
        (b"GET /\x00 HTTP/1.1\r\nHost: s\r\n\r\n", b"malformed: Invalid char in url path\n"),
        (b"GET / HTTP/1.1\r\n\r\n", b"malformed: HTTP/1.1 wants exactly one Host header\n"),
    ],
)
def test_a_malformed_request_is_told_what_was_wrong(wire: bytes, body: bytes) -> None:
    p = _proxy()
    p.receive_client(wire)
    assert p.take_to_client().endswith(
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )
    assert p.take_rejections() == [MALFORMED]


def test_a_preface_after_a_request_is_not_taken_for_an_http2_client() -> None:
    p = _proxy()
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    p.take_to_upstream()
    p.receive_upstream(b"HTTP/1.1 204 No Content\r\n\r\n")
    p.take_to_client()
    p.receive_client(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert p.take_to_client().endswith(b"\r\n\r\nmalformed: Pause on PRI/Upgrade\n")


def test_smuggled_second_request_in_a_body_is_not_forwarded_as_a_request() -> None:
    p = _proxy()
    p.receive_client(
        b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: s\r\n\r\n"
    )
    assert p.take_to_upstream() == b""
    assert p.take_rejections() == [AMBIGUOUS_LENGTH]


def test_headers_over_the_limit_get_431_whole_or_in_pieces() -> None:
    p = _proxy(max_head_bytes=1024)
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\nX: " + b"a" * 2000 + b"\r\n\r\n")
    assert p.take_to_client().startswith(b"HTTP/1.1 431 ")
    assert p.take_rejections() == [HEADERS_TOO_LARGE]
    trickle = _proxy(max_head_bytes=1024)
    trickle.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\n")
    for _ in range(30):
        trickle.receive_client(b"X-Pad: " + b"b" * 60 + b"\r\n")
    assert trickle.take_to_client().startswith(b"HTTP/1.1 431 ")
    assert trickle.take_rejections() == [HEADERS_TOO_LARGE]


def test_endless_trailers_get_431_and_the_connection_closes() -> None:
    p = _proxy(deny="DELETE", max_head_bytes=1024)
    p.receive_client(
        b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX: "
    )
    assert p.take_to_upstream().endswith(b"2\r\nhi\r\n")
    for _ in range(12):
        p.receive_client(b"b" * 100)
    assert p.take_to_client().startswith(b"HTTP/1.1 431 ")
    assert p.take_rejections() == [HEADERS_TOO_LARGE] and p.closing


def test_header_timeout_gets_408_and_head_started_marks_the_first_byte() -> None:
    p = _proxy()
    assert p.head_started is None
    p.receive_client(b"GET / HT")
    assert p.head_started == 5.0
    p.header_timeout()
    assert p.take_to_client().startswith(b"HTTP/1.1 408 ")
    assert p.take_rejections() == [HEADER_TIMEOUT] and p.closing


def test_upgrade_switches_to_a_tunnel_with_the_bytes_already_read() -> None:
    p = _proxy()
    p.receive_client(
        b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: k\r\n\r\nearly-frame"
    )
    assert p.take_to_upstream() == (
        b"GET /ws HTTP/1.1\r\nhost: s\r\nupgrade: websocket\r\nsec-websocket-key: k\r\n"
        b"connection: upgrade\r\nx-request-id: rid-1\r\n\r\n"
    )
    p.receive_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: a\r\n\r\nserver-frame"
    )
    assert p.tunnel
    assert p.take_to_client() == (
        b"HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept: a\r\nupgrade: websocket\r\n"
        b"connection: Upgrade\r\n\r\nserver-frame"
    )
    assert p.take_to_upstream() == b"early-frame"
    assert [e.status for e in p.take_completed()] == [101]


def test_upstream_closing_before_its_response_gets_502() -> None:
    p = _proxy()
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    p.take_to_upstream()
    p.receive_upstream(b"")
    out = p.take_to_client()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    (done,) = p.take_completed()
    assert (done.status, done.flags) == (502, "UC") and p.closing


def test_upstream_connection_close_is_passed_on_and_ends_the_connection() -> None:
    p = _proxy()
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx")
    assert p.take_to_client() == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\nconnection: close\r\n\r\nx"
    )
    assert p.closing and [e.status for e in p.take_completed()] == [200]


def test_a_client_that_half_closes_after_its_request_still_gets_the_response() -> None:
    p = _proxy()
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    p.receive_client(b"")
    assert not p.closing
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
    assert p.take_to_client().endswith(b"\r\n\r\nx")
    assert p.closing and [e.status for e in p.take_completed()] == [200]
    assert not p.take_rejections()


def test_request_head_is_what_policy_sees() -> None:
    seen: list[RequestHead] = []

    def authorize(head: RequestHead) -> Verdict:
        seen.append(head)
        return Verdict(True)

    p = Http1Proxy(authorize=authorize, new_request_id=lambda: "r")
    p.receive_client(b"DELETE /items/7?force=1#frag HTTP/1.1\r\nHost: Shop.Example:8080\r\n\r\n")
    assert seen == [RequestHead("DELETE", "/items/7", "Shop.Example:8080", "r")]


def test_a_partial_pipelined_head_starts_the_header_clock_when_its_turn_comes() -> None:
    now = [1.0]
    p = Http1Proxy(authorize=lambda h: Verdict(True), clock=lambda: now[0])
    p.receive_client(b"GET /a HTTP/1.1\r\nHost: s\r\n\r\nGET /b HT")
    assert p.head_started is None  # /a is being served; /b's head waits its turn
    now[0] = 7.0
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert p.head_started == 7.0


def test_a_bad_chunk_in_a_forwarded_body_is_refused_and_the_request_reported() -> None:
    p = _proxy()
    p.receive_client(b"PUT /x HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert p.take_to_client().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    (done,) = p.take_completed()
    assert (done.head.path, done.status) == ("/x", 400)
    assert p.closing and p.take_rejections() == [MALFORMED]


def test_a_client_that_fails_mid_response_still_has_its_request_reported() -> None:
    """The source reset the stream after the response head (a 503 it retries elsewhere): the
    exchange is reported with the status that began and flag DC, and the connection ends."""
    p = _proxy()
    p.receive_client(b"GET /flaky HTTP/1.1\r\nHost: s\r\n\r\n")
    p.receive_upstream(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 10\r\n\r\nunav")
    assert p.take_to_client().startswith(b"HTTP/1.1 503 ")
    assert p.take_completed() == []  # the body is not complete yet
    p.client_failed()
    (done,) = p.take_completed()
    assert (done.head.path, done.status, done.flags) == ("/flaky", 503, "DC") and p.closing
    idle = _proxy()
    idle.client_failed()  # nothing in flight: nothing to report
    assert idle.take_completed() == [] and idle.closing


def test_a_rate_limited_request_gets_429_with_flag_rl_and_the_connection_keeps_serving() -> None:
    limited = Verdict(False, "ns/limit", status=429, flag="RL", body=b"local_rate_limited")
    p = Http1Proxy(
        authorize=lambda h: limited if h.path == "/over" else Verdict(True),
        new_request_id=lambda: "rid",
    )
    p.receive_client(b"GET /over HTTP/1.1\r\nHost: s\r\n\r\nGET /ok HTTP/1.1\r\nHost: s\r\n\r\n")
    assert p.take_to_client() == (
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\n"
        b"content-length: 18\r\n\r\nlocal_rate_limited"
    )
    assert p.take_to_upstream() == b"GET /ok HTTP/1.1\r\nhost: s\r\nx-request-id: rid\r\n\r\n"
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    over, ok = p.take_completed()
    assert (over.status, over.flags, over.denied_by) == (429, "RL", "ns/limit")
    assert (ok.status, ok.flags) == (200, "-")
    assert not p.closing


def test_request_ids_are_random_uuid4s_and_a_forked_process_draws_its_own() -> None:
    """``RequestIds`` takes the OS's random bytes in batches: every id is a version-4 UUID in
    ``uuid4``'s text form, ids differ across a batch's end, and a child of ``fork`` (the
    agent's ``--workers``) does not hand out the ids its parent will."""
    ids = RequestIds()
    drawn = [ids() for _ in range(RequestIds.BATCH + 10)]
    assert len(set(drawn)) == len(drawn)
    for text in drawn:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then out without the parent's cleanup
        os.write(write, ids().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as child:
        assert child.read().decode() != ids()


def test_a_head_of_more_fields_than_the_limit_gets_431_naming_the_count_and_closes() -> None:
    fields = b"".join(b"x%d: v\r\n" % i for i in range(99))
    p = _proxy()
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\n" + fields + b"\r\n")  # 100 fields: read
    assert p.take_to_upstream().startswith(b"GET / HTTP/1.1\r\n") and not p.closing
    p = _proxy()
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\nextra: 1\r\n" + fields + b"\r\n")
    answer = p.take_to_client()
    assert answer.startswith(b"HTTP/1.1 431 ") and b"more than 100 header fields" in answer
    assert p.take_rejections() == [HEADERS_TOO_LARGE] and p.closing
    assert p.take_to_upstream() == b""


def test_a_chosen_field_count_bounds_both_sides_and_the_431_names_it() -> None:
    """``--max-header-fields`` reaches both readers: a client's head of one field past it is
    answered 431 naming the chosen count, one at it is forwarded, and a pod's response past it
    is 502, as past the default."""
    fields = b"".join(b"x%d: v\r\n" % i for i in range(19))
    p = Http1Proxy(authorize=lambda h: Verdict(True), max_fields=20)
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\n" + fields + b"\r\n")  # 20 fields: read
    assert p.take_to_upstream().startswith(b"GET / HTTP/1.1\r\n") and not p.closing
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nx: v\r\n" + fields + b"\r\n")
    assert p.take_to_client().startswith(b"HTTP/1.1 502 ") and p.closing
    p = Http1Proxy(authorize=lambda h: Verdict(True), max_fields=20)
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\nextra: 1\r\n" + fields + b"\r\n")
    answer = p.take_to_client()
    assert answer.startswith(b"HTTP/1.1 431 ") and answer.endswith(
        b": more than 20 header fields\n"
    )
    assert p.take_rejections() == [HEADERS_TOO_LARGE] and p.closing


def test_a_response_of_more_fields_than_the_limit_is_502_to_the_client() -> None:
    p = _proxy()
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    p.take_to_upstream()
    fields = b"".join(b"x%d: v\r\n" % i for i in range(100))
    p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + fields + b"\r\n")
    assert p.take_to_client().startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert p.take_rejections() == [UPSTREAM_PROTOCOL] and p.closing
    (done,) = p.take_completed()
    assert (done.status, done.flags) == (502, "UC")


def test_a_thousand_pipelined_requests_are_answered_in_order_a_few_parsed_at_a_time() -> None:
    """One read of tiny pipelined requests was parsed whole (2,427 heads in 64 KiB, about 20
    times its bytes in objects); now at most ``MAX_WAITING`` heads wait parsed, the rest of
    the read waits as bytes, and every request is still forwarded and answered in order (a
    body framed by its length, and one chunked, among them)."""
    requests = [b"GET /%d HTTP/1.1\r\nHost: s\r\n\r\n" % i for i in range(1000)]
    requests[500] = b"POST /500 HTTP/1.1\r\nHost: s\r\nContent-Length: 8\r\n\r\n\r\n\r\n\r\n\r\n"
    requests[501] = (
        b"POST /501 HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4\r\n\r\n\r\n\r\n0\r\n\r\n"
    )
    p = _proxy(deny="DELETE")
    p.receive_client(b"".join(requests))
    most = p.client.waiting
    assert p.client.held and p.client_paused  # the rest waits as bytes; reads stop
    forwarded = []
    for _ in range(1000):
        forwarded.append(p.take_to_upstream().split(b" ", 2)[1])
        p.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        most = max(most, p.client.waiting)
    assert forwarded == [b"/%d" % i for i in range(1000)]
    assert [e.head.path for e in p.take_completed()] == [f"/{i}" for i in range(1000)]
    assert p.take_to_client() == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n" * 1000
    assert most == MAX_WAITING and not p.client.held and not p.client_paused and not p.closing
