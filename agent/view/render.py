"""Tables of the central view: columns chosen by what the figures hold (pure, text out).

A column is a header and a cell function. The TCP columns are always there; request columns
(rate, success, latency) join ``COLUMNS`` once the agents export request metrics and
``agent.view.aggregate.Figures`` carries them, so none of the table code changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.view.aggregate import Figures, Key, mtls_word

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
    keys: Sequence[str], columns: Sequence[Column], rows: Iterable[tuple[Key, Figures]]
) -> list[str]:
    """Header and one line per row: the key's parts, then the columns."""
    body = [[*k, *(c.cell(k, f) for c in columns)] for k, f in rows]
    if not body:
        return ["(no traffic in the window)"]
    return table([[*keys, *(c.header for c in columns)], *body])


def stat_lines(resource: str, rows: dict[Key, Figures]) -> list[str]:
    header = "SERVICE" if resource == "service" else "WORKLOAD"
    return render([header], TCP_COLUMNS, sorted(rows.items()))


EDGE_COLUMNS = (
    Column("CONN", lambda _, f: count(f.opened)),
    Column("ACTIVE", lambda _, f: count(f.active)),
    Column("MTLS", lambda _, f: mtls_word(f)),
    Column("DENIED", lambda _, f: count(f.denied)),
)


def edges_lines(rows: dict[Key, Figures]) -> list[str]:
    keys = ["SRC", "SRC PRINCIPAL", "DST", "DST PRINCIPAL"]
    return render(keys, EDGE_COLUMNS, sorted(rows.items()))


def path_lines(rows: Sequence[tuple[Key, Figures]]) -> list[str]:
    arrows = [((f"{k[0]} -> {k[1]}", k[2]), f) for k, f in rows]
    return render(["PATH", "SERVICE"], TCP_COLUMNS, arrows)


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
