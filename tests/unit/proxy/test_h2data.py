"""The DATA fast path's framing: exact bytes out, and the splitter's tokens for every way in."""

from __future__ import annotations

import pytest
from h2.errors import ErrorCodes

from agent.proxy.h2data import (
    DATA_CHUNK,
    DATA_END,
    DATA_START,
    ERROR,
    FRAME_HEADER,
    H2,
    InboundSplitter,
    Token,
    data_frame_header,
    window_update_frame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = bytes.fromhex("000006 04 00 00000000 0004 00010000")  # INITIAL_WINDOW_SIZE 65536
PING = bytes.fromhex("000008 06 00 00000000") + b"12345678"


def frame(ftype: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return FRAME_HEADER.pack(len(payload) << 8 | ftype, flags, stream_id) + payload


def merged(tokens: list[Token]) -> list[tuple[object, ...]]:
    """Tokens with adjacent H2 runs and adjacent chunks of one frame joined: what the bytes
    mean, independent of how the input was split into reads."""
    out: list[tuple[object, ...]] = []
    for kind, sid, a, b, payload in tokens:
        if out and kind in (H2, DATA_CHUNK) and out[-1][0] == kind and out[-1][1] == sid:
            out[-1] = (kind, sid, a, b, out[-1][4] + payload)  # type: ignore[operator]
        else:
            out.append((kind, sid, a, b, payload))
    return out


def feed_in_pieces(splitter: InboundSplitter, data: bytes, size: int) -> list[Token]:
    tokens: list[Token] = []
    for i in range(0, len(data), size):
        tokens += splitter.feed(data[i : i + size])
    return tokens


def test_data_frame_header_bytes() -> None:
    assert data_frame_header(5, 3) == bytes.fromhex("000005 00 00 00000003")
    assert data_frame_header(0x10000, 7, end_stream=True) == bytes.fromhex("010000 00 01 00000007")


def test_window_update_bytes_and_limits() -> None:
    assert window_update_frame(0, 1 << 20) == bytes.fromhex("000004 08 00 00000000 00100000")
    assert window_update_frame(5, 0x7FFFFFFF) == bytes.fromhex("000004 08 00 00000005 7fffffff")
    for bad in (0, 0x80000000):
        with pytest.raises(ValueError, match="outside"):
            window_update_frame(1, bad)


STREAM = (
    SETTINGS
    + frame(0, 0, 1, b"hello")
    + frame(0, 0, 3, b"other stream")
    + PING
    + frame(0, 0x1, 1, b"bye")
)
EXPECTED = [
    (H2, 0, 0, 0, SETTINGS),
    (DATA_START, 1, 5, 5, b""),
    (DATA_CHUNK, 1, 0, 0, b"hello"),
    (DATA_END, 1, 0, 0, b""),
    (DATA_START, 3, 12, 12, b""),
    (DATA_CHUNK, 3, 0, 0, b"other stream"),
    (DATA_END, 3, 0, 0, b""),
    (H2, 0, 0, 0, PING),
    (DATA_START, 1, 3, 3, b""),
    (DATA_CHUNK, 1, 0, 0, b"bye"),
    (DATA_END, 1, 1, 0, b""),
]


@pytest.mark.parametrize("size", [len(STREAM), 1, 2, 7, 9, 10, 13])
def test_frames_split_anywhere_give_the_same_tokens(size: int) -> None:
    tokens = feed_in_pieces(InboundSplitter(max_frame_size=16384), STREAM, size)
    assert merged(tokens) == EXPECTED


def test_payload_is_handed_on_as_it_arrives() -> None:
    splitter = InboundSplitter(max_frame_size=16384)
    head = frame(0, 0, 1, b"abcdef")
    assert splitter.feed(head[:12]) == [(DATA_START, 1, 6, 6, b""), (DATA_CHUNK, 1, 0, 0, b"abc")]
    assert splitter.feed(head[12:]) == [(DATA_CHUNK, 1, 0, 0, b"def"), (DATA_END, 1, 0, 0, b"")]


def test_client_preface_passes_through_to_h2() -> None:
    splitter = InboundSplitter(max_frame_size=16384, preface=len(PREFACE))
    tokens = feed_in_pieces(splitter, PREFACE + SETTINGS + frame(0, 0, 1, b"x"), 5)
    assert merged(tokens) == [
        (H2, 0, 0, 0, PREFACE + SETTINGS),
        (DATA_START, 1, 1, 1, b""),
        (DATA_CHUNK, 1, 0, 0, b"x"),
        (DATA_END, 1, 0, 0, b""),
    ]


@pytest.mark.parametrize("size", [100, 1, 9, 10])
def test_padding_is_removed_and_counted(size: int) -> None:
    padded = frame(0, 0x8 | 0x1, 5, bytes([3]) + b"data" + b"\0\0\0")  # 8 bytes on the wire
    tokens = feed_in_pieces(InboundSplitter(max_frame_size=16384), padded + PING, size)
    assert merged(tokens) == [
        (DATA_START, 5, 8, 4, b""),
        (DATA_CHUNK, 5, 0, 0, b"data"),
        (DATA_END, 5, 1, 0, b""),
        (H2, 0, 0, 0, PING),
    ]


def test_only_padding_and_empty_frames_have_no_chunk() -> None:
    data = frame(0, 0x8, 1, bytes([2]) + b"\0\0") + frame(0, 0x1, 1, b"")
    assert InboundSplitter(max_frame_size=16384).feed(data) == [
        (DATA_START, 1, 3, 0, b""),
        (DATA_END, 1, 0, 0, b""),
        (DATA_START, 1, 0, 0, b""),
        (DATA_END, 1, 1, 0, b""),
    ]


@pytest.mark.parametrize(
    ("data", "code", "reason"),
    [
        (frame(0, 0, 0, b"x"), ErrorCodes.PROTOCOL_ERROR, "stream 0"),
        (frame(0, 0, 1, b"x" * 101), ErrorCodes.FRAME_SIZE_ERROR, "101 bytes exceeds"),
        (frame(0, 0x8, 1, b""), ErrorCodes.FRAME_SIZE_ERROR, "without pad length"),
        (frame(0, 0x8, 1, bytes([4]) + b"abc"), ErrorCodes.PROTOCOL_ERROR, "padding of 4"),
    ],
)
def test_bad_data_frames_are_connection_errors(data: bytes, code: int, reason: str) -> None:
    splitter = InboundSplitter(max_frame_size=100)
    tokens = splitter.feed(PING + data + PING)
    assert tokens[0] == (H2, 0, 0, 0, PING)
    assert tokens[-1] == (ERROR, 0, 0, 0, b"")
    assert splitter.error is not None
    assert splitter.error[0] == code and reason in splitter.error[2]


def test_stream_id_reserved_bit_is_ignored() -> None:
    data = FRAME_HEADER.pack(1 << 8, 0, 0x80000001) + b"z"
    assert InboundSplitter(max_frame_size=100).feed(data)[0] == (DATA_START, 1, 1, 1, b"")


def test_header_blocks_are_tracked_across_reads_and_bounded() -> None:
    splitter = InboundSplitter(max_frame_size=100, max_control_frame=40, max_header_block=60)
    headers = frame(1, 0, 1, b"h" * 30)  # no END_HEADERS: a block opens
    splitter.feed(headers[:20])
    assert splitter.h2_buffered() == 30 + 11  # the block so far, 11 bytes of it inside h2
    splitter.feed(headers[20:])
    assert splitter.header_block == 30 and splitter.h2_buffered() == 30
    tokens = splitter.feed(frame(9, 0x4, 1, b"c" * 20))  # END_HEADERS: closed
    assert tokens[-1][0] == H2 and splitter.header_block == 0 and splitter.h2_buffered() == 0
    splitter.feed(frame(1, 0, 3, b"h" * 30))
    assert splitter.feed(frame(9, 0, 3, b"c" * 31))[-1] == (ERROR, 0, 0, 0, b"")
    assert splitter.error is not None
    assert splitter.error[:2] == (ErrorCodes.ENHANCE_YOUR_CALM, "header_block")


def test_a_long_non_data_frame_is_refused_before_h2_buffers_it() -> None:
    splitter = InboundSplitter(max_frame_size=100, max_control_frame=40)
    tokens = splitter.feed(PING + frame(0xF, 0, 0, b"x" * 41))
    assert tokens == [(H2, 0, 0, 0, PING), (ERROR, 0, 0, 0, b"")]
    assert splitter.error is not None
    assert splitter.error[:2] == (ErrorCodes.ENHANCE_YOUR_CALM, "oversized_frame")
