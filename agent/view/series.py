"""Samples of counters as the central view reads them, from Prometheus or from the agents.

Why one shape for both sources: ``stat``, ``edges`` and ``top`` compute the same figures whether
the samples come from Prometheus's HTTP API (every scrape of the window) or from two scrapes of
the agents' own ``/metrics`` taken ``--window`` apart. A ``Window`` is the samples of each metric
family between two instants; everything after this module is pure arithmetic on it.

Parsing is pure too (JSON or exposition text in, ``Series`` out), so it is tested without sockets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]


class ViewError(RuntimeError):
    """The view cannot be computed; the message says why and what to do."""


def labels_of(mapping: Mapping[str, str]) -> Labels:
    return tuple(sorted(mapping.items()))


@dataclass(frozen=True)
class Series:
    """One label set of one metric: ``(unix time, value)`` samples, oldest first."""

    labels: Labels
    samples: tuple[tuple[float, float], ...]

    def label(self, name: str) -> str:
        return dict(self.labels).get(name, "")


@dataclass(frozen=True)
class Window:
    """The samples of each metric family (by name) that fall in ``(start - lookback, end]``;
    ``start`` and ``end`` bound the window the figures describe."""

    start: float
    end: float
    families: Mapping[str, tuple[Series, ...]] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.end - self.start

    def series(self, name: str) -> tuple[Series, ...]:
        return tuple(self.families.get(name, ()))


def from_prometheus_matrix(answer: Mapping[str, Any]) -> list[Series]:
    """The ``Series`` of a ``/api/v1/query`` answer for a range selector (resultType matrix).
    The scrape's ``instance`` label stays: two agents may report the same label set (pods of
    one workload on two nodes), and each is a counter of its own."""
    if answer.get("status") != "success":
        raise ViewError(
            f"Prometheus refused the query: {answer.get('errorType', '?')}: "
            f"{answer.get('error', 'no error message')}"
        )
    data = answer.get("data", {})
    if data.get("resultType") != "matrix":
        raise ViewError(f"expected a matrix from Prometheus, got {data.get('resultType')!r}")
    out = []
    for item in data.get("result", []):
        metric = {k: v for k, v in item["metric"].items() if k != "__name__"}
        samples = tuple((float(t), float(v)) for t, v in item["values"])
        out.append(Series(labels_of(metric), samples))
    return out


def from_exposition(
    text: str, names: Iterable[str], at: float, *, instance: str
) -> dict[str, list[Series]]:
    """The samples named ``names`` (full sample names, ``..._total``) in one scrape of an
    agent's ``/metrics``, as one-sample series taken at ``at``, labelled ``instance`` (the agent)
    as Prometheus would label them."""
    wanted = set(names)
    out: dict[str, list[Series]] = {name: [] for name in wanted}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                labels = labels_of({**sample.labels, "instance": instance})
                out[sample.name].append(Series(labels, ((at, sample.value),)))
    return out


def merge_scrapes(
    first: Mapping[str, list[Series]], second: Mapping[str, list[Series]]
) -> dict[str, tuple[Series, ...]]:
    """Two scrapes of the same agents into series of up to two samples each: a label set seen
    only in the second scrape is a counter born in between."""
    merged: dict[str, tuple[Series, ...]] = {}
    for name in set(first) | set(second):
        by_labels: dict[Labels, list[tuple[float, float]]] = {}
        for scrape in (first.get(name, []), second.get(name, [])):
            for s in scrape:
                by_labels.setdefault(s.labels, []).extend(s.samples)
        merged[name] = tuple(Series(k, tuple(v)) for k, v in by_labels.items())
    return merged
