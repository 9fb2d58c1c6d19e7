"""A priority gate for CSR requests: bounded concurrency, urgent requests first.

A connection waiting for a certificate that is not there yet must not queue behind background
prefetches of fifty other identities (after an agent restart on a busy node), and the CA must
never see more than a bounded number of requests from one agent at once. ``asyncio.Semaphore``
gives the bound but serves waiters in arrival order; this gate serves them by priority.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

HIGH, LOW = 0, 1


class PriorityGate:
    """At most ``slots`` holders; waiters served by priority (lower first), then in order."""

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    @asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiters:
            self._free -= 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiters, (priority, next(self._seq), fut))
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._release()  # handed a slot just as we were cancelled: pass it on
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1
