"""SVG of the dashboard: the service graph and line charts, drawn on the server (pure).

Why server-rendered SVG: the page then needs no JavaScript library, no build step and no
network access on the user's machine (the lab has none), and what the browser shows is text
the tests can read. Everything that comes from the mesh (workload names are whatever a user
named their pods) passes through ``esc`` before it reaches the markup, attributes included.

The graph's elements carry classes and ``data-*`` attributes (``edge``, ``denied``,
``data-source``, ``data-rate``...) so a page's reader, and the browser test, can tell what is
drawn without parsing coordinates.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from collections.abc import Callable, Sequence

from agent.view.graph import Edge, Graph
from agent.view.layout import Layout
from agent.view.timeline import Chart

NODE_WIDTH = 180.0
NODE_HEIGHT = 46.0
LABEL_CHARS = 24
DENIED_COLOUR = "#d62728"
EDGE_COLOUR = "#5b7083"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#17becf")
CHAR_WIDTH = 6.6  # of the 11px sans-serif labels, for the label's background box


def esc(value: object) -> str:
    """Text or attribute value, escaped for HTML and XML (quotes included)."""
    return html.escape(str(value), quote=True)


def number(value: float) -> str:
    """A short figure: ``0``, ``0.42``, ``3.5``, ``12``, ``1.2k``, ``3.4M``."""
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.1f}M"
    if magnitude >= 1e3:
        return f"{value / 1e3:.1f}k"
    if magnitude >= 10 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.2f}" if magnitude < 1 else f"{value:.1f}"


def percent(share: float | None) -> str:
    """A success rate to a tenth of a percent, rounded down: 99.96 % of requests is not 100 %."""
    if share is None:
        return "-"
    return "100%" if share >= 1 else f"{math.floor(share * 1000) / 10:.1f}%"


def millis(value: float | None) -> str:
    return "-" if value is None else f"{number(value)}ms"


def short(name: str) -> str:
    return name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "…"


def edge_text(edge: Edge) -> str:
    """The label drawn on an edge: rate, then success and p99 when it carries requests."""
    parts = [f"{number(edge.rate)} {edge.rate_unit}"]
    if edge.http is not None:
        parts.append(f"{percent(edge.http.success_rate)} ok")
        parts.append(f"p99 {millis(edge.http.quantile(0.99))}")
    if edge.denied:
        parts.append(f"denied {number(edge.denied)}")
    return " · ".join(parts)


def lock(x: float, y: float) -> str:
    """A small padlock whose body's top-left corner is at (x, y): the edge used mTLS."""
    return (
        f'<g class="mtls-lock" transform="translate({x:.1f},{y:.1f})">'
        "<title>mTLS</title>"
        '<path d="M2.5 5 V3 a3 3 0 0 1 6 0 V5" fill="none" stroke="#2a7a2a" stroke-width="1.5"/>'
        '<rect x="0.5" y="5" width="10" height="7.5" rx="1.5" fill="#2a7a2a"/></g>'
    )


def _edge_path(
    src: tuple[float, float], dst: tuple[float, float], loop: bool
) -> tuple[str, float, float]:
    """Path data for an edge and the point its label sits on."""
    (x1, y1), (x2, y2) = src, dst
    half = NODE_WIDTH / 2
    if loop:  # a workload calling itself: a loop over its top
        top = y1 - NODE_HEIGHT / 2
        d = (
            f"M{x1 - 20:.1f},{top:.1f} C{x1 - 40:.1f},{top - 50:.1f} "
            f"{x1 + 40:.1f},{top - 50:.1f} {x1 + 20:.1f},{top:.1f}"
        )
        return d, x1, top - 42
    if x2 > x1:  # left to right, the usual direction
        sx, ex = x1 + half, x2 - half
        mid = (sx + ex) / 2
        d = f"M{sx:.1f},{y1:.1f} C{mid:.1f},{y1:.1f} {mid:.1f},{y2:.1f} {ex:.1f},{y2:.1f}"
        return d, mid, (y1 + y2) / 2
    # same layer or backwards (a cycle): bow below both nodes
    sy, ey = y1 + NODE_HEIGHT / 2, y2 + NODE_HEIGHT / 2
    low = max(sy, ey) + 60
    d = f"M{x1:.1f},{sy:.1f} C{x1:.1f},{low:.1f} {x2:.1f},{low:.1f} {x2:.1f},{ey:.1f}"
    return d, (x1 + x2) / 2, low - 15


