"""PromQL the central view sends: range selectors of the metric families it aggregates.

Why raw samples (``metric{...}[window + lookback]``) rather than ``increase()``: Prometheus
extrapolates ``increase``/``rate`` to the window's edges, so ten connections can read as 9.7 or
10.4. The view fetches each series' samples and computes increases itself
(``agent.view.aggregate``), which counts exactly and treats a series born inside the window as
starting from zero (the mesh's counters appear at their first increment). The extra
``LOOKBACK`` finds each series' last sample before the window starts: its baseline.
"""

from __future__ import annotations

from collections.abc import Mapping

# Prometheus's own staleness horizon: a series with no sample for this long has ended.
LOOKBACK_SECONDS = 300


def escape(value: str) -> str:
    """A label value inside double quotes (PromQL string escaping)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def selector(metric: str, matchers: Mapping[str, str] | None = None) -> str:
    """``metric{a="x",b="y"}`` with exact-match matchers in a stable order."""
    if not matchers:
        return metric
    inner = ",".join(f'{k}="{escape(v)}"' for k, v in sorted(matchers.items()))
    return f"{metric}{{{inner}}}"


def duration(seconds: float) -> str:
    """A PromQL duration of whole milliseconds (``90s`` → ``90000ms``: exact for any window)."""
    millis = round(seconds * 1000)
    if millis <= 0:
        raise ValueError(f"a PromQL range must be positive, got {seconds}s")
    return f"{millis}ms"


def window_samples(
    metric: str, window_seconds: float, matchers: Mapping[str, str] | None = None
) -> str:
    """Every sample of ``metric`` in the window plus the lookback before it."""
    return f"{selector(metric, matchers)}[{duration(window_seconds + LOOKBACK_SECONDS)}]"
