"""``check_block`` applies ``h2``'s inbound header rules: the same blocks accepted, the same
rejected, the same headers out (``h2``'s ``validate_headers`` after its
``normalize_inbound_headers`` is the oracle, under hypothesis, plus named cases)."""

from __future__ import annotations

from collections import Counter

import pytest
from h2.events import RequestReceived
from h2.exceptions import ProtocolError
from h2.utilities import HeaderValidationFlags, normalize_inbound_headers, validate_headers
from hpack import NeverIndexedHeaderTuple
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy import h2headers
from agent.proxy.h2headers import Block, MalformedHeaders, check_block
from agent.proxy.h2relay import H2Relay
from tests.fuzzing import fuzz_examples
from tests.unit.proxy import h2peers
from tests.unit.proxy.test_h2proxy import Pods

Header = tuple[bytes, bytes]

FLAGS = {
    Block.REQUEST: HeaderValidationFlags(False, False, False, False),
    Block.RESPONSE: HeaderValidationFlags(True, False, True, False),
    Block.TRAILERS: HeaderValidationFlags(False, True, False, False),
}


def h2_verdict(headers: list[Header], kind: Block) -> list[Header] | None:
    """What ``h2`` makes of the block: its headers, or None if it rejects it; and one rule
    beyond ``h2``'s, RFC 9113 8.3.2's: ``:status`` is three digits (``check_block`` bounds the
    response codes an upstream can make the metrics count)."""
    if any(n == b":status" and not (len(v) == 3 and v.isdigit()) for n, v in headers):
        return None
    flags = FLAGS[kind]
    try:
        return list(validate_headers(normalize_inbound_headers(headers, flags), flags))
    except ProtocolError:
        return None


def ours(headers: list[Header], kind: Block) -> list[Header] | None:
    try:
        return list(check_block(headers, kind))
    except MalformedHeaders:
        return None


# Mostly fields that are fine on their own, so that a block is often valid but for one field
# (a block broken twice over tells nothing about either rule).
plain_names = st.sampled_from(
    [
        b"content-type",
        b"x-request-id",
        b"grpc-status",
        b"user-agent",
        b"te",
        b"cookie",
        b"host",
        b"!#$%&'*+-.^_`|~09",
    ]
)
odd_names = st.sampled_from(
    [
        b":method",
        b":scheme",
        b":authority",
        b":path",
        b":status",
        b":protocol",
        b":x",
        b":",
        b"",
        b"connection",
        b"upgrade",
        b"keep-alive",
        b"X-Upper",
        b"a:b",
        b"sp ace",
        b"\x7f",
        b"\xc3\xa9",
    ]
)
names = st.one_of(plain_names, plain_names, plain_names, odd_names, st.binary(max_size=4))
plain_values = st.sampled_from(
    [b"", b"s", b"t", b"trailers", b"a b", b"/a?b", b"200", b"application/grpc", b"\xff"]
)
odd_values = st.sampled_from(
    [
        b"GET",
        b"POST",
        b"CONNECT",
        b"http",
        b"/",
        b"TRAILERS",
        b"gzip",
        b" a",
        b"a ",
        b"\ta",
        b"a\t",
        b"a\rb",
        b"a\nb",
        b"a\0b",
        b"websocket",
    ]
)
values = st.one_of(plain_values, plain_values, odd_values, st.binary(max_size=4))
blocks = st.lists(st.tuples(names, values), max_size=5)
request_starts = st.sampled_from(
    [
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"s"), (b":path", b"/")],
        [(b":method", b"CONNECT"), (b":authority", b"s")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"s")],  # :path to come
        [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"s"),
        ],
        [(b":status", b"200")],
        [],
    ]
)


@settings(max_examples=fuzz_examples(600), deadline=None)
@given(start=request_starts, rest=blocks, kind=st.sampled_from(list(Block)))
def test_blocks_are_judged_as_h2_judges_them(
    start: list[Header], rest: list[Header], kind: Block
) -> None:
    block = start + rest
    assert ours(block, kind) == h2_verdict(block, kind)


GRPC_CALL = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/pkg.Echo/Unary"),
    (b":authority", b"echo:50051"),
    (b"te", b"trailers"),
    (b"content-type", b"application/grpc"),
]


