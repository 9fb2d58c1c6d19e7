"""Request figures from a ``Window``: rate, success rate and latency quantiles (pure).

The HTTP counterpart of ``agent.view.aggregate`` (which does the TCP figures), computed the same
way so that a dashboard edge and a ``stat`` row never disagree:

* counts are exact increases (``aggregate.increase``), one reporter per source → destination
  pair (the destination's when it reported, as for TCP);
* **success** is Linkerd's: a request succeeded unless it was answered with a 5xx or, for a
  gRPC call, a ``grpc-status`` other than ``0`` (a call failed with ``UNAVAILABLE`` is usually
  answered ``200``: counting the HTTP status alone would call it a success) (``failed``).
  A request refused by an L7 policy (403 or ``PERMISSION_DENIED``, ``response_flags="RBAC"``)
  is a success for the server (it answered as configured) and is counted apart as **denied**;
  one refused by a local rate limit (``response_flags="RL"``: 429, or ``RESOURCE_EXHAUSTED``
  for a gRPC call) is a success too, so the two protocols agree (a 429 is no 5xx);
* **latency quantiles** are Prometheus's ``histogram_quantile`` over the window's increase of
  each ``istio_request_duration_milliseconds`` bucket: linear inside the bucket holding the
  rank, the largest finite bound when the rank falls into ``+Inf``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.view.aggregate import Counter, Key, increase, named, pair, stat_key
from agent.view.series import Series, Window

REQUESTS = "istio_requests_total"
DURATION_BUCKETS = "istio_request_duration_milliseconds_bucket"
REQUEST_FAMILIES = (REQUESTS, DURATION_BUCKETS)
RBAC = "RBAC"
RATE_LIMITED = "RL"


def failed(response_code: str, grpc_status: str, response_flags: str) -> bool:
    """Whether a request counts against the success rate: answered 5xx, or a gRPC call ended
    with a non-zero status, unless the mesh refused it as configured: an L7 policy (``denied``)
    or a local rate limit (a gRPC ``RESOURCE_EXHAUSTED`` as an HTTP 429 is: not an error)."""
    if response_flags in (RBAC, RATE_LIMITED):
        return False
    return response_code.startswith("5") or grpc_status not in ("", "0")


@dataclass
class RequestFigures:
    """HTTP figures of one row (an edge or a workload) over the window."""

    requests: float = 0.0
    errors: float = 0.0  # answered 5xx or a non-zero gRPC status (``failed``)
    denied: float = 0.0  # refused by an L7 policy
    seconds: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound → increase

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def success_rate(self) -> float | None:
        """Share of the window's requests that did not fail (``failed``); None without any."""
        return (self.requests - self.errors) / self.requests if self.requests else None

    def quantile(self, q: float) -> float | None:
        """The ``q`` latency quantile in milliseconds; None without observations."""
        return histogram_quantile(q, self.buckets)


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's estimate of the ``q`` quantile from cumulative bucket counts by bound."""
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower if len(bounds) > 1 else None
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def chosen_request_reporters(window: Window) -> dict[tuple[str, str], str]:
    """For each (source, destination) pair, the reporter whose request series count it."""
    reporters: dict[tuple[str, str], set[str]] = defaultdict(set)
    for name in REQUEST_FAMILIES:
        for s in window.series(name):
            reporters[pair(s)].add(s.label("reporter"))
    return {p: "destination" if "destination" in r else "source" for p, r in reporters.items()}


def requests_by(
    window: Window, key: Callable[[Series], Key], counter: Counter = increase
) -> dict[Key, RequestFigures]:
    """The request figures of ``window`` summed by ``key(series)`` (rows with requests only);
    ``counter`` as in ``aggregate.aggregate``."""
    chosen = chosen_request_reporters(window)
    rows: dict[Key, RequestFigures] = defaultdict(lambda: RequestFigures(seconds=window.seconds))

    def counted(name: str) -> Iterable[tuple[Series, RequestFigures, float]]:
        for s in window.series(name):
            if chosen.get(pair(s)) == s.label("reporter"):
                yield s, rows[key(s)], counter(s, window.start, window.end)

    for s, row, n in counted(REQUESTS):
        row.requests += n
        flags = s.label("response_flags")
        if failed(s.label("response_code"), s.label("grpc_response_status"), flags):
            row.errors += n
        if flags == RBAC:
            row.denied += n
    for s, row, n in counted(DURATION_BUCKETS):
        bound = float(s.label("le"))
        row.buckets[bound] = row.buckets.get(bound, 0.0) + n
    return {k: v for k, v in rows.items() if v.requests}


def stat_requests(
    window: Window, *, resource: str, name: str | None = None
) -> dict[Key, RequestFigures]:
    """The request figures of ``nodemesh stat``'s rows, keyed as ``aggregate.stat`` keys them."""
    return named(requests_by(window, stat_key(resource)), resource, name)
