"""The retry budget: retries may add only a bounded share to the load an upstream sees.

Why: retrying a failed connect on another endpoint hides one bad replica, but when *every*
replica fails, each client retrying N times multiplies the load on a service that is already
down (a retry storm). A budget caps retries to ``ratio x requests`` over a sliding ``window``,
plus a floor of ``min_per_second x window`` so that a quiet service still gets its retries
(Finagle's RetryBudget). A retry refused by the budget is counted as budget exhaustion; the
connection then fails as the first attempt did.

The window is kept as ten buckets, so memory is constant and old traffic ages out smoothly.
"""

from __future__ import annotations

from collections import deque

BUCKETS = 10


class RetryBudget:
    def __init__(self, *, percent: int, min_per_second: int, window: float) -> None:
        self.ratio = percent / 100.0
        self.floor = min_per_second * window
        self.window = window
        self._width = window / BUCKETS
        self._buckets: deque[list[float]] = deque()  # [start, requests, retries]
        self.exhausted = 0

    def _current(self, now: float) -> list[float]:
        while self._buckets and self._buckets[0][0] <= now - self.window:
            self._buckets.popleft()
        if not self._buckets or now >= self._buckets[-1][0] + self._width:
            self._buckets.append([now - (now % self._width), 0.0, 0.0])
        return self._buckets[-1]

    def request(self, now: float) -> None:
        """Count one new connection (its first attempt)."""
        self._current(now)[1] += 1

    def totals(self, now: float) -> tuple[int, int]:
        """(requests, retries) in the window ending at ``now``."""
        self._current(now)
        return int(sum(b[1] for b in self._buckets)), int(sum(b[2] for b in self._buckets))

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget allows it; otherwise count the exhaustion."""
        requests, retries = self.totals(now)
        if retries + 1 > self.floor + self.ratio * requests:
            self.exhausted += 1
            return False
        self._current(now)[2] += 1
        return True
