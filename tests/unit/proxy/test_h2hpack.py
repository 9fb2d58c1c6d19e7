"""The proxy's HPACK coders against hpack's own (``agent.proxy.h2wire``, reaches 6 and 8).

``LeanDecoder`` must decode every block exactly as hpack's ``Decoder`` does (the same fields,
never-indexed ones marked, the others may be plain tuples; the same dynamic table after, the
same refusals), whoever encoded it; ``TablelessEncoder``'s blocks must decode, with hpack's
decoder, to what was encoded and leave its table empty. hypothesis drives both with blocks
hpack's encoder makes (Huffman or not, table size changes between blocks) and with arbitrary
bytes."""

from __future__ import annotations

import sys
import tracemalloc
from types import FrameType

import pytest
from h2.exceptions import ProtocolError
from hpack import (
    Decoder,
    Encoder,
    HeaderTuple,
    HPACKError,
    InvalidTableSizeError,
    NeverIndexedHeaderTuple,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.proxy import h2wire
from agent.proxy.h2wire import LeanDecoder, TablelessEncoder, encode_field

NAMES = [b":method", b":path", b":status", b"content-type", b"user-agent", b"x-request-id",
         b"grpc-timeout", b"te", b"cookie", b"x-custom"]  # fmt: skip
VALUES = [b"", b"GET", b"POST", b"/", b"200", b"404", b"application/grpc", b"trailers", b"gzip"]
names = st.one_of(st.sampled_from(NAMES), st.binary(max_size=40))
values = st.one_of(st.sampled_from(VALUES), st.binary(max_size=300))
fields = st.tuples(names, values, st.booleans())
blocks = st.lists(fields, max_size=12)


def _outcome(decoder: Decoder, block: bytes) -> object:
    """What ``decoder`` makes of ``block``: the fields with their kind, and its table after;
    or that it refused the block (``h2`` turns these exceptions into a connection error)."""
    try:
        got = decoder.decode(block, raw=True)
    except (HPACKError, IndexError, TypeError, UnicodeDecodeError, ProtocolError):
        return "refused"
    table = decoder.header_table
    return (
        [(isinstance(f, NeverIndexedHeaderTuple), bytes(f[0]), bytes(f[1])) for f in got],
        list(table.dynamic_entries),
        table.maxsize,
    )


def _pair(max_list: int = 64 * 1024) -> tuple[Decoder, LeanDecoder]:
    theirs, ours = Decoder(max_header_list_size=max_list), LeanDecoder(max_list)
    return theirs, ours


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(blocks, st.booleans(), st.one_of(st.none(), st.integers(0, 8192))),
        min_size=1,
        max_size=6,
    ),
    st.integers(100, 4000),
)
def test_lean_decoder_decodes_hpacks_blocks_as_hpack_does(
    sequence: list[tuple[list[tuple[bytes, bytes, bool]], bool, int | None]], max_list: int
) -> None:
    encoder = Encoder()
    theirs, ours = _pair(max_list)
    for fields_, huffman, table_size in sequence:
        if table_size is not None:
            encoder.header_table_size = table_size
            theirs.max_allowed_table_size = ours.max_allowed_table_size = max(table_size, 4096)
        block = encoder.encode([(n, v, sensitive) for n, v, sensitive in fields_], huffman)
        assert _outcome(ours, block) == _outcome(theirs, block)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4), st.integers(0, 4096))
def test_lean_decoder_refuses_and_accepts_arbitrary_bytes_as_hpack_does(
    chunks: list[bytes], max_table: int
) -> None:
    theirs, ours = _pair(2000)
    theirs.max_allowed_table_size = ours.max_allowed_table_size = max_table
    for block in chunks:
        assert _outcome(ours, block) == _outcome(theirs, block)


