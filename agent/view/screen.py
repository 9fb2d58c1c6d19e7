"""Output of ``nodemesh top``: a redrawn screen on a terminal, plain lines elsewhere.

On a TTY the view takes the alternate screen (as ``top`` and ``less`` do, so the shell's
scrollback is intact afterwards and tmux keeps the pane clean), hides the cursor, and redraws in
place each frame: home, each line cut to the terminal's width and cleared to its end, then the
rest of the screen cleared. No curses: nothing here needs input, and plain VT100 sequences
behave the same in tmux, screen and a bare terminal. When stdout is not a TTY (a pipe, a log),
each frame is printed as plain lines after a ``---`` separator, nothing else.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import TextIO

ENTER = "\x1b[?1049h\x1b[?25l"  # alternate screen, cursor hidden
LEAVE = "\x1b[?25h\x1b[?1049l"
HOME = "\x1b[H"
CLEAR_LINE = "\x1b[K"
CLEAR_BELOW = "\x1b[J"


def frame_text(lines: Sequence[str], *, width: int, height: int) -> str:
    """A full-screen frame: at most ``height`` lines, each at most ``width`` columns."""
    shown = [line[:width] + CLEAR_LINE for line in lines[:height]]
    return HOME + "\r\n".join(shown) + "\r\n" + CLEAR_BELOW


class Screen:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()

    def __enter__(self) -> Screen:
        if self.tty:
            self.out.write(ENTER)
            self.out.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tty:
            self.out.write(LEAVE)
            self.out.flush()

    def show(self, lines: Sequence[str]) -> None:
        if self.tty:
            size = shutil.get_terminal_size()
            self.out.write(frame_text(lines, width=size.columns, height=size.lines - 1))
        else:
            self.out.write("---\n" + "\n".join(lines) + "\n")
        self.out.flush()
