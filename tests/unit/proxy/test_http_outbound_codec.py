"""The source node's HTTP/1.1 layer, byte for byte and without sockets (http_outbound_codec).

One client connection, upstream halves attached per request and released after it: the tests
play the shell (attach, respond locally, pool what is released) and both peers.
"""

from __future__ import annotations

import itertools

import pytest

from agent.proxy.http1 import (
    AMBIGUOUS_LENGTH,
    DEFAULT_MAX_HEAD_BYTES,
    HEADER_TIMEOUT,
    PEER_REQUEST,
    UPSTREAM_PROTOCOL,
    Http1Proxy,
    Verdict,
)
from agent.proxy.http1_codec import MAX_WAITING, NO_ALLOWANCE, Allowance, field_size
from agent.proxy.http_outbound_codec import (
    DroppedResponse,
    SourceHttp1,
    mirror_request,
    new_upstream,
)


def _codec() -> SourceHttp1[str]:
    ids = itertools.count(1)
    return SourceHttp1(clock=lambda: 5.0, new_request_id=lambda: f"rid-{next(ids)}")


GET = b"GET /a HTTP/1.1\r\nHost: web\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_requests_of_one_connection_go_to_the_upstream_attached_for_each() -> None:
    c = _codec()
    c.receive_client(GET + b"GET /b HTTP/1.1\r\nHost: web\r\n\r\n")  # pipelined
    assert c.pending is not None and c.pending.path == "/a"
    assert not c.wants_client_data()  # the head waits for an upstream: stop reading
    first, second = new_upstream(), new_upstream()
    c.attach(first, "endpoint-1")
    assert c.take_to_upstream() == b"GET /a HTTP/1.1\r\nhost: web\r\nx-request-id: rid-1\r\n\r\n"
    c.receive_upstream(OK)
    assert c.take_to_client() == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    assert c.take_released() == [(first, True)]
    assert [(e.head.path, e.status, tag) for e, tag in c.take_completed()] == [
        ("/a", 200, "endpoint-1")
    ]
    assert c.pending is not None and c.pending.path == "/b"  # the pipelined one is next
    c.attach(second, "endpoint-2")
    assert c.take_to_upstream().startswith(b"GET /b HTTP/1.1\r\n")
    c.receive_upstream(OK)
    assert c.take_released() == [(second, True)]
    # A released reusable half serves a later request (its cycle was restarted).
    c.receive_client(b"GET /c HTTP/1.1\r\nHost: web\r\n\r\n")
    c.attach(first, "endpoint-1")
    assert c.take_to_upstream().startswith(b"GET /c HTTP/1.1\r\n")
    assert not c.closing


def test_an_upstream_that_closes_its_connection_is_not_reused_but_the_client_stays() -> None:
    c = _codec()
    c.receive_client(GET)
    up = new_upstream()
    c.attach(up, "e")
    c.take_to_upstream()
    c.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    # The client does not inherit the upstream's close: it is not told to go.
    assert c.take_to_client() == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    assert c.take_released() == [(up, False)]
    assert not c.closing and c.wants_client_data()