@settings(max_examples=300, deadline=None)
@given(st.lists(blocks, min_size=1, max_size=4))
def test_tableless_blocks_decode_to_what_was_encoded_and_leave_no_table(
    sequence: list[list[tuple[bytes, bytes, bool]]],
) -> None:
    encoder = TablelessEncoder()
    decoder = Decoder(max_header_list_size=1 << 20)
    for fields_ in sequence:
        sent = [NeverIndexedHeaderTuple(n, v) if s else (n, v) for n, v, s in fields_]
        got = decoder.decode(encoder.encode(sent), raw=True)
        assert [(f[0], f[1]) for f in got] == [(n, v) for n, v, _ in fields_]
        assert [isinstance(f, NeverIndexedHeaderTuple) for f in got] == [s for *_, s in fields_]
        assert all(type(f) in (HeaderTuple, NeverIndexedHeaderTuple) for f in got)
        assert not decoder.header_table.dynamic_entries


def test_encode_field_uses_the_static_table_and_long_integers() -> None:
    assert encode_field(b":status", b"200") == b"\x88"  # indexed, static entry 8
    assert encode_field(b":status", b"200", never_indexed=True) == b"\x18\x03200"
    assert encode_field(b"user-agent", b"x") == b"\x0f\x2b\x01x"  # name index 58 = 15 + 43
    long = b"v" * 200  # length 200 = 127 + 73: a two-byte integer
    assert encode_field(b"x-a", long) == b"\x00\x03x-a\x7f\x49" + long


def test_long_values_stay_out_of_the_field_cache() -> None:
    """The encoder keeps the encoding of short fields only: a peer's long header values do not
    make it hold ``_FIELD_CACHE_SIZE`` times 16 KiB."""
    encoder = TablelessEncoder()
    short, long = (b"x-short", b"s" * 40), (b"x-long", b"l" * 1000)
    encoder.encode([short, long])
    assert short in h2wire._FIELD_CACHE and long not in h2wire._FIELD_CACHE


@pytest.mark.parametrize("continuations", [1, 2, 3, 4, 5, 6, 30000])
def test_integers_are_as_long_as_hpack_reads_them(continuations: int) -> None:
    """hpack refuses an integer of more than 5 octets (``VARINT_MAX_LENGTH``), zero
    continuation bytes included (RFC 7541 section 5.1 allows it); ``LeanDecoder`` reads and
    refuses exactly the same."""
    length = b"\x7f" + b"\x80" * (continuations - 1) + b"\x00"  # 127, padded
    block = b"\x00\x01a" + length + b"v" * 127
    assert _outcome(LeanDecoder(1 << 20), block) == _outcome(Decoder(1 << 20), block)


@settings(max_examples=300, deadline=None)
@given(st.lists(blocks, min_size=1, max_size=4), st.integers(1, 3))
def test_huffman_strings_decoded_from_the_cache_are_hpacks(
    sequence: list[list[tuple[bytes, bytes, bool]]], rounds: int
) -> None:
    """Blocks whose literals are all Huffman-coded and not indexed (an encoder without table),
    sent again and again: the second time on, ``LeanDecoder`` takes the strings it kept
    instead of decoding them, and still decodes what hpack's decoder does."""
    encoder = Encoder()
    encoder.header_table_size = 0
    theirs, ours = _pair()
    for _ in range(rounds + 1):
        for fields_ in sequence:
            block = encoder.encode([(n, v, sensitive) for n, v, sensitive in fields_], True)
            assert _outcome(ours, block) == _outcome(theirs, block)