@pytest.mark.parametrize(
    ("block", "kind"),
    [
        ([*GRPC_CALL, (b"X-Upper", b"1")], Block.REQUEST),
        ([*GRPC_CALL, (b"x", b"a\r\nb: c")], Block.REQUEST),
        ([*GRPC_CALL, (b"connection", b"close")], Block.REQUEST),
        ([*GRPC_CALL, (b"te", b"gzip")], Block.REQUEST),
        ([*GRPC_CALL[1:]], Block.REQUEST),  # no :method
        ([*GRPC_CALL, (b":method", b"GET")], Block.REQUEST),  # duplicate, and after regular
        ([*GRPC_CALL, (b"host", b"other")], Block.REQUEST),
        ([*GRPC_CALL, (b"host", b"echo:50051"), (b"host", b"echo:50051")], Block.REQUEST),
        ([*GRPC_CALL[:2], (b":path", b""), *GRPC_CALL[3:]], Block.REQUEST),
        ([(b":x", b"1"), *GRPC_CALL], Block.REQUEST),  # no such pseudo-header
        ([(b":protocol", b"websocket"), *GRPC_CALL], Block.REQUEST),  # only with CONNECT
        ([*GRPC_CALL[:2], *GRPC_CALL[3:], (b":path", b"/")], Block.REQUEST),  # after regular
        ([(b":status", b"200"), (b":path", b"/")], Block.RESPONSE),
        ([(b"grpc-status", b"0"), (b":status", b"200")], Block.TRAILERS),
    ],
)
def test_malformed_blocks_are_refused(block: list[Header], kind: Block) -> None:
    assert h2_verdict(block, kind) is None
    with pytest.raises(MalformedHeaders):
        check_block(block, kind)


@pytest.mark.parametrize("status", [b"2000", b"20", b"", b"2x0", b"\xb2\xb2\xb2", b"1" * 5000])
def test_a_status_that_is_not_three_digits_is_refused(status: bytes) -> None:
    """Taken as a number, such a code was a new ``response_code`` series per value (and one
    of 5,000 digits raised ``int``'s digit limit inside the proxy)."""
    with pytest.raises(MalformedHeaders, match="three-digit"):
        check_block([(b":status", status)], Block.RESPONSE)
    assert check_block([(b":status", b"204")], Block.RESPONSE) == [(b":status", b"204")]


def test_a_well_formed_block_comes_back_and_split_cookies_are_joined_last() -> None:
    assert check_block(GRPC_CALL, Block.REQUEST) is GRPC_CALL
    split = [*GRPC_CALL[:4], (b"cookie", b"a=1"), *GRPC_CALL[4:], (b"cookie", b"b=2")]
    assert list(check_block(split, Block.REQUEST)) == [*GRPC_CALL, (b"cookie", b"a=1; b=2")]


def test_names_seen_well_formed_are_kept_bounded_and_bad_ones_never() -> None:
    """``check_block`` keeps the names that matched (not matched again), never one that did
    not, and at most ``_GOOD_NAMES`` of them, each at most ``_GOOD_NAME_LENGTH`` bytes."""
    h2headers._good_names.clear()
    check_block([*GRPC_CALL, (b"x-a", b"1")], Block.REQUEST)
    assert {b":method", b"content-type", b"x-a"} <= h2headers._good_names
    with pytest.raises(MalformedHeaders):
        check_block([*GRPC_CALL, (b"X-A", b"1")], Block.REQUEST)
    assert b"X-A" not in h2headers._good_names
    long = b"x" * (h2headers._GOOD_NAME_LENGTH + 1)
    check_block([*GRPC_CALL, (long, b"1")], Block.REQUEST)
    assert long not in h2headers._good_names
    for i in range(h2headers._GOOD_NAMES + 10):
        check_block([*GRPC_CALL, (b"x-%d" % i, b"1")], Block.REQUEST)
    assert len(h2headers._good_names) == h2headers._GOOD_NAMES
    with pytest.raises(MalformedHeaders):  # matched again once full: still refused
        check_block([*GRPC_CALL, (b"X-B", b"1")], Block.REQUEST)


def _outcome(check: object, block: list[Header]) -> object:
    try:
        return list(check(block))  # type: ignore[operator]
    except MalformedHeaders as e:
        return str(e)


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(
    pool=st.lists(st.tuples(request_starts, blocks), min_size=1, max_size=12),
    picks=st.lists(st.integers(0, 11), max_size=40),
    kind=st.sampled_from(list(Block)),
)
def test_checked_blocks_judge_blocks_sent_again_as_check_block_does(
    pool: list[tuple[list[Header], list[Header]]], picks: list[int], kind: Block
) -> None:
    """Blocks from a few (well formed, malformed, with cookies) sent again and again in any
    order, past the number kept: each judged as ``check_block`` judges it (the same headers
    out, the same refusal)."""
    kept = h2headers.CheckedBlocks(kind)
    for pick in picks:
        start, rest = pool[pick % len(pool)]
        block = start + rest
        assert _outcome(kept.check, block) == _outcome(lambda b: check_block(b, kind), block)


