"""``nodemesh ... | head``: a reader that leaves early ends the command quietly (``agent.cli``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from agent.cli import SIGPIPE_STATUS, stdout_reader_gone


@contextmanager
def pipe(reader_open: bool) -> Iterator[int]:
    """A pipe's write end; its read end closed unless ``reader_open``."""
    r, w = os.pipe()
    if not reader_open:
        os.close(r)
    try:
        yield w
    finally:
        os.close(w)
        if reader_open:
            os.close(r)


def test_output_into_a_closed_pipe_ends_quietly_with_the_sigpipe_status() -> None:
    with pipe(reader_open=False) as w:
        done = subprocess.run(
            [sys.executable, "-m", "agent", "--help"],
            stdout=w, stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    assert (done.returncode, done.stderr) == (SIGPIPE_STATUS, "")


@pytest.mark.parametrize("reader_open", [True, False])
def test_only_a_stdout_whose_reader_left_counts_as_gone(
    reader_open: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So that a ``BrokenPipeError`` of a socket (an admin API that closed) stays an error."""
    with pipe(reader_open) as w, os.fdopen(w, "w", closefd=False) as stdout:
        monkeypatch.setattr(sys, "stdout", stdout)
        assert stdout_reader_gone() is not reader_open
