"""The HTTP workload's load target frames requests right, however the bytes are split."""

from __future__ import annotations

import pytest

from bench.programs.http_server import Framer, FramingError

GET = b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: h2load\r\n\r\n"
POST = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"


def test_pipelined_requests_in_one_chunk_are_each_counted() -> None:
    assert Framer().feed(GET + POST + GET) == 3


@pytest.mark.parametrize("size", [1, 2, 7, 50])
def test_requests_split_anywhere_are_counted_once_complete(size: int) -> None:
    stream = GET + POST + GET
    framer = Framer()
    counts = [framer.feed(stream[i : i + size]) for i in range(0, len(stream), size)]
    assert sum(counts) == 3
    assert framer.buffer == b"" and framer.body_left == 0


def test_a_body_is_not_mistaken_for_a_request() -> None:
    framer = Framer()
    body = b"GET / HTTP/1.1\r\n\r\n"  # a body that looks like a request head
    head = b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
    assert framer.feed(head + body) == 1
    assert framer.feed(GET) == 1


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: five\r\n\r\n",
        b"GET /" + b"a" * 70000,
    ],
)
def test_what_it_does_not_take_is_refused(head: bytes) -> None:
    with pytest.raises(FramingError):
        Framer().feed(head)