def test_a_huffman_string_seen_before_is_not_decoded_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the cache is for: a client that Huffman-codes its ``:path`` and ``user-agent`` on
    every call costs one decoding of each per connection. Never-indexed strings (credentials)
    and long ones are decoded each time and never kept."""
    encoder = Encoder()
    encoder.header_table_size = 0
    head = [(b":path", b"/grpc.testing.BenchmarkService/UnaryCall"),
            (b"user-agent", b"grpc-python/1.60.0 grpc-c/37.0.0 (linux; chttp2)"),
            (b"x-long", b"l" * 200)]  # fmt: skip
    secret = NeverIndexedHeaderTuple(b"authorization", b"Bearer abcdefgh")
    block = encoder.encode([*head, secret], huffman=True)
    decoded: list[bytes] = []

    def counted(data: bytes) -> bytes:
        decoded.append(bytes(data))
        return real(data)

    real = h2wire.decode_huffman
    monkeypatch.setattr(h2wire, "decode_huffman", counted)
    decoder = LeanDecoder()
    first = decoder.decode(block, raw=True)
    calls = len(decoded)
    assert calls == 5  # ``x-long`` (no static name) and every value
    assert [bytes(v) for _, v in first] == [v for _, v in head] + [b"Bearer abcdefgh"]
    assert decoder.decode(block, raw=True) == first
    assert len(decoded) - calls == 2  # the long value and the secret
    assert secret[1] not in decoder.huffman_cache.values()
    assert b"l" * 200 not in decoder.huffman_cache.values()


def test_the_huffman_cache_is_bounded_per_connection() -> None:
    """Values new on every call fill the cache: it is emptied when full, never larger."""
    encoder = Encoder()
    encoder.header_table_size = 0
    decoder, other = LeanDecoder(), LeanDecoder()
    for i in range(3 * h2wire._HUFFMAN_CACHE_SIZE):
        decoder.decode(encoder.encode([(b"grpc-timeout", b"%dm" % i)], huffman=True), raw=True)
        assert len(decoder.huffman_cache) <= h2wire._HUFFMAN_CACHE_SIZE
    assert decoder.huffman_cache and not other.huffman_cache


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0x00, 0x10, 0x40]),  # without, never, with indexing; a new name
            st.binary(min_size=0, max_size=140),
            st.binary(min_size=0, max_size=140),
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(0, 12),
)
def test_plain_literals_sliced_in_place_are_hpacks(
    literals: list[tuple[int, bytes, bytes]], cut: int
) -> None:
    """The strings ``LeanDecoder`` slices in place (not Huffman-coded, shorter than 127 bytes)
    and those it reads through ``_string_at`` (127 and longer: a multi-byte length), also cut
    short anywhere in the last field, decode and refuse as hpack's decoder does."""

    def string(s: bytes) -> bytes:
        if len(s) < 0x7F:
            return bytes((len(s),)) + s
        return b"\x7f" + bytes((len(s) - 0x7F,)) + s  # fits one continuation byte (< 128)

    block = b"".join(bytes((kind,)) + string(n) + string(v) for kind, n, v in literals)
    for sent in (block, block[: max(0, len(block) - cut)]):
        theirs, ours = _pair()
        assert _outcome(ours, sent) == _outcome(theirs, sent)


# Few distinct fields, so that blocks repeat them: later blocks index what earlier ones added.
few_fields = st.tuples(
    st.sampled_from([b"a", b"grpc-status", b":status"]),
    st.sampled_from([b"0", b"200", b"x" * 40]),
    st.sampled_from([False, False, False, True]),
)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(few_fields, min_size=1, max_size=3), st.booleans()),
        min_size=1,
        max_size=5,
    ),
    st.lists(st.binary(max_size=24), max_size=2),
    st.lists(st.integers(0, 7), min_size=1, max_size=16),
    st.sampled_from([0, 100, 4096, 4096]),
)
@example(  # a block of indexes kept, then the table moved under them
    [([(b"a", b"0", False)], False)] * 2 + [([(b"grpc-status", b"200", False)], False)],
    [],
    [0, 1, 2, 1],
    4096,
)
def test_blocks_sent_again_decode_as_hpack_decodes_them(
    encoded: list[tuple[list[tuple[bytes, bytes, bool]], bool]],
    garbage: list[bytes],
    order: list[int],
    table_size: int,
) -> None:
    """Blocks replayed in any order (``block_cache`` serves the repeats), between blocks that
    add to the dynamic table, evict from it or update its size, whose indexes then name other
    fields or nothing: each decodes, and is refused, as hpack's decoder does it, and the table
    after is hpack's."""
    encoder = Encoder()
    encoder.header_table_size = table_size
    pool = [encoder.encode([(n, v, s) for n, v, s in f], huffman) for f, huffman in encoded]
    pool += garbage
    theirs, ours = _pair()
    for i in order:
        block = pool[i % len(pool)]
        assert _outcome(ours, block) == _outcome(theirs, block)