Ends = dict[tuple[str, str], tuple[float, float]]


def spread_ends(graph: Graph, where: Layout) -> Ends:
    """Vertical offsets of each edge's two ends: the edges leaving (or entering) a node are
    spread over its side in the order of their other ends' heights, so that arrowheads into one
    workload do not sit on top of each other and edges do not cross at the node."""
    sides: dict[tuple[str, int], list[tuple[float, str, str]]] = {}
    for e in graph.edges:
        sides.setdefault((e.source, 0), []).append(
            (where.positions[e.destination][1], e.source, e.destination)
        )
        sides.setdefault((e.destination, 1), []).append(
            (where.positions[e.source][1], e.source, e.destination)
        )
    offsets: dict[tuple[str, str, int], float] = {}
    for (_, end), items in sides.items():
        step = min(12.0, (NODE_HEIGHT - 12) / max(len(items) - 1, 1))
        for i, (_, src, dst) in enumerate(sorted(items)):
            offsets[(src, dst, end)] = (i - (len(items) - 1) / 2) * step
    return {
        (e.source, e.destination): (
            offsets[(e.source, e.destination, 0)],
            offsets[(e.source, e.destination, 1)],
        )
        for e in graph.edges
    }


def _edge(edge: Edge, where: Layout, ends: Ends) -> str:
    (x1, y1), (x2, y2) = where.positions[edge.source], where.positions[edge.destination]
    loop = edge.source == edge.destination
    dy1, dy2 = (0.0, 0.0) if loop else ends[(edge.source, edge.destination)]
    d, lx, ly = _edge_path((x1, y1 + dy1), (x2, y2 + dy2), loop)
    denied = edge.denied > 0
    colour = DENIED_COLOUR if denied else EDGE_COLOUR
    classes = "edge denied" if denied else "edge"
    text = edge_text(edge)
    box = len(text) * CHAR_WIDTH + (18 if edge.mtls == "yes" else 8)
    label_x = lx - box / 2
    icon = lock(label_x + 4, ly - 8) if edge.mtls == "yes" else ""
    text_x = label_x + (18 if icon else 4)
    return (
        f'<g class="{classes}" data-source="{esc(edge.source)}" '
        f'data-destination="{esc(edge.destination)}" data-protocol="{edge.protocol}" '
        f'data-rate="{edge.rate:.6g}" data-denied="{edge.denied:.0f}" data-mtls="{edge.mtls}">'
        f"<title>{esc(edge.source)} → {esc(edge.destination)}: {esc(text)}</title>"
        f'<path d="{d}" fill="none" stroke="{colour}" stroke-width="{3 if denied else 2}" '
        f'marker-end="url(#{"arrow-denied" if denied else "arrow"})"/>'
        f'<rect x="{label_x:.1f}" y="{ly - 10:.1f}" width="{box:.1f}" height="18" rx="3" '
        f'fill="#ffffff" fill-opacity="0.9" stroke="{colour}" stroke-width="0.5"/>{icon}'
        f'<text class="edge-label" x="{text_x:.1f}" y="{ly + 3:.1f}" '
        f'fill="{DENIED_COLOUR if denied else "#222"}">{esc(text)}</text></g>'
    )


def _node(name: str, where: Layout, href: Callable[[str], str]) -> str:
    x, y = where.positions[name]
    namespace, _, workload = name.partition("/")
    return (
        f'<a class="node" href="{esc(href(name))}" data-workload="{esc(name)}">'
        f"<title>{esc(name)}</title>"
        f'<rect x="{x - NODE_WIDTH / 2:.1f}" y="{y - NODE_HEIGHT / 2:.1f}" '
        f'width="{NODE_WIDTH:.0f}" height="{NODE_HEIGHT:.0f}" rx="8" fill="#eef4fb" '
        f'stroke="#1f4e79" stroke-width="1.5"/>'
        f'<text class="node-name" x="{x:.1f}" y="{y - 2:.1f}" text-anchor="middle">'
        f"{esc(short(workload))}</text>"
        f'<text class="node-namespace" x="{x:.1f}" y="{y + 14:.1f}" text-anchor="middle">'
        f"{esc(short(namespace))}</text></a>"
    )


ARROWS = "".join(
    f'<marker id="{name}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
    f'markerHeight="8" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
    f'fill="{colour}"/></marker>'
    for name, colour in (("arrow", EDGE_COLOUR), ("arrow-denied", DENIED_COLOUR))
)


