"""The header-block guard (``h2guard.HeaderBlockGuard``): what it reads of a client's bytes,
cut anywhere, against the slice-by-slice scanner it replaced (kept here as the reference), and
what a read of whole frames costs it."""

from __future__ import annotations

import itertools
import struct
import sys
from types import FrameType

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy.h2guard import (
    CLIENT_PREFACE,
    FRAME_HEADER,
    HEADER_SIZE,
    HeaderBlockGuard,
)
from tests.fuzzing import fuzz_examples

LIMITS = {"max_header_block": 200, "max_continuations": 3}
KINDS = [0x0, 0x1, 0x9, 0x5, 0x4, 0x8, 0xFF]  # DATA HEADERS CONTINUATION PUSH_PROMISE ...


class Reference(HeaderBlockGuard):
    """The guard's scan before session 16: a memoryview sliced per frame header and payload,
    each frame header copied, ``_frame`` called for every frame."""

    def feed(self, data: bytes) -> str | None:
        view = memoryview(data)
        while view:
            if self._skip:
                n = min(self._skip, len(view))
                self._skip -= n
                view = view[n:]
                continue
            need = HEADER_SIZE - len(self._partial)
            self._partial += bytes(view[:need])
            view = view[need:]
            if len(self._partial) < HEADER_SIZE:
                return None
            word, flags, _stream = FRAME_HEADER.unpack(self._partial)
            self._partial = b""
            length, kind = word >> 8, word & 0xFF
            self._skip = length
            cause = self._frame(kind, flags, length)
            if cause is not None:
                return cause
        return None


def frame(kind: int, flags: int, length: int) -> bytes:
    return (
        struct.pack(">I", length)[1:] + bytes((kind, flags)) + struct.pack(">I", 1) + b"p" * length
    )


FRAMES = st.lists(
    st.tuples(st.sampled_from(KINDS), st.integers(0, 255), st.integers(0, 90)), max_size=30
)


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(FRAMES, st.lists(st.integers(0, 4000), max_size=12), st.booleans())
def test_the_guard_reads_what_the_reference_reads_however_the_bytes_are_cut(
    frames: list[tuple[int, int, int]], cuts: list[int], preface: bool
) -> None:
    """Frames of every kind (header blocks over the limits, CONTINUATION floods, frames inside
    a block), after the preface or not, cut into reads anywhere: the same cause at the same
    read, the same detail, and the same ``block_open`` after every read."""
    data = (CLIENT_PREFACE if preface else b"") + b"".join(frame(*f) for f in frames)
    guard = HeaderBlockGuard(**LIMITS, preface=preface)
    reference = Reference(**LIMITS, preface=preface)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        read = data[start:end]
        got, want = guard.feed(read), reference.feed(read)
        assert (got, guard.block_open) == (want, reference._block is not None)
        if want is not None:
            assert guard.detail == reference.detail
            return


def _calls_in_feed(guard: HeaderBlockGuard, data: bytes) -> int:
    """Python calls and built-ins made while ``guard`` reads ``data``."""
    calls = 0
    depth = 0

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        nonlocal calls, depth
        if event == "call" and frame.f_code is HeaderBlockGuard.feed.__code__:
            depth += 1
            return
        if event == "return" and frame.f_code is HeaderBlockGuard.feed.__code__:
            depth -= 1
            return
        if depth and event in ("call", "c_call"):
            calls += 1

    sys.setprofile(profile)
    try:
        guard.feed(data)
    finally:
        sys.setprofile(None)
    return calls


def test_a_calls_request_read_whole_costs_the_guard_a_call_per_frame_and_one_for_its_block() -> (
    None
):
    """A unary call's request as one read (a HEADERS frame holding the block, a DATA frame
    with END_STREAM): an ``unpack_from`` per frame, ``_frame`` for the HEADERS frame only,
    and ``len``: 4 calls (12 before: a memoryview, copies of the frame headers, ``min`` and
    ``len`` per payload, ``_frame`` for every frame)."""
    guard = HeaderBlockGuard(**LIMITS, preface=False)
    call = frame(0x1, 0x4, 60) + frame(0x0, 0x1, 17)
    assert _calls_in_feed(guard, call) == 4
    assert not guard.block_open
