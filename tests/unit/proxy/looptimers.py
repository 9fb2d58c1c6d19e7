"""The timers a test's code arms on its loop: ``loop.call_later`` wrapped for the test's
``asyncio.run`` (the timers still run), so a test can count them or find whose they are."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


def record_timers(loop: asyncio.AbstractEventLoop) -> list[Callable[..., object]]:
    """From now on every ``loop.call_later`` appends its callback to the returned list."""
    armed: list[Callable[..., object]] = []
    real = loop.call_later

    def recorded(delay: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle:
        armed.append(callback)
        return real(delay, callback, *args)

    loop.call_later = recorded  # type: ignore[method-assign]
    return armed
