"""``H2Core._new_exchange`` (one pass over a request's header block) against the lookups it
replaced (``header`` per name, the first field of each name counting): hypothesis feeds both
arbitrary blocks of the names it reads, repeated, empty and absent, and compares the heads,
the gRPC flag and the request id made."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from hpack import NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy.paths import normalized_path
from agent.proxy.h2exchange import H2Exchange, header
from agent.proxy.h2proxy import H2Proxy
from agent.proxy.http1 import RequestHead, Verdict
from agent.proxy.http_inbound import ALLOWED
from agent.telemetry.records import trace_headers_of

Header = tuple[bytes, bytes]


def _allow(_head: RequestHead) -> Verdict:
    return ALLOWED


def _before(proxy: H2Proxy, headers: Sequence[Header]) -> tuple[H2Exchange, bytes | None]:
    """What ``_new_exchange`` did before it read the block in one pass (the path normalized
    by ``normalized_path`` on every path)."""
    path = normalized_path(header(headers, b":path") or b"")
    authority = header(headers, b":authority") or header(headers, b"host") or b""
    request_id = sent = header(headers, b"x-request-id")
    if request_id is None:
        request_id = proxy.new_request_id().encode()
    head = RequestHead(
        (header(headers, b":method") or b"").decode("latin-1"),
        path.split(b"?", 1)[0].decode("latin-1"),
        authority.decode("latin-1"),
        request_id.decode("latin-1"),
        trace=trace_headers_of(headers),
        headers=[(n, v) for n, v in headers if not n.startswith(b":")],
    )
    grpc = (header(headers, b"content-type") or b"").startswith(b"application/grpc")
    return H2Exchange(head, grpc, proxy.clock()), None if sent is not None else request_id


NAMES = [b":method", b":path", b":authority", b":scheme", b"host", b"x-request-id",
         b"content-type", b"traceparent", b"te", b"x-other", b":", b"c"]  # fmt: skip
VALUES = [b"", b"POST", b"/pkg.Svc/M?x=1", b"/%61dmin/./x\\..?%61", b"/a/../b", b"/", b"svc:80",
          b"id-1", b"application/grpc", b"application/grpc+proto", b"text/plain",
          b"00-ab-cd-01"]  # fmt: skip
fields = st.tuples(
    st.one_of(st.sampled_from(NAMES), st.binary(max_size=6)),
    st.one_of(st.sampled_from(VALUES), st.binary(max_size=12)),
    st.booleans(),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(fields, max_size=12))
def test_one_pass_exchange_is_what_the_lookups_made(block: list[tuple[bytes, bytes, bool]]) -> None:
    headers = [NeverIndexedHeaderTuple(n, v) if never else (n, v) for n, v, never in block]
    ids = (f"made-{i}" for i in itertools.count())
    ours = H2Proxy(_allow, clock=lambda: 1.0, new_request_id=lambda: next(ids))
    ids_before = (f"made-{i}" for i in itertools.count())
    theirs = H2Proxy(_allow, clock=lambda: 1.0, new_request_id=lambda: next(ids_before))
    got, made, path = ours._new_exchange(headers)
    want, want_made = _before(theirs, headers)
    assert made == want_made
    sent = header(headers, b":path")
    assert path == (
        None if sent is None or normalized_path(sent) == sent else normalized_path(sent)
    )
    assert (got.head, got.grpc, got.started) == (want.head, want.grpc, want.started)
    assert [tuple(h) for h in got.head.headers] == [tuple(h) for h in want.head.headers]
