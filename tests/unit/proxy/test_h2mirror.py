"""A RequestMirror copy on HTTP/2, sans-IO: ``H2Proxy`` hands over complete requests, and
``MirrorCall`` sends one on its own connection to an ``h2`` server and drops the answer."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from h2.events import DataReceived, RequestReceived, StreamEnded, TrailersReceived

from agent.proxy.h2exchange import Choice, LocalAnswer, PickRequest
from agent.proxy.h2limits import H2Limits
from agent.proxy.h2mirror import MirrorCall, shadow_request
from agent.proxy.http_mirror import MAX_MIRRORS
from agent.proxy.http_outbound import HttpOutbound
from tests.unit.proxy.h2peers import peer
from tests.unit.proxy.test_h2proxy import Pods, _grpc_call

HEAD = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"grpc"),
        (b":path", b"/pkg.Svc/Do"), (b"content-type", b"application/grpc")]  # fmt: skip


def _mirroring(request: PickRequest) -> Choice | LocalAnswer:
    if request.head.path == "/local":
        return LocalAnswer(404, "NR", b"no route")
    return Choice("a", tag="plan", mirror=True)


def test_a_complete_request_is_handed_over_once_with_its_body_and_trailers() -> None:
    w = Pods(_mirroring)
    sid = w.client.get_next_available_stream_id()
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "grpc"),
               (":path", "/pkg.Svc/Do"), ("content-type", "application/grpc")]  # fmt: skip
    w.client.send_headers(sid, headers)
    w.client.send_data(sid, b"part-1 ")
    w.run()
    assert w.proxy.take_mirrors() == []  # not before the client sent all of it
    w.client.send_data(sid, b"part-2")
    w.client.send_headers(sid, [("x-end", "1")], end_stream=True)
    w.run()
    (copy,) = w.proxy.take_mirrors()
    assert dict(copy.head)[b":path"] == b"/pkg.Svc/Do" and b"x-request-id" in dict(copy.head)
    assert (copy.body, copy.trailers, copy.tag) == (b"part-1 part-2", [(b"x-end", b"1")], "plan")
    assert w.proxy.take_mirrors() == []
    # The primary went on untouched.
    got = b"".join(e.data for e in w.pod_events["a"] if isinstance(e, DataReceived))
    assert got == b"part-1 part-2"


def test_a_body_over_the_limit_is_handed_over_without_it_and_a_local_answer_not_at_all() -> None:
    w = Pods(_mirroring)
    w.proxy.limits = H2Limits(max_replay_body=4)
    _grpc_call(w, b"01234")
    w.request("/local")
    w.run()
    (copy,) = w.proxy.take_mirrors()
    assert copy.body is None  # the shell counts it ``too_large``


def test_a_response_beyond_one_window_is_read_to_its_end_and_dropped() -> None:
    call = MirrorCall(HEAD, b"", None)
    server = peer(client_side=False)
    (request,) = [e for e in server.receive_data(call.data_to_send())
                  if isinstance(e, RequestReceived)]  # fmt: skip
    sid = request.stream_id
    server.send_headers(sid, [(b":status", b"200")])
    left = 200_000  # three times the default window: only the call's acknowledgements let it go
    while not call.done:
        n = min(left, server.local_flow_control_window(sid), server.max_outbound_frame_size)
        if n:
            left -= n
            server.send_data(sid, b"r" * n, end_stream=left == 0)
        assert n or left == 0, "the call stopped acknowledging the response"
        call.receive(server.data_to_send())
        server.receive_data(call.data_to_send())
    assert (call.status, left) == (200, 0)


def test_a_mirror_call_marks_the_authority_and_sends_a_body_beyond_one_window() -> None:
    body = bytes(range(256)) * 300  # 76,800 bytes: more than the default 65,535-byte window
    call = MirrorCall(HEAD, body, [(b"x-end", b"1")])
    server = peer(client_side=False)
    received, ended, trailers = b"", False, None
    while not ended:
        for event in server.receive_data(call.data_to_send()):
            if isinstance(event, RequestReceived):
                assert dict(event.headers)[b":authority"] == b"grpc-shadow"
            elif isinstance(event, DataReceived):
                received += event.data
                server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, TrailersReceived):
                trailers = event.headers
            elif isinstance(event, StreamEnded):
                ended = True
                server.send_headers(event.stream_id, [(b":status", b"503")], end_stream=True)
        call.receive(server.data_to_send())
    assert received == body and trailers == [(b"x-end", b"1")]
    assert call.done and call.status == 503


def test_a_mirror_call_ends_when_the_endpoint_closes() -> None:
    call = MirrorCall(HEAD, b"", None)
    call.receive(b"")
    assert call.done and call.status == 0


def test_a_delayed_request_is_copied_when_it_is_sent_not_before() -> None:
    now = [10.0]
    w = Pods(lambda _r: Choice("a", tag="plan", mirror=True, delay=1.0), clock=lambda: now[0])
    _grpc_call(w, b"body")
    w.run()
    assert w.proxy.take_mirrors() == []  # complete, but held by the injected delay
    now[0] = 11.0
    w.proxy.expire()
    w.run()
    (copy,) = w.proxy.take_mirrors()
    assert copy.body == b"body"


def test_what_a_copys_destination_authorizes_is_the_shadow_request() -> None:
    head = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"web"),
            (b":path", b"/pkg.Echo/Unary?x=1"), (b"content-type", b"application/grpc")]  # fmt: skip
    request = shadow_request(head)
    assert (request.method, request.path, request.host) == ("POST", "/pkg.Echo/Unary", "web-shadow")
    assert list(request.headers) == [(b"content-type", b"application/grpc")]


def test_a_request_refused_where_it_is_sent_is_copied_as_one_a_far_pod_refuses() -> None:
    """A far node refuses a request after its head went there, so the source copies it; a
    same-node endpoint's refusal (``admit``'s answer where the head goes) is the same try's
    answer, so its request is copied too: once, with its body, both ways."""
    refused = LocalAnswer(403, "RBAC", b"RBAC: access denied", grpc_status=7, upstream="a")
    copies = []
    for admit in (None, lambda _ex, _key, _uid: refused):
        w = Pods(lambda _r: Choice("a", tag="plan", mirror=True), admit=admit)
        sid = _grpc_call(w, b"body")
        w.run()
        if admit is None:  # the far pod's own node answers it there
            (request,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
            w.pods["a"].send_headers(request.stream_id, DENIED_THERE, end_stream=True)
            w.run()
        assert w.responses()[sid][b"grpc-status"] == b"7"
        (copy,) = w.proxy.take_mirrors()
        copies.append((dict(copy.head)[b":path"], copy.body, copy.tag))
    assert copies[0] == copies[1] == (b"/pkg.Svc/Do", b"body", "plan")


DENIED_THERE = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                (b"grpc-status", b"7")]  # fmt: skip


def test_copies_past_the_node_limit_are_dropped_and_counted_and_room_is_made_as_they_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``HttpOutbound.mirror`` (both protocols' copies go through it): at most
    ``MAX_MIRRORS`` copies in flight per node, a mirror endpoint that never answers holds no
    more; each one past the limit starts nothing and counts ``overflow``, and a copy that ends
    makes room for the next. Copies here wait until released, standing in for slow endpoints."""
    counted: Counter[tuple[str, str]] = Counter()
    service = SimpleNamespace(count=lambda event, detail="": counted.update([(event, detail)]))
    http = HttpOutbound.__new__(HttpOutbound)  # only what ``mirror`` reads
    http.outbound = SimpleNamespace(core=SimpleNamespace(snapshot=lambda: None))  # type: ignore[assignment]
    http.router = SimpleNamespace(traffic=SimpleNamespace(service=lambda snap, s: service))  # type: ignore[assignment]
    started: list[str] = []

    async def main() -> None:
        http.mirroring = set()
        release = asyncio.Event()

        async def copy(target: Any, source: Any, record: Any, where: str, send: Any) -> None:
            started.append(where)
            await release.wait()

        monkeypatch.setattr(http, "copy", copy)
        target = SimpleNamespace(service=SimpleNamespace(name="web-shadow", namespace="default"))

        def mirror(where: str) -> None:
            http.mirror([target], True, None, None, where, None)  # type: ignore[list-item, arg-type]

        for i in range(MAX_MIRRORS + 3):
            mirror(f"r{i}")
        await asyncio.sleep(0)
        assert len(http.mirroring) == MAX_MIRRORS
        assert len(started) == MAX_MIRRORS
        assert counted == {("http_mirror", "overflow"): 3}
        release.set()
        while http.mirroring:
            await asyncio.sleep(0)
        mirror("after")
        await asyncio.sleep(0)
        assert started[-1] == "after"
        assert counted == {("http_mirror", "overflow"): 3}
        await asyncio.gather(*http.mirroring)

    asyncio.run(asyncio.wait_for(main(), 10))