def graph_svg(graph: Graph, where: Layout, href: Callable[[str], str]) -> str:
    """The service graph; ``href(node)`` is the link of a node (its workload page)."""
    if not graph.nodes:
        return '<p class="empty">No traffic in the window.</p>'
    height = where.height + (70 if any(e.source == e.destination for e in graph.edges) else 0)
    ends = spread_ends(graph, where)
    edges = "".join(_edge(e, where, ends) for e in graph.edges)
    nodes = "".join(_node(n, where, href) for n in graph.nodes)
    return (
        f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{where.width:.0f}" '
        'style="max-width:100%;height:auto" '
        f'height="{height:.0f}" viewBox="0 0 {where.width:.0f} {height:.0f}" role="img" '
        f'aria-label="service graph"><defs>{ARROWS}</defs>{edges}{nodes}</svg>'
    )


CHART_WIDTH = 440.0
CHART_HEIGHT = 170.0
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 52.0, 12.0, 10.0, 24.0


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``value`` (> 0)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * (1 - 1e-9):
            return step * power
    return 10 * power


def clock(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%H:%M:%S")


def _segments(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    """Runs of defined points (a None breaks the line)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for t, v in points:
        if v is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append((t, v))
    return [r for r in runs if r]


def chart_svg(chart: Chart) -> str:
    """A line chart with a time axis (UTC), a zero-based value axis and a legend."""
    times = [t for line in chart.lines for t, _ in line.points]
    values = [v for line in chart.lines for _, v in line.points if v is not None]
    top = nice_ceiling(max(values, default=0.0))
    if chart.unit == "%":
        top = 100.0
    t0, t1 = (min(times), max(times)) if times else (0.0, 1.0)
    span = (t1 - t0) or 1.0
    plot_w = CHART_WIDTH - PAD_LEFT - PAD_RIGHT
    plot_h = CHART_HEIGHT - PAD_TOP - PAD_BOTTOM

    def xy(t: float, v: float) -> str:
        x = PAD_LEFT + (t - t0) / span * plot_w
        y = PAD_TOP + plot_h - (v / top) * plot_h
        return f"{x:.1f},{y:.1f}"

    grid = []
    for i in range(3):
        v = top * i / 2
        y = PAD_TOP + plot_h - plot_h * i / 2
        grid.append(
            f'<line x1="{PAD_LEFT}" x2="{CHART_WIDTH - PAD_RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#ddd"/><text class="tick" x="{PAD_LEFT - 4}" y="{y + 4:.1f}" '
            f'text-anchor="end">{esc(number(v))}</text>'
        )
    for i, anchor in ((0, "start"), (1, "end")):
        grid.append(
            f'<text class="tick" x="{PAD_LEFT + i * plot_w:.1f}" y="{CHART_HEIGHT - 6}" '
            f'text-anchor="{anchor}">{clock(t0 + i * span)}{" UTC" if i else ""}</text>'
        )
    lines = []
    legend = []
    for index, line in enumerate(chart.lines):
        colour = PALETTE[index % len(PALETTE)]
        for run in _segments(line.points):
            points = " ".join(xy(t, v) for t, v in run)
            if len(run) == 1:
                cx, cy = points.split(",")
                lines.append(
                    f'<circle class="series" data-line="{esc(line.label)}" cx="{cx}" cy="{cy}" '
                    f'r="2.5" fill="{colour}"/>'
                )
            else:
                lines.append(
                    f'<polyline class="series" data-line="{esc(line.label)}" fill="none" '
                    f'stroke="{colour}" stroke-width="1.8" points="{points}"/>'
                )
        legend.append(
            f'<span class="key"><span class="swatch" style="background:{colour}"></span>'
            f"{esc(line.label)}</span>"
        )
    empty = "" if chart.has_data() else '<p class="empty">no traffic in the range</p>'
    return (
        f'<figure class="chart" data-chart="{esc(chart.title)}">'
        f"<figcaption>{esc(chart.title)} ({esc(chart.unit)})</figcaption>"
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{CHART_WIDTH:.0f}" '
        f'height="{CHART_HEIGHT:.0f}" viewBox="0 0 {CHART_WIDTH:.0f} {CHART_HEIGHT:.0f}" '
        f'role="img" aria-label="{esc(chart.title)}">{"".join(grid)}{"".join(lines)}</svg>'
        f'<div class="legend">{"".join(legend)}</div>{empty}</figure>'
    )
