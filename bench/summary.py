"""From every sample to the table: medians per (path, metric) and ratios between paths.

Sans-IO over the results document (``bench.runner`` writes it, ``bench.report`` renders this
summary), so the arithmetic the closing note quotes is unit-tested. A metric a path cannot have
(proxy CPU and memory on the direct path) or a workload that failed on every repetition is None,
rendered as a dash, never as zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench import stats

MESH = "mesh_cross"
PATH_ORDER = ("direct", "mesh_cross", "mesh_same", "stunnel")
# (numerator, denominator, column title)
RATIOS = (
    ("mesh_cross", "direct", "nodemesh cross / direct"),
    ("mesh_cross", "stunnel", "nodemesh cross / stunnel4"),
    ("mesh_same", "direct", "nodemesh same / direct"),
)


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    higher_is_better: bool
    digits: int


def metrics(streams: int) -> list[Metric]:
    return [
        Metric("bulk_1", "throughput, 1 stream", "Gbit/s", True, 2),
        Metric(f"bulk_{streams}", f"throughput, {streams} streams", "Gbit/s", True, 2),
        Metric("rr_p50", "1 KB request/response p50", "µs", False, 0),
        Metric("rr_p90", "1 KB request/response p90", "µs", False, 0),
        Metric("rr_p99", "1 KB request/response p99", "µs", False, 0),
        Metric("rr_p99.9", "1 KB request/response p99.9", "µs", False, 0),
        Metric("conn_rate", "new connections/s (with a 100 B exchange)", "conn/s", True, 0),
        Metric("conn_cpu", "proxy CPU per new connection", "µs", False, 0),
        Metric("conn_load_cpu", "client + echo server CPU per new connection", "µs", False, 0),
        Metric("cpu_per_gb", "proxy CPU per GB (bulk, all streams)", "CPU s/GB", False, 2),
        Metric("mem_per_conn", "proxy memory per idle connection", "KiB", False, 1),
    ]


def _values(
    samples: Sequence[Mapping[str, Any]], path: str, workload: str, field: str
) -> list[float]:
    return [
        float(s[field])
        for s in samples
        if s["path"] == path and s["workload"] == workload and s.get(field) is not None
    ]


def _median(
    samples: Sequence[Mapping[str, Any]], path: str, workload: str, field: str
) -> float | None:
    return stats.median(_values(samples, path, workload, field))


def _cpu_per_gb(samples: Sequence[Mapping[str, Any]], path: str, has_proxy: bool) -> float | None:
    bulk = [s for s in samples if s["path"] == path and str(s["workload"]).startswith("bulk_")]
    moved = sum(s.get("bytes", 0) for s in bulk if "error" not in s)
    if not has_proxy or moved == 0:
        return None
    return sum(s["proxy_cpu_s"] for s in bulk if "error" not in s) / (moved / 1e9)


def _cpu_per_connection(
    samples: Sequence[Mapping[str, Any]], path: str, has_proxy: bool
) -> float | None:
    """Proxy CPU over every connection of the path's connection runs (warm-ups included)."""
    conn = [
        s
        for s in samples
        if s["path"] == path and s["workload"] == "conn" and "error" not in s and "completed" in s
    ]
    completed = sum(s["completed"] for s in conn)
    if not has_proxy or completed == 0:
        return None
    return sum(s["proxy_cpu_s"] for s in conn) / completed * 1e6


def _load_cpu_per_connection(samples: Sequence[Mapping[str, Any]], path: str) -> float | None:
    """The load generator's CPU (the client's and the echo server's) over every connection of
    the path's connection runs: it shares the cores with the proxies, so it bounds the rate
    too. None when a run did not report both."""
    conn = [
        s
        for s in samples
        if s["path"] == path and s["workload"] == "conn" and "error" not in s and "completed" in s
    ]
    completed = sum(s["completed"] for s in conn)
    if completed == 0 or any("client_cpu_s" not in s or "server_cpu_s" not in s for s in conn):
        return None
    return sum(s["client_cpu_s"] + s["server_cpu_s"] for s in conn) / completed * 1e6


