"""``nodemesh top``'s HTTP table: the busiest routes (source → destination, method, path), pure.

Why from the agents' recent requests (``/requests``, the tap) and not from Prometheus: the
request metrics carry no path (a path label would make their cardinality unbounded), and a
live view is about the last seconds, which is exactly what the agents' rings hold. Like
``linkerd viz top``, a row is a route with its count, success rate (``golden.failed``: not
answered 5xx nor ended with a non-zero gRPC status, as the metric views count it) and the
best, worst and last latency in the window.

A request that crossed nodes is reported by both agents once both ends parse HTTP (the source
node as ``outbound``, the destination node as ``inbound``), with the same ``x-request-id``:
``RouteWindow`` keeps one entry per request id, the destination's when it has it, as the
metrics pick the destination reporter.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.view.golden import failed
from agent.view.render import rate, success, table

RouteKey = tuple[str, str, str, str]  # source, destination, method, path
PATH_WIDTH = 40


@dataclass
class RouteFigures:
    count: int = 0
    errors: int = 0  # answered 5xx or a non-zero gRPC status (``golden.failed``)
    best: float = float("inf")
    worst: float = 0.0
    last: float = 0.0
    last_at: float = 0.0

    @property
    def success_rate(self) -> float | None:
        return (self.count - self.errors) / self.count if self.count else None


def _who(entry: Mapping[str, Any], side: str) -> str:
    workload = entry.get(f"{side}_workload")
    if workload and workload != "unknown":
        return f"{entry.get(f'{side}_namespace')}/{workload}"
    return str(entry.get(f"{side}_address") or "unknown").rsplit(":", 1)[0]


def entry_time(entry: Mapping[str, Any]) -> float:
    """The Unix time a tapped request ended (its ISO ``time``); 0 when unreadable."""
    try:
        return dt.datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00")).timestamp()
    except (KeyError, ValueError):
        return 0.0


class RouteWindow:
    """Tapped requests of the last ``seconds``, one per request, for the route table."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: dict[str, tuple[float, Mapping[str, Any]]] = {}
        self._anonymous = 0  # requests without an id (never deduplicated)

    def add(self, entries: Iterable[Mapping[str, Any]]) -> None:
        for entry in entries:
            at = entry_time(entry)
            key = str(entry.get("request_id") or "")
            if not key:
                self._anonymous += 1
                key = f"#anonymous-{self._anonymous}"
            held = self._entries.get(key)
            if held is None or (
                held[1].get("direction") == "outbound" and entry.get("direction") != "outbound"
            ):
                self._entries[key] = (at, entry)

    def expire(self, now: float) -> None:
        horizon = now - self.seconds
        self._entries = {k: v for k, v in self._entries.items() if v[0] > horizon}

    def routes(self, limit: int) -> list[tuple[RouteKey, RouteFigures]]:
        """The ``limit`` routes with the most requests (then the most recent)."""
        rows: dict[RouteKey, RouteFigures] = {}
        for at, entry in sorted(self._entries.values(), key=lambda v: v[0]):
            key = (
                _who(entry, "source"),
                _who(entry, "destination"),
                str(entry.get("method", "-")),
                str(entry.get("path", "-")),
            )
            row = rows.setdefault(key, RouteFigures())
            ms = float(entry.get("duration_ms", 0.0))
            row.count += 1
            row.errors += failed(
                str(entry.get("response_code", "")),
                str(entry.get("grpc_status") or ""),
                str(entry.get("response_flags", "")),
            )
            row.best, row.worst = min(row.best, ms), max(row.worst, ms)
            row.last, row.last_at = ms, at
        ranked = sorted(rows.items(), key=lambda kv: (-kv[1].count, -kv[1].last_at, kv[0]))
        return ranked[:limit]


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def route_lines(rows: Sequence[tuple[RouteKey, RouteFigures]], seconds: float) -> list[str]:
    if not rows:
        return ["(no HTTP requests in the window)"]
    header = ["SOURCE", "DESTINATION", "METHOD", "PATH", "COUNT", "REQ/S", "SUCCESS", "BEST",
              "WORST", "LAST"]  # fmt: skip
    body = [
        [
            src,
            dst,
            method,
            _cut(path, PATH_WIDTH),
            str(f.count),
            rate(f.count / seconds),
            success(f.success_rate),
            f"{f.best:.1f}ms",
            f"{f.worst:.1f}ms",
            f"{f.last:.1f}ms",
        ]
        for (src, dst, method, path), f in rows
    ]
    return table([header, *body])