def test_chunked_body_and_trailers_are_reframed_per_request() -> None:
    c = _codec()
    c.receive_client(
        b"POST /p HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 5\r\n\r\n"
    )
    up = new_upstream()
    c.attach(up, "e")
    assert c.take_to_upstream() == (
        b"POST /p HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\nx-request-id: rid-1\r\n"
        b"\r\n5\r\nabcde\r\n0\r\nx-sum: 5\r\n\r\n"  # one read's chunks as one
    )
    c.receive_upstream(
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    assert c.take_to_client() == (
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    ((exchange, _),) = c.take_completed()
    assert (exchange.request_bytes, exchange.response_bytes, exchange.status) == (5, 2, 201)


def test_expect_100_continue_passes_through() -> None:
    c = _codec()
    c.receive_client(
        b"PUT /u HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    up = new_upstream()
    c.attach(up, "e")
    assert b"expect: 100-continue" in c.take_to_upstream()
    assert c.wants_client_data()  # the client may send its body any time: keep reading
    c.receive_upstream(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert c.take_to_client() == b"HTTP/1.1 100 Continue\r\n\r\n"
    c.receive_client(b"data")
    assert c.take_to_upstream() == b"data"
    c.receive_upstream(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert c.take_to_client() == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert c.take_released() == [(up, True)]


def test_a_final_answer_to_a_client_waiting_for_100_ends_the_connection() -> None:
    """As at the destination (``test_http1.py``): the client may never send the body, and
    the session, its request cut, is not reused."""
    c = _codec()
    c.receive_client(
        b"PUT /u HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    up = new_upstream()
    c.attach(up, "e")
    c.take_to_upstream()
    c.receive_upstream(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
    assert c.take_to_client() == (
        b"HTTP/1.1 417 Expectation Failed\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    assert c.closing and c.lingers and c.take_released() == [(up, False)]
    assert [(e.status, tag) for e, tag in c.take_completed()] == [(417, "e")]
    c.receive_client(b"GET /next HTTP/1.1\r\nHost: web\r\n\r\n")
    assert c.pending is None and c.take_to_upstream() == b""


def test_upgrade_pins_the_connection_to_its_upstream_as_a_tunnel() -> None:
    c = _codec()
    c.receive_client(
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nearly"
    )
    up = new_upstream()
    c.attach(up, "e")
    sent = c.take_to_upstream()
    assert b"upgrade: websocket" in sent and b"connection: upgrade" in sent
    assert not c.wants_client_data()  # until the answer: bytes may be the new protocol's
    c.receive_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"hello"
    )
    assert c.tunnel
    out = c.take_to_client()
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and out.endswith(b"hello")
    assert c.take_to_upstream() == b"early"  # what the client sent after its head
    assert c.take_released() == []  # pinned: never pooled
    c.receive_client(b"raw")  # read before the shell switched to relaying: not lost
    assert c.take_to_upstream() == b"raw"
    ((exchange, _),) = c.take_completed()
    assert exchange.status == 101


def test_upstream_reset_before_the_response_is_503_uc_and_the_client_goes_on() -> None:
    c = _codec()
    c.receive_client(GET)
    up = new_upstream()
    c.attach(up, "e")
    c.take_to_upstream()
    c.upstream_failed()
    out = c.take_to_client()
    assert out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"connection: close" not in out
    ((exchange, _),) = c.take_completed()
    assert (exchange.status, exchange.flags) == (503, "UC")
    assert c.take_released() == [(up, False)]
    assert not c.closing and c.wants_client_data()


def test_a_direct_pods_reset_before_the_response_is_502_uc_as_its_far_node_answers() -> None:
    """A same-node pod (``direct``: no proxy of its own in front) that closes before its head
    is answered as a far node answers the source for its pod, 502 with the same body (the
    retry hook is still asked with no status: the shell knows the endpoint)."""
    c = _codec()
    c.receive_client(GET)
    asked = _retrying(c, [False])
    c.attach(new_upstream(direct=True), "e")
    c.take_to_upstream()
    c.receive_upstream(b"")
    out = c.take_to_client()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert out.endswith(b"\r\n\r\nupstream connect error or disconnect/reset before headers\n")
    assert asked == [(None, True)]
    ((exchange, _),) = c.take_completed()
    assert (exchange.status, exchange.flags) == (502, "UC")
    assert not c.closing and c.wants_client_data()


def test_upstream_reset_mid_response_closes_the_client() -> None:
    c = _codec()
    c.receive_client(GET)
    up = new_upstream()
    c.attach(up, "e")
    c.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart")
    c.upstream_failed()
    assert c.closing
    ((exchange, _),) = c.take_completed()
    assert (exchange.status, exchange.flags) == (200, "UC")
    assert c.take_released() == [(up, False)]


def test_a_local_answer_discards_the_body_and_keeps_the_connection() -> None:
    c = _codec()
    c.receive_client(b"POST /x HTTP/1.1\r\nHost: web\r\nContent-Length: 6\r\n\r\nab")
    c.respond_locally(503, "UF", b"no\n", "tag")
    assert c.take_to_client() == (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
        b"content-length: 3\r\n\r\nno\n"
    )
    assert c.take_completed() == []  # its body is still coming
    c.receive_client(b"cdef" + GET)
    ((exchange, tag),) = c.take_completed()
    assert (exchange.status, exchange.flags, exchange.request_bytes, tag) == (503, "UF", 6, "tag")
    assert c.take_to_upstream() == b""  # nothing of it went anywhere
    assert c.pending is not None and c.pending.path == "/a"


def test_a_local_answer_to_a_client_waiting_for_100_continue_closes() -> None:
    c = _codec()
    c.receive_client(
        b"PUT /u HTTP/1.1\r\nHost: w\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    c.respond_locally(503, "UH", b"none\n")
    assert b"connection: close" in c.take_to_client()
    assert c.closing


def test_request_smuggling_is_refused_before_any_upstream() -> None:
    c = _codec()
    c.receive_client(
        b"POST / HTTP/1.1\r\nHost: w\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert c.pending is None and c.closing
    assert c.take_to_client().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert c.take_rejections() == [AMBIGUOUS_LENGTH]


def test_header_timeout_is_408() -> None:
    c = _codec()
    c.receive_client(b"GET / HTTP/1.1\r\nHo")
    assert c.head_started == 5.0
    c.header_timeout()
    assert c.take_to_client().startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert c.take_rejections() == [HEADER_TIMEOUT] and c.closing


def test_client_leaving_mid_request_releases_the_upstream_as_unusable() -> None:
    c = _codec()
    c.receive_client(b"POST /x HTTP/1.1\r\nHost: w\r\nContent-Length: 6\r\n\r\nab")
    up = new_upstream()
    c.attach(up, "e")
    c.receive_client(b"")
    assert c.closing
    assert c.take_released() == [(up, False)]
    ((exchange, _),) = c.take_completed()
    assert exchange.flags == "DC"


# -- what a route adds: edits, retries, timeouts -----------------------------------------------
POST = b"POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"


def test_the_forwarded_and_response_heads_are_edited() -> None:
    c = _codec()
    c.receive_client(b"GET /old?q=1 HTTP/1.1\r\nHost: web\r\nX-Drop: 1\r\n\r\n")
    assert c.pending_target == "/old?q=1"
    c.edit_pending(lambda t, h: ("/new?q=1", [(n, v) for n, v in h if n != "x-drop"]))
    c.edit_response(lambda h: [*h, ("x-routed", "1")])
    up = new_upstream()
    c.attach(up, "e")
    assert (
        c.take_to_upstream() == b"GET /new?q=1 HTTP/1.1\r\nhost: web\r\nx-request-id: rid-1\r\n\r\n"
    )
    c.receive_upstream(OK)
    # The body's framing header stays as the endpoint sent it.
    assert c.take_to_client() == b"HTTP/1.1 200 OK\r\nx-routed: 1\r\ncontent-length: 2\r\n\r\nok"


def test_a_local_answer_carries_extra_headers() -> None:
    c = _codec()
    c.receive_client(GET)
    c.respond_locally(302, "-", b"", "e", [("location", "http://new/a")])
    assert c.take_to_client() == (
        b"HTTP/1.1 302 Found\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n"
        b"location: http://new/a\r\n\r\n"
    )


def _retrying(c: SourceHttp1[str], answers: list[bool]) -> list[tuple[int | None, bool]]:
    """Install a retry hook that answers ``answers`` in turn; returns what it was asked."""
    asked: list[tuple[int | None, bool]] = []

    def hook(status: int | None, replayable: bool) -> bool:
        asked.append((status, replayable))
        return answers.pop(0)

    c.retry_with(hook)
    return asked


def test_a_retried_status_sends_the_held_request_again_to_another_upstream() -> None:
    c = _codec()
    c.receive_client(POST)
    asked = _retrying(c, [True, False])
    first, second = new_upstream(), new_upstream()
    c.attach(first, "e1")
    sent = c.take_to_upstream()
    assert sent.endswith(b"\r\n\r\nhello")
    c.receive_upstream(UNAVAILABLE)
    assert c.take_to_client() == b""  # the client never sees the 503
    assert c.take_released() == [(first, False)]
    assert c.pending is not None and c.pending.path == "/p"
    c.attach(second, "e2")
    assert c.take_to_upstream() == sent  # the same head and body, from the buffer
    c.receive_upstream(UNAVAILABLE)  # the hook says no this time: the client gets it
    assert c.take_to_client().startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert asked == [(503, True), (503, True)]
    assert [(e.status, tag) for e, tag in c.take_completed()] == [(503, "e2")]
    assert not c.closing


def test_a_body_over_the_replay_limit_is_not_replayable() -> None:
    c = SourceHttp1[str](clock=lambda: 5.0, max_replay_bytes=4)
    c.receive_client(POST)
    asked = _retrying(c, [False])
    c.attach(new_upstream(), "e")
    c.receive_upstream(UNAVAILABLE)
    assert asked == [(503, False)]
    assert c.take_to_client().startswith(b"HTTP/1.1 503")


def test_a_reset_before_the_response_is_retried_when_the_hook_says_so() -> None:
    c = _codec()
    c.receive_client(GET)
    asked = _retrying(c, [True])
    up = new_upstream()
    c.attach(up, "e1")
    c.upstream_failed()
    assert asked == [(None, True)] and c.pending is not None
    assert c.take_released() == [(up, False)] and c.take_to_client() == b""


def test_a_request_timeout_is_504_ut_and_the_upstream_is_not_reused() -> None:
    c = _codec()
    c.receive_client(GET)
    up = new_upstream()
    c.attach(up, "e")
    c.expire(b"upstream request timeout\n")
    assert c.take_to_client().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    assert c.take_released() == [(up, False)]
    assert [(e.status, e.flags) for e, _ in c.take_completed()] == [(504, "UT")]
    assert not c.closing and c.wants_client_data()  # the next request is welcome


def test_a_timeout_after_the_response_started_closes_the_client() -> None:
    c = _codec()
    c.receive_client(GET)
    c.attach(new_upstream(), "e")
    c.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart")
    c.take_to_client()
    c.expire(b"upstream request timeout\n")
    assert c.closing and c.take_to_client() == b""
    assert [(e.status, e.flags) for e, _ in c.take_completed()] == [(200, "UT")]


def test_a_per_try_timeout_is_retried_or_else_504() -> None:
    c = _codec()
    c.receive_client(GET)
    asked = _retrying(c, [True, False])
    c.attach(new_upstream(), "e1")
    c.try_expired(b"t\n")
    assert c.pending is not None
    c.attach(new_upstream(), "e2")
    c.try_expired(b"t\n")
    assert asked == [(None, True), (None, True)]
    assert c.take_to_client().startswith(b"HTTP/1.1 504")


def test_a_mirrored_request_is_handed_over_whole_once_the_client_sent_it() -> None:
    c = _codec()
    c.receive_client(b"POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhel")
    c.mirror_with()
    c.attach(new_upstream(), "e")
    assert c.take_mirrors() == []  # not before its body ended
    c.receive_client(b"lo")
    [copy] = c.take_mirrors()
    assert (copy.body, copy.tag) == (b"hello", "e")
    up = new_upstream()
    head, data = mirror_request(up, copy, b"hello")
    assert (head.host, head.path) == ("web-shadow", "/p")
    assert data == (
        b"POST /p HTTP/1.1\r\nhost: web-shadow\r\ncontent-length: 5\r\nx-request-id: rid-1\r\n"
        b"\r\nhello"
    )
    response = DroppedResponse(up)
    assert not response.receive(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nab")
    assert response.receive(b"cd") and response.status == 201


def test_a_body_over_the_limit_is_handed_over_without_it() -> None:
    c = SourceHttp1[str](clock=lambda: 5.0, max_replay_bytes=4)
    c.receive_client(POST)
    c.mirror_with()
    c.attach(new_upstream(), "e")
    [copy] = c.take_mirrors()
    assert copy.body is None


def test_a_mirror_that_closes_early_is_an_error() -> None:
    response = DroppedResponse(new_upstream())
    assert not response.receive(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    with pytest.raises(ConnectionResetError):
        response.receive(b"")
    with pytest.raises(ConnectionResetError):
        DroppedResponse(new_upstream()).receive(b"")  # nothing at all


def test_a_mirror_answer_that_is_not_http_is_an_error() -> None:
    with pytest.raises(ConnectionResetError):
        DroppedResponse(new_upstream()).receive(b"SSH-2.0-x\r\n\r\n")


def test_a_mirror_answer_delimited_by_the_close_ends_with_it() -> None:
    response = DroppedResponse(new_upstream())
    assert not response.receive(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\nab")
    assert response.receive(b"") and response.status == 200


CHUNKED_POST = (
    b"POST /p HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nhel\r\n2\r\nlo\r\n0\r\nx-sum: 9\r\n\r\n"
)


def test_a_chunked_request_is_sent_again_chunked_with_its_trailers() -> None:
    c = _codec()
    c.receive_client(CHUNKED_POST)
    asked = _retrying(c, [True])
    c.attach(new_upstream(), "e1")
    c.take_to_upstream()
    c.receive_upstream(UNAVAILABLE)
    c.attach(new_upstream(), "e2")
    assert c.take_to_upstream() == (
        b"POST /p HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\n"
        b"x-request-id: rid-1\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 9\r\n\r\n"
    )
    assert asked == [(503, True)]


def test_a_chunked_request_is_mirrored_chunked_with_its_trailers() -> None:
    c = _codec()
    c.receive_client(CHUNKED_POST)
    c.mirror_with()
    c.attach(new_upstream(), "e")
    [copy] = c.take_mirrors()
    assert copy.body is not None
    _, data = mirror_request(new_upstream(), copy, copy.body)
    assert data.endswith(b"x-request-id: rid-1\r\n\r\n5\r\nhello\r\n0\r\nx-sum: 9\r\n\r\n")


def test_an_edit_cannot_change_how_the_request_body_is_delimited() -> None:
    c = _codec()
    c.receive_client(POST)
    c.edit_pending(lambda t, h: (t, [*(p for p in h if p[0] != "content-length"), ("a", "b")]))
    c.attach(new_upstream(), "e")
    assert c.take_to_upstream() == (
        b"POST /p HTTP/1.1\r\nhost: web\r\nx-request-id: rid-1\r\na: b\r\n"
        b"content-length: 5\r\n\r\nhello"
    )


def test_a_local_answer_to_head_has_no_body() -> None:
    c = _codec()
    c.receive_client(b"HEAD /h HTTP/1.1\r\nHost: web\r\n\r\n")
    c.respond_locally(503, "UH", b"no healthy upstream\n")
    assert c.take_to_client() == (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 0\r\n\r\n"
    )
    assert not c.closing and c.wants_client_data()


def test_bytes_after_a_response_make_its_upstream_unusable() -> None:
    c = _codec()
    c.receive_client(GET)
    up = new_upstream()
    c.attach(up, "e")
    c.receive_upstream(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")  # unasked
    assert c.take_to_client() == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    assert c.take_released() == [(up, False)]  # never handed the stray answer to a request


def test_a_response_delimited_by_the_close_is_chunked_for_the_client() -> None:
    c = _codec()
    c.receive_client(GET)
    up = new_upstream()
    c.attach(up, "e")
    c.receive_upstream(b"HTTP/1.1 200 OK\r\n\r\nsome")
    c.receive_upstream(b"")
    assert c.take_to_client() == (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nsome\r\n0\r\n\r\n"
    )
    assert c.take_released() == [(up, False)]
    ((exchange, _),) = c.take_completed()
    assert (exchange.status, exchange.flags, exchange.response_bytes) == (200, "-", 4)
    assert not c.closing


def test_the_head_timer_firing_after_an_upgrade_writes_nothing_into_the_tunnel() -> None:
    c = _codec()
    c.receive_client(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n")
    c.attach(new_upstream(), "e")
    c.receive_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n"
    )
    c.take_to_client()
    c.header_timeout()
    assert c.take_to_client() == b"" and c.take_rejections() == [] and c.tunnel


def test_an_http10_client_gets_its_response_and_the_close() -> None:
    c = _codec()
    c.receive_client(b"GET /old HTTP/1.0\r\n\r\n")
    c.attach(new_upstream(), "e")
    # Forwarded as HTTP/1.1, which must have a Host: empty, no authority being known.
    assert c.take_to_upstream() == b"GET /old HTTP/1.1\r\nhost: \r\nx-request-id: rid-1\r\n\r\n"
    c.receive_upstream(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    assert c.take_to_client() == b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nok"
    assert c.closing


def test_a_try_answered_at_its_endpoint_is_asked_about_like_a_response_and_sent_again() -> None:
    """A same-node endpoint's refusal (``answer_try``): the body that came with the head is
    taken for the replay (as it would have gone to a far node before its answer came), the
    hook sees the status, and the request goes to the next upstream whole."""
    c = _codec()
    c.receive_client(POST)
    asked = _retrying(c, [True, False])
    c.answer_try(429, "RL", b"local_rate_limited", "e1")
    assert asked == [(429, True)]
    assert c.take_to_client() == b"" and c.take_to_upstream() == b""  # nothing went anywhere
    assert c.pending is not None and c.pending.path == "/p"
    c.attach(new_upstream(), "e2")
    assert c.take_to_upstream().endswith(b"\r\n\r\nhello")
    c.receive_upstream(OK)
    assert asked == [(429, True), (200, True)]
    assert [(e.status, e.flags, tag) for e, tag in c.take_completed()] == [(200, "-", "e2")]


def test_a_try_answered_at_its_endpoint_and_not_retried_is_the_clients_answer() -> None:
    c = _codec()
    c.receive_client(b"POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhe")
    asked = _retrying(c, [False])
    c.answer_try(429, "RL", b"local_rate_limited", "e1")
    assert asked == [(429, False)]  # the body is not all there: it could not be sent again
    assert c.take_to_client() == (
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\n"
        b"content-length: 18\r\n\r\nlocal_rate_limited"
    )
    c.receive_client(b"llo" + GET)
    ((exchange, tag),) = c.take_completed()
    assert (exchange.status, exchange.flags, exchange.request_bytes, tag) == (429, "RL", 5, "e1")
    assert c.pending is not None and c.pending.path == "/a"


@pytest.mark.parametrize("direct", [True, False])
def test_a_response_of_more_fields_than_the_limit_is_answered_as_one_over_the_bytes(
    direct: bool,
) -> None:
    """Past the field count an endpoint's response is what one over the byte limit is: the
    upstream is gone before its head (502 from a same-node pod, 503 UC from a far node, as its
    far node answers), counted ``UPSTREAM_PROTOCOL``."""
    answers = []
    for response in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"
        + b"".join(b"x%d: v\r\n" % i for i in range(100))
        + b"\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nx: " + b"v" * 61 * 1024 + b"\r\n\r\n",
    ):
        c = _codec()
        c.receive_client(GET)
        c.attach(new_upstream(direct=direct), "e")
        c.take_to_upstream()
        c.receive_upstream(response)
        ((exchange, _),) = c.take_completed()
        answers.append((c.take_to_client()[:13], c.rejections, exchange.status, exchange.flags))
    assert answers[0] == answers[1]
    status = 502 if direct else 503
    assert answers[0] == (b"HTTP/1.1 %d " % status, [UPSTREAM_PROTOCOL], status, "UC")


def test_a_chosen_field_count_bounds_the_clients_heads_and_the_endpoints_responses() -> None:
    """``--max-header-fields`` at the source: a client's head past it is 431 naming the count,
    and an endpoint's response past it is what one past the default is (503 ``UC``)."""
    fields = b"".join(b"x%d: v\r\n" % i for i in range(20))
    c: SourceHttp1[str] = SourceHttp1(max_fields=20)
    c.receive_client(b"GET / HTTP/1.1\r\nHost: web\r\n" + fields + b"\r\n")
    answer = c.take_to_client()
    assert answer.startswith(b"HTTP/1.1 431 ") and answer.endswith(
        b": more than 20 header fields\n"
    )
    c = SourceHttp1(max_fields=20)
    c.receive_client(GET)
    c.attach(new_upstream(max_fields=20), "e")
    c.take_to_upstream()
    c.receive_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n" + fields + b"\r\n")
    assert c.take_to_client().startswith(b"HTTP/1.1 503 ") and c.rejections == [UPSTREAM_PROTOCOL]


def test_a_thousand_pipelined_requests_are_served_in_order_a_few_parsed_at_a_time() -> None:
    """The source's reader, too, parses at most ``MAX_WAITING`` pipelined heads ahead of the
    request being served; the rest of the read waits as bytes and is served in order."""
    c = _codec()
    c.receive_client(b"".join(b"GET /%d HTTP/1.1\r\nHost: web\r\n\r\n" % i for i in range(1000)))
    assert c.client.held and not c.wants_client_data()
    most, sent = c.client.waiting, []
    for _ in range(1000):
        assert c.pending is not None
        c.attach(new_upstream(), "e")
        sent.append(c.take_to_upstream().split(b" ", 2)[1])
        c.receive_upstream(OK)
        most = max(most, c.client.waiting)
    assert sent == [b"/%d" % i for i in range(1000)]
    assert [e.head.path for e, _ in c.take_completed()] == [f"/{i}" for i in range(1000)]
    assert c.take_to_client() == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" * 1000
    assert 0 < most <= MAX_WAITING and not c.client.held and c.wants_client_data()


def _at_the_limits(start: bytes, fields: int, sized: int) -> bytes:
    """A head of exactly ``fields`` fields and exactly ``DEFAULT_MAX_HEAD_BYTES`` as the readers
    size it (``field_size`` of each field, and ``sized`` for the start line: a request's
    method and target, a response's reason)."""
    small = [(b"x%d" % i, b"v") for i in range(fields - 1)]
    room = DEFAULT_MAX_HEAD_BYTES - sized - sum(field_size(n, v) for n, v in small)
    big = (b"big", b"b" * (room - field_size(b"big", b"")))
    return start + b"".join(b"%s: %s\r\n" % f for f in [*small, big]) + b"\r\n"


def _peer_reads(data: bytes, allowance: Allowance) -> bytes:
    """What a destination reader at 20 fields, given ``allowance``, makes of ``data``: the
    forwarded request line, or the status line of its refusal."""
    p = Http1Proxy(authorize=lambda h: Verdict(True), max_fields=20, allowance=allowance)
    p.receive_client(data)
    return (p.take_to_upstream() or p.take_to_client()).split(b"\r\n")[0]


def test_what_the_source_adds_to_a_head_at_the_limits_is_what_a_peer_admits_on_top() -> None:
    """An HTTP/1.0 request at both limits, without Host or x-request-id, is admitted by the
    source and forwarded with both added (a mirrored copy's Host suffixed ``-shadow`` too):
    over the limits by exactly ``PEER_REQUEST``, which a destination reader admits on top for
    a source node, and only for one (a plaintext client's reader has no allowance)."""
    client = _at_the_limits(b"GET / HTTP/1.0\r\n", 20, sized=4)
    c: SourceHttp1[str] = SourceHttp1(max_fields=20)
    c.receive_client(client)
    c.mirror_with()
    c.attach(new_upstream(max_fields=20, peer=True), "e")
    forwarded = c.take_to_upstream()
    (copy,) = c.take_mirrors()
    _, mirrored = mirror_request(new_upstream(max_fields=20, peer=True), copy, b"")
    assert b"\r\nhost: -shadow\r\nx-request-id: " in mirrored
    fewer_bytes = Allowance(PEER_REQUEST.fields, PEER_REQUEST.size - 1)
    fewer_fields = Allowance(PEER_REQUEST.fields - 1, PEER_REQUEST.size)
    assert _peer_reads(client, NO_ALLOWANCE) == b"GET / HTTP/1.1"  # at the limits: read
    for sent in (forwarded, mirrored):
        assert _peer_reads(sent, PEER_REQUEST) == b"GET / HTTP/1.1"
        assert _peer_reads(sent, NO_ALLOWANCE).startswith(b"HTTP/1.1 431 ")
        assert _peer_reads(sent, fewer_fields).startswith(b"HTTP/1.1 431 ")
    assert _peer_reads(mirrored, fewer_bytes).startswith(b"HTTP/1.1 431 ")


def test_what_a_destination_adds_to_a_response_at_the_limits_is_what_the_source_admits() -> None:
    """A pod's HTTP/1.0 response at both limits that does not keep its connection is passed by
    its node with ``connection: close`` added: the source reads it whole from a destination
    node (``peer``), and refuses it from an endpoint without one (503)."""
    pod = _at_the_limits(b"HTTP/1.0 200 OK\r\n", 20, sized=2)
    p = Http1Proxy(authorize=lambda h: Verdict(True), max_fields=20)
    p.receive_client(b"GET / HTTP/1.1\r\nHost: s\r\n\r\n")
    p.take_to_upstream()
    p.receive_upstream(pod)
    passed = p.take_to_client()
    assert b"\r\nconnection: close\r\n" in passed and not pod.lower().count(b"connection")
    for peer, status in ((True, b"200"), (False, b"503")):
        c: SourceHttp1[str] = SourceHttp1(max_fields=20)
        c.receive_client(GET)
        c.attach(new_upstream(max_fields=20, peer=peer), "e")
        c.take_to_upstream()
        c.receive_upstream(passed)
        assert c.take_to_client().startswith(b"HTTP/1.1 %s " % status)


def test_an_absolute_form_request_is_routed_by_its_path_and_authority() -> None:
    """Routes match the target's path and its authority as Host, as the pod reads it."""
    c = _codec()
    c.receive_client(b"GET http://other:81/v2/x?y=1 HTTP/1.1\r\nHost: web\r\n\r\n")
    assert c.pending is not None and (c.pending.path, c.pending.host) == ("/v2/x", "other:81")
    assert c.pending_target == "/v2/x?y=1"
    c.attach(new_upstream(), "e")
    assert c.take_to_upstream().startswith(b"GET /v2/x?y=1 HTTP/1.1\r\nhost: other:81\r\n")


def test_an_http10_keep_alive_client_is_told_its_connection_goes_on() -> None:
    """As at the destination (``test_http1_codec.py``), for a response and a local answer."""
    c = _codec()
    c.receive_client(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    c.attach(new_upstream(), "e")
    c.receive_upstream(OK)
    assert c.take_to_client() == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nok"
    )
    c.receive_client(b"GET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    c.respond_locally(503, "UH", b"no healthy upstream")
    assert b"\r\nconnection: keep-alive\r\n\r\nno healthy" in c.take_to_client()
    assert not c.closing
