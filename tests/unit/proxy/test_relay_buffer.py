"""The relay's read sizes: small while a connection is chatty, large for bulk."""

from __future__ import annotations

from agent.proxy.relay import MAX_CHUNK, MIN_CHUNK, _ReadSize


def test_starts_small_so_chatty_connections_cost_little() -> None:
    assert _ReadSize().size == MIN_CHUNK <= 8 * 1024


def test_partial_reads_never_grow_it() -> None:
    size = _ReadSize()
    for _ in range(100):
        size.grow_if_full(1024)
    assert size.size == MIN_CHUNK


def test_full_reads_double_it_up_to_the_maximum() -> None:
    size = _ReadSize()
    sizes = []
    for _ in range(10):
        size.grow_if_full(size.size)
        sizes.append(size.size)
    assert sizes[:5] == [MIN_CHUNK * 2**k for k in range(1, 6)]
    assert sizes[-1] == MAX_CHUNK