def path_values(results: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{path: {metric key: median value}}`` for every path in the results."""
    samples = results["samples"]
    streams = results["settings"]["streams"]
    table: dict[str, dict[str, float | None]] = {}
    for path in results["paths"]:
        key = path["key"]
        idle = results.get("idle", {}).get(key, {})
        per_conn = idle.get("bytes_per_connection")
        table[key] = {
            "bulk_1": _median(samples, key, "bulk_1", "gbps"),
            f"bulk_{streams}": _median(samples, key, f"bulk_{streams}", "gbps"),
            "rr_p50": _median(samples, key, "rr", "p50_us"),
            "rr_p90": _median(samples, key, "rr", "p90_us"),
            "rr_p99": _median(samples, key, "rr", "p99_us"),
            "rr_p99.9": _median(samples, key, "rr", "p99.9_us"),
            "conn_rate": _median(samples, key, "conn", "rate"),
            "conn_cpu": _cpu_per_connection(samples, key, bool(path["proxy_pids"])),
            "conn_load_cpu": _load_cpu_per_connection(samples, key),
            "cpu_per_gb": _cpu_per_gb(samples, key, bool(path["proxy_pids"])),
            "mem_per_conn": per_conn / 1024 if per_conn is not None else None,
        }
    return table


def http_values(results: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{HTTP path: {...}}``: medians of requests/s and request-time percentiles (loaded, and
    ``single_*`` with one request at a time on one connection), the proxies' CPU per request
    over every repetition (None without a proxy), and the totals of requests h2load completed
    and node2's agent counted."""
    samples = results["samples"]
    table: dict[str, dict[str, float | None]] = {}
    for path in results.get("http_paths", []):
        key = path["key"]
        done = [
            s for s in samples if s["path"] == key and s["workload"] == "http" and "error" not in s
        ]
        requests = sum(s["requests"] for s in done)
        cpu = sum(s["proxy_cpu_s"] for s in done)
        table[key] = {
            "rps": _median(samples, key, "http", "rps"),
            "p50": _median(samples, key, "http", "p50_us"),
            "p90": _median(samples, key, "http", "p90_us"),
            "p99": _median(samples, key, "http", "p99_us"),
            "single_p50": _median(samples, key, "http", "single_p50_us"),
            "single_p99": _median(samples, key, "http", "single_p99_us"),
            "cpu_us_per_request": cpu / requests * 1e6 if path["proxy_pids"] and requests else None,
            "requests": float(requests),
            "counted": float(sum(s["destination_counted"] for s in done)),
        }
    return table


def ratios(
    values: Mapping[str, Mapping[str, float | None]],
) -> dict[str, dict[str, float | None]]:
    """``{column title: {metric key: ratio}}`` for the pairs in ``RATIOS`` present in ``values``."""
    out: dict[str, dict[str, float | None]] = {}
    for num, den, title in RATIOS:
        if num in values and den in values:
            out[title] = {m: stats.ratio(values[num][m], values[den][m]) for m in values[num]}
    return out


def errors(results: Mapping[str, Any]) -> list[str]:
    """One line per failed sample: which path, workload and repetition, and why; and a failed
    upgrade section."""
    found = (
        [
            f"{s['path']} {s['workload']} rep {s['rep']}: {s['error']}"
            for s in results["samples"]
            if "error" in s
        ]
        + [
            f"{s['path']} {s['workload']} rep {s['rep']}, one connection: {s['single_error']}"
            for s in results["samples"]
            if "single_error" in s
        ]
        + [f"{k} idle: {v['error']}" for k, v in results.get("idle", {}).items() if "error" in v]
    )
    upgrade = results.get("upgrade", {})
    if "error" in upgrade:
        found.append(f"upgrade: {upgrade['error']}")
    return found
