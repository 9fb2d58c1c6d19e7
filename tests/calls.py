"""Counting the calls of one function while a test runs code through the real loop."""

from __future__ import annotations

import sys
from types import CodeType, FrameType
from typing import Any


class CallCount:
    """Within ``with``, counts the calls of the function whose code is ``code``
    (``sys.setprofile``: every Python call, wherever the loop runs it); ``count`` is what it
    counted so far, and ``reset`` starts again."""

    def __init__(self, code: CodeType) -> None:
        self.code = code
        self.count = 0

    def _profile(self, frame: FrameType, event: str, _arg: Any) -> None:
        if event == "call" and frame.f_code is self.code:
            self.count += 1

    def reset(self) -> None:
        self.count = 0

    def __enter__(self) -> CallCount:
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *_exc: object) -> None:
        sys.setprofile(None)
