"""From a ``Window`` of samples to the rows of ``stat``, ``edges`` and ``top`` (pure).

Three decisions shape the figures:

* **Exact increases.** A counter's increase over the window is its last sample minus its
  baseline (the last sample at or before the window's start; zero for a series born inside the
  window), with counter resets (an agent restart) handled as Prometheus does: a drop means the
  counter restarted from zero. Counts are integers, never extrapolated.
* **One reporter per path.** A connection between two meshed pods is reported twice (by the
  client's node, ``reporter=source``, and the server's, ``reporter=destination``). For each
  source → destination pair the destination's report is used when it exists (it saw the
  connection arrive, with the policy verdict), otherwise the source's (an unmeshed destination).
* **Active connections** are opened minus closed, from the counters' latest values (not the
  window): the agents' gauge has no workload labels.

The figures are the TCP ones the agents export today (``TCP_FAMILIES``). Request metrics
(``istio_requests_total`` and its duration histogram) would be more families here, more fields
on ``Figures`` and more columns in ``agent.view.render``, computed from the same ``Window``.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from agent.view.series import Series, Window

OPENED = "istio_tcp_connections_opened_total"
CLOSED = "istio_tcp_connections_closed_total"
SENT = "istio_tcp_sent_bytes_total"
RECEIVED = "istio_tcp_received_bytes_total"
TCP_FAMILIES = (OPENED, CLOSED, SENT, RECEIVED)

MTLS = "mutual_tls"
DENY = "DENY"
UNKNOWN = "unknown"


def _after(series: Series, at: float) -> int:
    """Index of the first sample later than ``at`` (samples are in time order): a binary
    search, because the dashboard's charts ask for many short steps of one long window."""
    return bisect.bisect_right(series.samples, (at, math.inf))


def increase(series: Series, start: float, end: float) -> float:
    """The counter's exact increase over ``(start, end]`` (see the module docstring)."""
    first, stop = _after(series, start), _after(series, end)
    previous = series.samples[first - 1][1] if first else 0.0
    total = 0.0
    for _, value in series.samples[first:stop]:
        total += value - previous if value >= previous else value
        previous = value
    return total


def latest(series: Series, end: float) -> float:
    """The counter's value at ``end`` (its last sample at or before it; 0 if none)."""
    index = _after(series, end)
    return series.samples[index - 1][1] if index else 0.0


def workload(series: Series, side: str) -> str:
    """``namespace/name`` of the source or destination workload of a series."""
    return f"{series.label(side + '_workload_namespace')}/{series.label(side + '_workload')}"


def pair(series: Series) -> tuple[str, str]:
    return workload(series, "source"), workload(series, "destination")


def chosen_reporters(window: Window) -> dict[tuple[str, str], str]:
    """For each (source, destination) pair, the reporter whose series count it."""
    reporters: dict[tuple[str, str], set[str]] = defaultdict(set)
    for name in TCP_FAMILIES:
        for s in window.series(name):
            reporters[pair(s)].add(s.label("reporter"))
    return {p: "destination" if "destination" in r else "source" for p, r in reporters.items()}


