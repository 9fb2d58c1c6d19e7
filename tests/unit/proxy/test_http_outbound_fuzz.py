"""hypothesis: arbitrary and near-HTTP bytes from the client and from its upstreams never crash
the source node's HTTP/1.1 layer, and upstream halves are handed back soundly.

The test plays the shell (``http_outbound``): it reads the client only when the codec wants
bytes, attaches a pooled or fresh upstream half to each pending request (or answers it here),
and pools the halves released as reusable. Whatever arrives, ``SourceHttp1`` must answer,
refuse or close, never raise (an exception in the shell would drop the client without the
response it is owed); a half is released once per attach, and one released as reusable can be
attached again (``attach`` asserts it is idle). A route's hooks play along: a pending request
may get a retry hook (answering as drawn, then yes), a mirror, head edits, and its time may run
out (``expire``, ``try_expired``); a retried request goes back to ``pending`` and its try's half
is released like any other. ``make fuzz`` runs it with more examples
(``tests.fuzzing``).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.proxy.http_outbound_codec import SourceHttp1, UpstreamHalf, new_upstream
from tests.fuzzing import fuzz_examples

EXAMPLES = fuzz_examples(300)

# Whole messages as often as tokens and as random bytes, so that exchanges get far enough to
# attach, answer, release and pool.
REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: s\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
]  # fmt: skip
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"HTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
]  # fmt: skip
CLIENT_TOKENS = [
    b"GET / HTTP/1.1\r\n", b"POST /a?b HTTP/1.1\r\n", b"HEAD / HTTP/1.1\r\n", b"GET / HTTP/1.0\r\n",
    b"Host: s\r\n", b"Content-Length: 3\r\n", b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n", b"Connection: upgrade\r\n",
    b"Upgrade: websocket\r\n", b"Expect: 100-continue\r\n", b"X-Request-Id: r\r\n", b"\r\n",
    b"3\r\nabc\r\n", b"0\r\n\r\n", b"0\r\nT: 1\r\n\r\n", b"abc", b" ", b"\n",
]  # fmt: skip
UPSTREAM_TOKENS = [
    b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 204 No Content\r\n", b"HTTP/1.1 100 Continue\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n", b"HTTP/1.0 200 OK\r\n", b"Content-Length: 3\r\n",
    b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n", b"Connection: close\r\n",
    b"Connection: upgrade\r\n", b"Upgrade: websocket\r\n", b"Trailer: T\r\n", b"\r\n",
    b"3\r\nabc\r\n", b"0\r\n\r\n", b"0\r\nT: 1\r\n\r\n", b"abc", b" ",
]  # fmt: skip
CLIENT, UPSTREAM, ATTACH, LOCAL, FAIL, ROUTE, EXPIRE, TRY_EXPIRE = range(8)


def _pieces(whole: list[bytes], tokens: list[bytes]) -> st.SearchStrategy[list[bytes]]:
    piece = st.one_of(st.sampled_from(whole), st.sampled_from(tokens), st.binary(max_size=12))
    return st.lists(piece, max_size=30)


@pytest.mark.fuzz
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    client=_pieces(REQUESTS, CLIENT_TOKENS),
    upstream=_pieces(RESPONSES, UPSTREAM_TOKENS),
    steps=st.lists(st.integers(min_value=CLIENT, max_value=TRY_EXPIRE), max_size=80),
    eof=st.booleans(),
    retries=st.lists(st.booleans(), max_size=8),
)
def test_arbitrary_bytes_from_client_and_upstreams_never_raise(
    client: list[bytes], upstream: list[bytes], steps: list[int], eof: bool, retries: list[bool]
) -> None:
    c: SourceHttp1[int] = SourceHttp1(max_replay_bytes=8)
    answers = iter(retries)
    pool: list[UpstreamHalf] = []
    attached: set[int] = set()  # ids of the halves attached and not yet released

    def settle() -> None:
        c.take_to_client()
        c.take_to_upstream()
        c.take_completed()
        c.take_rejections()
        c.take_mirrors()
        for half, reusable in c.take_released():
            assert id(half) in attached, "a half released twice, or never attached"
            attached.discard(id(half))
            if reusable:
                pool.append(half)

    for step in steps:
        if c.pending is not None and step == ROUTE:
            c.retry_with(lambda _status, _replayable: next(answers, True))
            c.mirror_with()
            c.edit_pending(lambda target, headers: (target + "r", [*headers, ("x-r", "1")]))
            c.edit_response(lambda headers: [*headers, ("x-r", "1")])
        elif c.pending is not None and step in (ATTACH, LOCAL, FAIL):
            if step == ATTACH:
                half = pool.pop() if pool else new_upstream()
                attached.add(id(half))
                c.attach(half, len(attached))
            else:
                c.respond_locally(503, "UF" if step == LOCAL else "UH", b"no\n", 0)
        elif step == CLIENT and client and c.wants_client_data():
            c.receive_client(client.pop(0))
        elif step == UPSTREAM and upstream and c.attached:
            c.receive_upstream(upstream.pop(0))
        elif step == FAIL:
            c.upstream_failed()
        elif step == EXPIRE:
            c.expire(b"timeout\n")
        elif step == TRY_EXPIRE:
            c.try_expired(b"timeout\n")
        settle()
    if eof:
        c.receive_upstream(b"")
        c.receive_client(b"")
        settle()
    c.header_timeout()
    settle()
    assert c.closing or c.tunnel  # whatever happened, the connection is now ending
    if not c.tunnel:  # (a tunnel keeps its upstream, pinned)
        assert not attached, "a closed connection kept an upstream half attached"
