"""The relay's read buffers: small while a connection is idle or chatty, large for bulk."""

from __future__ import annotations

from agent.proxy.relay import MAX_CHUNK, MIN_CHUNK, _ReadBuffer


def test_starts_small_so_idle_connections_cost_little() -> None:
    assert len(_ReadBuffer().buf) == MIN_CHUNK <= 8 * 1024


def test_partial_reads_never_grow_it() -> None:
    buf = _ReadBuffer()
    for _ in range(100):
        buf.grow_if_full(1024)
    assert len(buf.buf) == MIN_CHUNK


def test_full_reads_double_it_up_to_the_maximum() -> None:
    buf = _ReadBuffer()
    sizes = []
    for _ in range(10):
        buf.grow_if_full(len(buf.buf))
        sizes.append(len(buf.buf))
    assert sizes[:5] == [MIN_CHUNK * 2**k for k in range(1, 6)]
    assert sizes[-1] == MAX_CHUNK


def test_a_chunk_in_flight_survives_growth() -> None:
    buf = _ReadBuffer()
    buf.buf[:MIN_CHUNK] = b"x" * MIN_CHUNK
    chunk = buf.chunk(MIN_CHUNK)
    buf.grow_if_full(MIN_CHUNK)
    buf.buf[:4] = b"yyyy"
    assert bytes(chunk) == b"x" * MIN_CHUNK