@dataclass
class Figures:
    """TCP figures of one row (a workload, a Service, an edge or a path) over the window."""

    opened: float = 0.0
    mtls_opened: float = 0.0
    closed: float = 0.0
    denied: float = 0.0
    sent: float = 0.0
    received: float = 0.0
    active: float = 0.0
    seconds: float = 0.0
    security: set[str] = field(default_factory=set)

    @property
    def opened_per_second(self) -> float:
        return self.opened / self.seconds if self.seconds else 0.0

    @property
    def sent_per_second(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0

    @property
    def received_per_second(self) -> float:
        return self.received / self.seconds if self.seconds else 0.0

    @property
    def mtls_share(self) -> float | None:
        """Share of the window's connections that used mTLS; None when none opened."""
        return self.mtls_opened / self.opened if self.opened else None

    def busy(self) -> bool:
        return bool(self.opened or self.closed or self.active)


Key = tuple[str, ...]


Counter = Callable[[Series, float, float], float]  # a series' increase over (start, end]


def aggregate(
    window: Window, key: Callable[[Series], Key], counter: Counter = increase
) -> dict[Key, Figures]:
    """The figures of ``window`` summed by ``key(series)`` (one reporter per pair); ``counter``
    measures each series' increase (exact by default; the dashboard's charts interpolate)."""
    chosen = chosen_reporters(window)
    rows: dict[Key, Figures] = defaultdict(lambda: Figures(seconds=window.seconds))

    def counted(name: str) -> Iterable[tuple[Series, Figures, float]]:
        for s in window.series(name):
            if chosen.get(pair(s)) == s.label("reporter"):
                yield s, rows[key(s)], counter(s, window.start, window.end)

    for s, row, n in counted(OPENED):
        row.opened += n
        row.active += latest(s, window.end)
        if s.label("connection_security_policy") == MTLS:
            row.mtls_opened += n
        if n:
            row.security.add(s.label("connection_security_policy"))
    for s, row, n in counted(CLOSED):
        row.closed += n
        row.active -= latest(s, window.end)
        if s.label("response_flags") == DENY:
            row.denied += n
    for _, row, n in counted(SENT):
        row.sent += n
    for _, row, n in counted(RECEIVED):
        row.received += n
    return {k: v for k, v in rows.items() if v.busy()}


def by_workload(s: Series) -> Key:
    return (workload(s, "destination"),)


def by_service(s: Series) -> Key:
    return (s.label("destination_service") or UNKNOWN,)


def by_edge(s: Series) -> Key:
    """Source and destination workloads with the identities they proved (or ``unknown``)."""
    src, dst = pair(s)
    return (src, s.label("source_principal"), dst, s.label("destination_principal"))


def by_path(s: Series) -> Key:
    return (*pair(s), s.label("destination_service") or UNKNOWN)


def stat_key(resource: str) -> Callable[[Series], Key]:
    """How ``nodemesh stat`` groups: per Service hostname or per destination workload."""
    return by_service if resource == "service" else by_workload


_Row = TypeVar("_Row")


def named(rows: dict[Key, _Row], resource: str, name: str | None) -> dict[Key, _Row]:
    """The rows of ``stat``'s ``name`` (``namespace/name`` or a bare name; a Service's short
    name or hostname); all of them without one."""
    if name is None:
        return rows
    return {k: v for k, v in rows.items() if _matches(k[0], name, resource)}


def stat(window: Window, *, resource: str, name: str | None = None) -> dict[Key, Figures]:
    """``nodemesh stat`` rows: per destination workload (``resource="workload"``, ``name`` as
    ``namespace/name`` or a bare name) or per Service hostname (``resource="service"``)."""
    return named(aggregate(window, stat_key(resource)), resource, name)


def in_namespace(rows: dict[Key, _Row], resource: str, namespace: str) -> dict[Key, _Row]:
    """The rows of ``stat -n NAMESPACE``: workloads ``namespace/name``, Services
    ``name.namespace.svc...``."""
    if resource == "service":
        return {k: v for k, v in rows.items() if k[0].split(".")[1:2] == [namespace]}
    return {k: v for k, v in rows.items() if k[0].split("/", 1)[0] == namespace}


def _matches(value: str, name: str, resource: str) -> bool:
    if resource == "service":
        return value == name or value.split(".")[0] == name
    return value == name or value.split("/", 1)[-1] == name


def top(window: Window, limit: int) -> list[tuple[Key, Figures]]:
    """The busiest paths: most connections opened, then most bytes, then active ones."""
    rows = aggregate(window, by_path)
    ranked = sorted(
        rows.items(),
        key=lambda kv: (-kv[1].opened, -(kv[1].sent + kv[1].received), -kv[1].active, kv[0]),
    )
    return ranked[:limit]


def mtls_word(figures: Figures) -> str:
    """``yes`` (every connection in the window used mTLS), ``no``, ``partly``, or ``-`` (none
    opened in the window: only long-lived ones are active)."""
    if not figures.security:
        return "-"
    if figures.security == {MTLS}:
        return "yes"
    return "partly" if MTLS in figures.security else "no"
