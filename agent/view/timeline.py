"""A workload's golden metrics over time, from one ``Window`` cut into steps (pure).

Why cut a window rather than ask Prometheus for a range query per chart: the window already
holds every scrape of the period (``promql.window_samples``), and each step's figures are then
the same exact increases as ``stat`` and the graph compute (``aggregate``, ``golden``), with the
same one-reporter-per-path rule. No second PromQL dialect (``rate()``'s extrapolation would
make a chart disagree with the table next to it), one query per metric family per page.

One difference: a step's increase is **interpolated** between the samples around its ends
(``interpolated``), not counted from the samples inside it. A step of 10 s holds five or six
scrapes taken every 2 s, depending on where the scrapes fall; counting whole scrapes would draw
that rhythm as a sawtooth, not the traffic. Interpolation spreads each scrape's increase over
the time it covers, never extrapolates past the last sample, and the steps still add up to the
window's exact increase (each step ends where the next starts). Counter resets are taken out
first (``monotonic``: the reset-adjusted running total), so interpolating never crosses one.
A point is None where the figure is undefined (no requests: no success rate, no latency), and a
chart leaves a gap there.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass

from agent.view.aggregate import Figures, Key, aggregate, pair, workload
from agent.view.golden import RequestFigures, requests_by
from agent.view.series import Series, Window

Point = tuple[float, float | None]  # (unix time of the step's end, value)


@dataclass(frozen=True)
class Line:
    label: str
    points: tuple[Point, ...]


@dataclass(frozen=True)
class Chart:
    """One chart: a title, a unit for its axis and one or more lines."""

    title: str
    unit: str
    lines: tuple[Line, ...]

    def has_data(self) -> bool:
        return any(v for line in self.lines for _, v in line.points)


def steps(window: Window, count: int) -> list[Window]:
    """``window`` cut into ``count`` consecutive windows of equal length (same samples)."""
    if count < 1:
        raise ValueError(f"a timeline needs at least one step, got {count}")
    size = window.seconds / count
    return [
        Window(window.start + i * size, window.start + (i + 1) * size, window.families)
        for i in range(count)
    ]


def monotonic(series: Series) -> Series:
    """The series as its reset-adjusted running total (a drop means a restart from zero)."""
    total, previous, out = 0.0, 0.0, []
    for t, value in series.samples:
        total += value - previous if value >= previous else value
        previous = value
        out.append((t, total))
    return Series(series.labels, tuple(out))


def value_at(series: Series, at: float) -> float:
    """A monotonic series' value at ``at``: linear between samples, 0 before the first (a
    series appears when its counter first moves), the last value after the last sample."""
    samples = series.samples
    index = bisect.bisect_right(samples, (at, math.inf))
    if index == 0:
        return 0.0
    t0, v0 = samples[index - 1]
    if index == len(samples):
        return v0
    t1, v1 = samples[index]
    return v0 + (v1 - v0) * (at - t0) / (t1 - t0)


def interpolated(series: Series, start: float, end: float) -> float:
    """A monotonic series' increase over ``(start, end]``, interpolated (``value_at``)."""
    return value_at(series, end) - value_at(series, start)


def involving(window: Window, name: str) -> Window:
    """Only the series of paths that ``name`` is an end of, made ``monotonic``: whole pairs
    stay, so the choice of reporter per pair is unchanged, and a step costs the workload's
    paths, not the mesh's."""
    families = {
        family: tuple(monotonic(s) for s in window.series(family) if name in pair(s))
        for family in window.families
    }
    return Window(window.start, window.end, families)


def _side(name: str, side: str) -> Callable[[Series], Key]:
    def key(s: Series) -> Key:
        return ("match",) if workload(s, side) == name else ("other",)

    return key


@dataclass(frozen=True)
class StepFigures:
    at: float
    tcp: Figures | None
    http: RequestFigures | None


def _figures(parts: list[Window], name: str, side: str) -> list[StepFigures]:
    key = _side(name, side)
    out = []
    for part in parts:
        tcp = aggregate(part, key, interpolated).get(("match",))
        http = requests_by(part, key, interpolated).get(("match",))
        out.append(StepFigures(part.end, tcp, http))
    return out


def _line(
    label: str, figures: list[StepFigures], value: Callable[[StepFigures], float | None]
) -> Line:
    return Line(label, tuple((f.at, value(f)) for f in figures))


def _rps(f: StepFigures) -> float:
    return f.http.per_second if f.http else 0.0


def _success(f: StepFigures) -> float | None:
    rate = f.http.success_rate if f.http else None
    return None if rate is None else rate * 100


def _quantile(q: float) -> Callable[[StepFigures], float | None]:
    return lambda f: f.http.quantile(q) if f.http else None


def _conn(f: StepFigures) -> float:
    return f.tcp.opened_per_second if f.tcp else 0.0


def _sent(f: StepFigures) -> float:
    return f.tcp.sent_per_second if f.tcp else 0.0


def _received(f: StepFigures) -> float:
    return f.tcp.received_per_second if f.tcp else 0.0


def golden_charts(window: Window, name: str, count: int) -> tuple[Chart, ...]:
    """The charts of workload ``name`` (``namespace/name``): its inbound traffic (it is the
    destination) and outbound traffic (it is the source), ``count`` points per line."""
    parts = steps(involving(window, name), count)
    inbound = _figures(parts, name, "destination")
    outbound = _figures(parts, name, "source")
    both = (("inbound", inbound), ("outbound", outbound))
    return (
        Chart("Requests", "req/s", tuple(_line(s, f, _rps) for s, f in both)),
        Chart("Success rate", "%", tuple(_line(s, f, _success) for s, f in both)),
        Chart(
            "Latency",
            "ms",
            tuple(
                _line(f"{s} p{round(q * 100)}", f, _quantile(q))
                for s, f in both
                for q in (0.5, 0.99)
            ),
        ),
        Chart("TCP connections opened", "conn/s", tuple(_line(s, f, _conn) for s, f in both)),
        Chart(
            "TCP bytes",
            "B/s",
            (
                _line("inbound received", inbound, _sent),
                _line("inbound sent", inbound, _received),
                _line("outbound sent", outbound, _sent),
                _line("outbound received", outbound, _received),
            ),
        ),
    )