def test_a_block_sent_again_is_not_decoded_again_and_its_fields_are_a_new_list() -> None:
    decoder = LeanDecoder()
    head = b"\x88" + b"\x00\x0bgrpc-status\x010"  # :status 200, a literal not indexed
    first = list(decoder.decode(head, raw=True))
    assert head in decoder.block_cache
    first.append((b"x", b"y"))  # a caller's list is its own
    assert list(decoder.decode(head, raw=True)) == [(b":status", b"200"), (b"grpc-status", b"0")]
    decoder.decode(b"\x40\x01a\x01b", raw=True)  # adds to the table: the kept blocks go
    assert not decoder.block_cache
    decoder.decode(head, raw=True)
    decoder.decode(b"\x20", raw=True)  # a table size update (to 0: evicts): they go too
    assert not decoder.block_cache
    secret = b"\x10\x0dauthorization\x03abc"  # never indexed: decoded each time, never kept
    decoder.decode(secret, raw=True)
    assert secret not in decoder.block_cache


def test_the_block_cache_is_bounded_per_connection() -> None:
    """Blocks made to cost the most memory once decoded (as many short literals as are kept,
    up to the longest block kept), more of them than are kept: the cache holds at most
    ``_BLOCK_CACHE_SIZE`` blocks and, with their fields, stays under 32 KiB; a block with more
    fields than ``_BLOCK_CACHE_FIELDS`` or longer than ``_BLOCK_CACHE_BYTES`` is not kept."""
    n = h2wire._BLOCK_CACHE_FIELDS
    value_len = (h2wire._BLOCK_CACHE_BYTES - 8) // n - 4  # a literal with a 1-byte name

    def block(i: int, fields: int = n) -> bytes:
        value = b"%0*d" % (value_len, i)
        return b"".join(b"\x00\x01" + bytes((97 + j % 26,)) + bytes((len(value),)) + value
                        for j in range(fields))  # fmt: skip

    decoder = LeanDecoder()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(3 * h2wire._BLOCK_CACHE_SIZE):
            decoder.decode(block(i), raw=True)
            assert len(decoder.block_cache) <= h2wire._BLOCK_CACHE_SIZE
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(decoder.block_cache) == h2wire._BLOCK_CACHE_SIZE
    assert all(len(k) <= h2wire._BLOCK_CACHE_BYTES for k in decoder.block_cache)
    assert held < 32 * 1024, f"{held} bytes held by the block cache"
    decoder.block_cache.clear()
    decoder.decode(block(0, n + 1), raw=True)
    decoder.decode(b"\x00\x01a\x7f\xd9\x03" + b"x" * 600, raw=True)  # a 600-byte value
    assert not decoder.block_cache


