"""Tables of the central view: columns chosen by what the figures hold (pure, text out).

A column is a header and a cell function. The TCP columns are always there; ``stat`` adds the
request columns (rate, success, latency quantiles) when any row carried HTTP or gRPC requests
in the window, so a TCP-only mesh keeps its narrower table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.view.aggregate import UNKNOWN, Figures, Key, mtls_word
from agent.view.golden import RequestFigures

Cell = Callable[[Key, Figures], str]


@dataclass(frozen=True)
class Column:
    header: str
    cell: Cell


def count(value: float) -> str:
    return f"{value:.0f}"


def rate(value: float) -> str:
    return f"{value:.2f}"


def byte_rate(value: float) -> str:
    for unit in ("B/s", "KiB/s"):
        if value < 1024:
            return f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}MiB/s"


def share(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


TCP_COLUMNS = (
    Column("CONN", lambda _, f: count(f.opened)),
    Column("CONN/S", lambda _, f: rate(f.opened_per_second)),
    Column("ACTIVE", lambda _, f: count(f.active)),
    Column("SENT/S", lambda _, f: byte_rate(f.sent_per_second)),
    Column("RECV/S", lambda _, f: byte_rate(f.received_per_second)),
    Column("MTLS", lambda _, f: share(f.mtls_share)),
    Column("DENIED", lambda _, f: count(f.denied)),
)


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render(
    keys: Sequence[str],
    columns: Sequence[Column],
    rows: Iterable[tuple[Key, Figures]],
    shown: Callable[[Key], Key] = lambda k: k,
) -> list[str]:
    """Header and one line per row: the key's parts (as ``shown`` words them), then the
    columns."""
    body = [[*shown(k), *(c.cell(k, f) for c in columns)] for k, f in rows]
    if not body:
        return ["(no traffic in the window)"]
    return table([[*keys, *(c.header for c in columns)], *body])


def millis(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


def success(value: float | None) -> str:
    """A success rate to a tenth of a percent, rounded down: 99.96 % is not shown as 100 %."""
    return "-" if value is None else f"{int(value * 1000) / 10:.1f}%"


QUANTILES = ((0.5, "P50"), (0.95, "P95"), (0.99, "P99"))


def request_columns(requests: Mapping[Key, RequestFigures]) -> tuple[Column, ...]:
    """Requests per second, success rate and latency quantiles of each row (``-`` for a row
    without requests in the window)."""
    none = RequestFigures()

    def of(key: Key) -> RequestFigures:
        return requests.get(key, none)

    def quantile(q: float) -> Cell:
        return lambda k, _: millis(of(k).quantile(q))

    return (
        Column("REQ/S", lambda k, _: rate(of(k).per_second) if k in requests else "-"),
        Column("SUCCESS", lambda k, _: success(of(k).success_rate)),
        *(Column(header, quantile(q)) for q, header in QUANTILES),
    )


def denied_column(requests: Mapping[Key, RequestFigures]) -> Column:
    """What policy refused: connections (L4 policy, peer authentication) and requests (L7 policy:
    403 ``RBAC``, ``PERMISSION_DENIED``), as the dashboard's "denied N" counts them; ``--json``
    keeps the two apart (``deniedConnections``, ``deniedRequests``)."""

    def cell(key: Key, f: Figures) -> str:
        r = requests.get(key)
        return count(f.denied + (r.denied if r is not None else 0.0))

    return Column("DENIED", cell)


def stat_lines(
    resource: str, rows: dict[Key, Figures], requests: Mapping[Key, RequestFigures] | None = None
) -> list[str]:
    """One line per workload or Service: request columns first when any row had requests."""
    header = "SERVICE" if resource == "service" else "WORKLOAD"
    requests = requests or {}
    columns: tuple[Column, ...] = TCP_COLUMNS
    if requests:  # TCP_COLUMNS' DENIED (connections) gives way to one with requests too
        columns = (*request_columns(requests), *TCP_COLUMNS[:-1], denied_column(requests))
    keys = set(rows) | set(requests)
    ordered = sorted((k, rows.get(k, Figures())) for k in keys)
    if resource != "service":
        return render([header], columns, ordered)
    lines = render([header], columns, ordered, _service_shown)
    return [*lines, NO_SERVICE_NOTE] if (UNKNOWN,) in keys else lines


# The metrics' destination_service is "unknown" (Istio's and ztunnel's word for a label not known)
# when the address dialled is no Service's: the label keeps Istio's value, the table says what it
# means (agent.telemetry.labels).
NO_SERVICE_ROW = f"{UNKNOWN} (no Service)"
NO_SERVICE_NOTE = (
    f"{NO_SERVICE_ROW}: traffic to an address no Service holds (the IP of a pod that backs no "
    f'Service, or a destination outside the mesh); destination_service="{UNKNOWN}" in the metrics'
)


def _service_shown(key: Key) -> Key:
    return (NO_SERVICE_ROW,) if key == (UNKNOWN,) else key


EDGE_COLUMNS = (
    Column("CONN", lambda _, f: count(f.opened)),
    Column("ACTIVE", lambda _, f: count(f.active)),
    Column("MTLS", lambda _, f: mtls_word(f)),
)


def edges_lines(
    rows: dict[Key, Figures], requests: Mapping[Key, RequestFigures] | None = None
) -> list[str]:
    """One line per source and destination with their identities; ``requests`` (keyed as
    ``rows``) adds the requests an L7 policy refused on each to ``DENIED``."""
    keys = ["SRC", "SRC PRINCIPAL", "DST", "DST PRINCIPAL"]
    columns = (*EDGE_COLUMNS, denied_column(requests or {}))
    return render(keys, columns, sorted(rows.items()))


def path_lines(
    rows: Sequence[tuple[Key, Figures]], requests: Mapping[Key, RequestFigures] | None = None
) -> list[str]:
    """``top``'s busiest paths (source, destination, Service); ``requests`` (keyed as ``rows``)
    adds the requests an L7 policy refused on each to ``DENIED``. The ``unknown`` Service is
    worded and explained as in ``stat``'s table."""

    def arrow(k: Key) -> Key:
        return (f"{k[0]} -> {k[1]}", k[2])

    def shown(k: Key) -> Key:
        return (k[0], NO_SERVICE_ROW) if k[1] == UNKNOWN else k

    denied = denied_column({arrow(k): r for k, r in (requests or {}).items()})
    shown_rows = [(arrow(k), f) for k, f in rows]
    lines = render(["PATH", "SERVICE"], (*TCP_COLUMNS[:-1], denied), shown_rows, shown)
    return [*lines, NO_SERVICE_NOTE] if any(k[2] == UNKNOWN for k, _ in rows) else lines


def figures_json(key_names: Sequence[str], key: Key, f: Figures) -> dict[str, Any]:
    """One row for ``--json``: exact counts and rates per second over the window."""
    return {
        **dict(zip(key_names, key, strict=True)),
        "windowSeconds": f.seconds,
        "connectionsOpened": f.opened,
        "connectionsClosed": f.closed,
        "connectionsPerSecond": f.opened_per_second,
        "activeConnections": f.active,
        "bytesSent": f.sent,
        "bytesReceived": f.received,
        "mtlsConnections": f.mtls_opened,
        "mtlsShare": f.mtls_share,
        "mtls": mtls_word(f),
        "deniedConnections": f.denied,
    }


def requests_json(r: RequestFigures | None) -> dict[str, Any]:
    """The request fields of a ``stat --json`` row (exact counts; milliseconds)."""
    if r is None:
        return {"requests": 0.0}
    return {
        "requests": r.requests,
        "requestsPerSecond": r.per_second,
        "failedRequests": r.errors,
        "deniedRequests": r.denied,
        "successRate": r.success_rate,
        **{f"latencyP{int(q * 100)}Ms": r.quantile(q) for q, _ in QUANTILES},
    }