def test_blocks_sent_again_on_a_connection_are_not_checked_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ten gRPC calls, the client sending the same head and the pod answering each with the
    same head (and, at the relay, the same trailers): the source's ``H2Proxy`` and the
    destination's relay each check each of those blocks once, on the first call, not on
    every call (20 and 30 checks before), and every call is answered."""
    checked: Counter[tuple[str, Block]] = Counter()
    real = h2headers._check
    side = ["source"]

    def counted(headers: list[Header], kind: Block, *, joined: bool) -> object:
        checked[(side[0], kind)] += 1
        return real(headers, kind, joined=joined)

    monkeypatch.setattr(h2headers, "_check", counted)
    source = Pods()
    for _ in range(10):
        source.request("/a/1", grpc=True)
        source.run()
        source.respond("a")
    side[0] = "relay"
    monkeypatch.setattr(h2peers, "H2Proxy", H2Relay)
    relay = h2peers.Wire()
    for _ in range(10):
        sid = relay.request("/pkg.Echo/Unary", grpc=True)
        relay.run()
        relay.pod_answers_grpc(sid)
        relay.run()
    assert [x.status for x in source.proxy.take_completed()] == [200] * 10
    assert [x.grpc_status for x in relay.proxy.take_completed()] == ["0"] * 10
    assert checked == {
        ("source", Block.REQUEST): 1,
        ("source", Block.RESPONSE): 1,
        ("relay", Block.REQUEST): 1,
        ("relay", Block.RESPONSE): 1,
        ("relay", Block.TRAILERS): 1,
    }


WELL_FORMED = {
    Block.REQUEST: GRPC_CALL,
    Block.RESPONSE: [(b":status", b"200"), (b"content-type", b"application/grpc")],
    Block.TRAILERS: [(b"grpc-status", b"0")],
}

# A head's tail: a source proxy's per-call fields, never indexed (``h2proxy.NEVER_INDEXED``),
# mostly well formed (so that a kept start is often followed by a good tail), and fields
# whose rules reach across the block or that are malformed.
TAIL_NAMES = [b"x-request-id"] * 6 + [b"grpc-timeout"] * 3 + [b"x-b3-traceid", b"user-agent"]
ACROSS_OR_BAD = [b"host", b"cookie", b"te", b":path", b"connection", b"X-Bad"]
tail_fields = st.tuples(
    st.sampled_from(TAIL_NAMES + ACROSS_OR_BAD),
    st.sampled_from([b"1"] * 6 + [b"10S"] * 3 + [b"trailers", b"gzip", b" x", b"a\nb", b""]),
    st.sampled_from([True, True, False]),  # mostly never indexed
)


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(
    starts=st.lists(st.tuples(request_starts, blocks), min_size=1, max_size=4),
    tails=st.lists(st.lists(tail_fields, max_size=3), min_size=1, max_size=6),
    picks=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 5)), max_size=40),
    kind=st.sampled_from(list(Block)),
)
def test_checked_blocks_judge_heads_with_per_call_tails_as_check_block_does(
    starts: list[tuple[list[Header], list[Header]]],
    tails: list[list[tuple[bytes, bytes, bool]]],
    picks: list[tuple[int, int]],
    kind: Block,
) -> None:
    """Blocks that begin alike and end with fields new on each (never indexed as a source
    proxy forwards them, or not; well formed or not; ``host``, cookies, pseudo-headers among
    them), in any order: each judged as ``check_block`` judges it (a kept start is not
    checked again, the rest is)."""
    kept = h2headers.CheckedBlocks(kind)
    starts = [(WELL_FORMED[kind], []), *starts]  # one start that passes for its kind
    for start, tail in picks:
        first, rest = starts[start % len(starts)]
        block: list[Header] = [*first, *rest]
        block += [
            NeverIndexedHeaderTuple(n, v) if s else (n, v) for n, v, s in tails[tail % len(tails)]
        ]
        assert _outcome(kept.check, block) == _outcome(lambda b: check_block(b, kind), block)


def test_a_sources_heads_are_checked_at_the_relay_once_not_per_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ten gRPC calls as a source proxy forwards them to the destination's relay: the
    client's fields, then a never-indexed ``x-request-id`` and ``grpc-timeout`` new on each.
    The relay checks the head whole once (ten times before), and each call reaches the pod
    with its own request id and is answered."""
    checked: Counter[Block] = Counter()
    real = h2headers._check

    def counted(headers: list[Header], kind: Block, *, joined: bool) -> object:
        checked[kind] += 1
        return real(headers, kind, joined=joined)

    monkeypatch.setattr(h2headers, "_check", counted)
    monkeypatch.setattr(h2peers, "H2Proxy", H2Relay)
    relay = h2peers.Wire()
    for i in range(10):
        per_call = [
            NeverIndexedHeaderTuple(b"grpc-timeout", b"%dm" % (900 + i)),
            NeverIndexedHeaderTuple(b"x-request-id", b"id-%d" % i),
        ]
        sid = relay.request("/pkg.Echo/Unary", grpc=True, extra=per_call)
        relay.run()
        relay.pod_answers_grpc(sid)
        relay.run()
    assert [x.grpc_status for x in relay.proxy.take_completed()] == ["0"] * 10
    ids = [
        dict(e.headers)[b"x-request-id"] for e in relay.pod_events if isinstance(e, RequestReceived)
    ]
    assert ids == [b"id-%d" % i for i in range(10)]
    assert checked[Block.REQUEST] == 1
