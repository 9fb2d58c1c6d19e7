"""Reading h2load's results: its summary text and its per-request log (``--log-file``).

Sans-IO (text in, numbers out), so the HTTP workload's arithmetic is unit-tested without a lab.
h2load prints throughput and request counts but only min/max/mean/sd of request times; the
percentiles come from ``--log-file``, one line per request of the measured duration: start time
(µs since the epoch), status code, and µs from the request's start to the end of its response.
h2load exits 0 even when every connection was refused, so a run with no successful request is
reported as an error by the caller, not trusted.
"""

from __future__ import annotations

import re
from typing import Any

_FINISHED = re.compile(r"^finished in [\d.]+m?s, ([\d.]+) req/s", re.M)
_REQUESTS = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout",
    re.M,
)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.M)


class H2loadOutputError(ValueError):
    """h2load's output lacks a line the bench reads (another version, or it failed early)."""


def summary(text: str) -> dict[str, Any]:
    """Requests per second, request counts and status classes from h2load's stdout."""
    finished, requests, status = (p.search(text) for p in (_FINISHED, _REQUESTS, _STATUS))
    if finished is None or requests is None or status is None:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise H2loadOutputError(f"h2load printed no summary (its last lines: {tail or 'none'})")
    _total, started, done, succeeded, failed, errored, timeout = map(int, requests.groups())
    return {
        "rps": float(finished.group(1)),
        "requests": done,
        "started": started,
        "succeeded": succeeded,
        "failed": failed,
        "errored": errored,
        "timeout": timeout,
        "status": dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, status.groups()), strict=True)),
    }


def latencies_us(log: str) -> list[float]:
    """Each logged request's time to the end of its response, in µs."""
    out = []
    for number, line in enumerate(log.splitlines(), 1):
        fields = line.split("\t")
        if len(fields) != 3 or not fields[2].isdigit():
            raise H2loadOutputError(f"h2load log line {number} is not start/status/µs: {line!r}")
        out.append(float(fields[2]))
    return out
