"""hypothesis: arbitrary and near-HTTP bytes from either side never crash the HTTP/1.1 layer.

Whatever arrives, ``Http1Proxy`` must answer, refuse or close, never raise: an exception in the
shell would tear down the connection without the 400 the client is owed and without counting
the cause. ``make fuzz`` runs it with more examples (``tests.fuzzing``).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.proxy.http1 import Http1Proxy, Verdict
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