def test_a_block_is_decoded_without_reading_the_table_size_through_its_properties() -> None:
    """``decode`` compares the table's size with the allowed one after every block, new or
    kept: it reads ``HeaderTable._maxsize`` (what the two properties, ``header_table_size``
    and ``HeaderTable.maxsize``, read: two Python calls a block, six per gRPC call at the
    source). A table left above a lowered limit is still refused, as hpack refuses it, for a
    new block and a kept one alike."""
    decoder = LeanDecoder()
    block = encode_field(b"grpc-status", b"0") + encode_field(b"content-type", b"application/grpc")
    calls: list[str] = []

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        if event == "call":
            calls.append(frame.f_code.co_name)

    for _ in range(2):  # decoded, then taken from the kept blocks
        sys.setprofile(profile)
        try:
            fields = decoder.decode(block, raw=True)
        finally:
            sys.setprofile(None)
        assert list(fields) == [(b"grpc-status", b"0"), (b"content-type", b"application/grpc")]
    assert "header_table_size" not in calls and "maxsize" not in calls
    other = block + encode_field(b"te", b"trailers")
    for ours in (decoder, LeanDecoder(), Decoder()):
        ours.max_allowed_table_size = 100  # our SETTINGS lowered it; no size update came
        for sent in (block, other):
            with pytest.raises(InvalidTableSizeError):
                ours.decode(sent, raw=True)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.lists(few_fields, min_size=1, max_size=3), min_size=1, max_size=3),
    st.lists(
        st.lists(
            st.tuples(
                st.sampled_from([b"x-request-id", b"grpc-timeout", b"a"]),
                st.binary(max_size=12),
                st.sampled_from([True, True, False]),  # mostly never indexed
            ),
            max_size=3,
        ),
        min_size=1,
        max_size=4,
    ),
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 3), st.sampled_from([True, True, False])),
        min_size=2,
        max_size=16,
    ),
    st.sampled_from([0, 100, 4096]),
    st.sampled_from([0, 0, 0, 1, 3]),
)
@example(  # a start kept, then the table moved under its index
    [[(b"grpc-status", b"200", False)], [(b"a", b"0", False)]],
    [[(b"x-request-id", b"1", True)], [(b"x-request-id", b"2", True)]],
    [(0, 0, False), (0, 1, False), (1, 0, False), (0, 1, False)],
    4096,
    0,
)
def test_blocks_whose_start_was_kept_decode_as_hpack_decodes_them(
    starts: list[list[tuple[bytes, bytes, bool]]],
    tails: list[list[tuple[bytes, bytes, bool]]],
    order: list[tuple[int, int, bool]],
    table_size: int,
    cut: int,
) -> None:
    """A source proxy's request heads: fields the client sent (indexed once the table holds
    them), then never-indexed per-call values. Starts and tails combined in any order, and
    cut short, between blocks that add to the table, evict or resize (an encoder's start
    alone, and its start with a tail, encoded by one encoder so its table stays the
    decoders'): each decodes, and is refused, as hpack's decoder does it
    (``LeanDecoder.prefix_ends``: the start is taken from the kept blocks)."""
    encoder = Encoder()
    encoder.header_table_size = table_size
    theirs, ours = _pair()
    for start, tail, whole in order:
        fields = [(n, v, s) for n, v, s in starts[start % len(starts)]]
        if whole:
            fields += tails[tail % len(tails)]
        block = encoder.encode(fields, huffman=False)
        for sent in (block, block[: max(0, len(block) - cut)]) if cut else (block,):
            assert _outcome(ours, sent) == _outcome(theirs, sent)
            if sent is not block:  # (a cut block leaves the decoders' tables behind)
                theirs, ours = _pair()
                encoder = Encoder()
                encoder.header_table_size = table_size


def test_a_heads_start_before_its_never_indexed_fields_is_decoded_once() -> None:
    """Ten request heads as a source proxy forwards them: the same fields (one naming an
    entry of the dynamic table), then a never-indexed ``x-request-id`` new on each: the
    start is decoded once, then taken from the kept blocks (no table look-up), each head
    decodes to its own fields, and the request ids are kept nowhere."""
    decoder = LeanDecoder()
    decoder.decode(b"\x40\x01a\x01b", raw=True)  # adds a: b, the table's index 62
    lookups: list[int] = []
    table = decoder.header_table
    real = table.get_by_index

    def get_by_index(index: int) -> tuple[bytes, bytes]:
        lookups.append(index)
        return real(index)

    table.get_by_index = get_by_index  # type: ignore[method-assign]
    start = b"\x83\xbe" + encode_field(b"content-type", b"application/grpc")
    for i in range(10):
        rid = b"id-%d" % i
        head = start + encode_field(b"x-request-id", rid, never_indexed=True)
        fields = list(decoder.decode(head, raw=True))
        assert fields == [
            (b":method", b"POST"),
            (b"a", b"b"),
            (b"content-type", b"application/grpc"),
            (b"x-request-id", rid),
        ]
        assert isinstance(fields[-1], NeverIndexedHeaderTuple)
    assert lookups == [62]
    assert decoder.prefix_ends == [len(start)]
    assert all(b"id-" not in block for block in decoder.block_cache)
