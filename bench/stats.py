"""Summaries of benchmark samples: percentiles, medians across repetitions, ratios, slopes.

Pure functions over numbers, so the report's arithmetic is unit-tested without a lab. Percentiles
use the nearest-rank definition (the value below which ``p`` % of the samples lie, always an
observed sample): with 20,000 round trips p99.9 is the 20th-largest, not an interpolation between
two samples that were never seen.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(samples: Sequence[float], p: float) -> float:
    """Nearest-rank percentile ``p`` (0 < p <= 100) of ``samples``."""
    if not samples:
        raise ValueError("percentile of no samples: the workload produced no measurements")
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p} is outside (0, 100]")
    ordered = sorted(samples)
    rank = math.ceil(round(p * len(ordered) / 100, 9))  # 99.9 * 1000 / 100 is not 999.0
    return ordered[max(rank, 1) - 1]


def percentiles(samples: Sequence[float], points: Sequence[float]) -> dict[str, float]:
    """``{"p50": ..., "p99.9": ...}`` for each of ``points``."""
    ordered = sorted(samples)
    return {f"p{p:g}": percentile(ordered, p) for p in points}


def median(values: Sequence[float]) -> float | None:
    """Median across repetitions, or None when no repetition produced a value."""
    return statistics.median(values) if values else None


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or None when either is missing or the reference is zero."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def added(value: float | None, reference: float | None) -> str | None:
    """``value - reference`` signed and rounded (``+12``, ``-3``): what a path adds over its
    reference; None when either is missing."""
    if value is None or reference is None:
        return None
    return f"{'+' if value >= reference else ''}{value - reference:,.0f}"


def slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x (bytes of RSS per idle connection), None if undefined.

    A fit over every step rather than (last - first) / N keeps one late allocator jump (Python's
    arenas, glibc's heap trim) from deciding the result alone.
    """
    if len(points) < 2:
        return None
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
