"""Metrics and their Prometheus text exposition, for the agent's long-running processes.

Why not ``prometheus_client``: its package ``__init__`` imports its HTTP exposition whatever
submodule is asked for (``http.server``, ``wsgiref``, ``urllib.request``, ``email``), 4.5 MiB of
RSS in every agent process (main, each worker) for servers, clients and formats the agent never
uses: it serves ``/metrics`` from its own HTTP server (``agent.base.endpoint``). This module is
the part the agent uses: counters, gauges and histograms with labels (``agent.base.metrics``),
the families a scrape-time collector yields (``agent.telemetry``), a registry of collectors,
and the text writer. The CA (its own process) and the CLI views keep ``prometheus_client``
(its parser reads what this writes); ``lint-imports`` keeps it out of the agent's processes.

The exposition is byte for byte what ``prometheus_client`` 0.26's ``generate_latest`` gives
for the same metrics, because Prometheus, users' dashboards and the ``nodemesh`` views read it
(``tests/unit/base/test_promtext.py`` holds the two equal for random metrics):
  * ``# HELP`` then ``# TYPE`` per family; HELP escapes backslash and newline;
  * a counter family is named without ``_total`` and exposed with it; its ``_created``
    samples (and a histogram's) follow the family as a gauge family ``<name>_created`` with the
    same HELP, unless ``PROMETHEUS_DISABLE_CREATED_SERIES`` is set (as prometheus_client reads
    it) or ``set_created_series(False)`` was called;
  * labels sorted by name; values escape backslash, double quote and newline;
  * values as Go prints floats: ``1.0``, ``+Inf``, ``-Inf``, ``NaN``, and exponents from 1e6
    for positive values (``1.234567e+06``), as Python's ``repr`` otherwise.
Names must be Prometheus' classic ones (``[a-zA-Z_:][a-zA-Z0-9_:]*``, labels without ``:``),
so they are written as they are: a declaration with another name fails at once.

Single-threaded: the metrics are updated and scraped on the process's event loop, so a value
is a plain float, without prometheus_client's lock per update.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple, Protocol, Self, cast

# The Content-Type the agent's /metrics answered with when prometheus_client wrote it (0.26's
# CONTENT_TYPE_LATEST); the body is the 0.0.4 text format, which 1.0.0 reads unchanged.
CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TYPES = ("counter", "gauge", "histogram")
_INF = math.inf


def _created_from_environment() -> bool:
    flag = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower()
    return flag not in ("true", "1", "t")


_use_created = _created_from_environment()


def created_series() -> bool:
    """Whether counters and histograms expose ``_created`` samples (when each series began)."""
    return _use_created


def set_created_series(enabled: bool) -> None:
    """Turn ``_created`` samples on or off for the whole process (tests; the environment
    variable ``PROMETHEUS_DISABLE_CREATED_SERIES`` sets the default)."""
    global _use_created
    _use_created = enabled


def _check_metric_name(name: str) -> str:
    if _METRIC_NAME.fullmatch(name) is None:
        raise ValueError(
            f"metric name {name!r} is not a Prometheus metric name: use letters, digits, "
            "'_' and ':', not starting with a digit"
        )
    return name


def _check_label_names(names: Iterable[str], reserved: tuple[str, ...] = ()) -> tuple[str, ...]:
    out = tuple(names)
    for label in out:
        if _LABEL_NAME.fullmatch(label) is None or label.startswith("__") or label in reserved:
            raise ValueError(
                f"label name {label!r} is not allowed: use letters, digits and '_', not "
                f"starting with a digit or '__'{' and not ' + repr(reserved) if reserved else ''}"
            )
    if len(set(out)) != len(out):
        raise ValueError(f"label names {list(out)} name one label twice")
    return out


def format_value(value: float) -> str:
    """A sample value as Prometheus' Go code prints a float (``+Inf``, ``NaN``, ``1.0``;
    positive values of 1e6 and more with an exponent, which Python would print in full)."""
    v = float(value)
    if v == _INF:
        return "+Inf"
    if v == -_INF:
        return "-Inf"
    if v != v:
        return "NaN"
    text = repr(v)
    point = text.find(".")
    if v > 0 and point > 6:  # 123456.5 stays; 1234567.5 is 1.2345675e+06
        digits = (text[:point] + text[point + 1 :]).rstrip("0")
        mantissa = (digits[0] + "." + digits[1:]).rstrip(".")
        return f"{mantissa}e+{point - 1:02d}"
    return text


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Escaped(dict[str, str]):
    """Label values escaped, each once per exposition: a scrape repeats every series' values on
    each of its samples (a request histogram's 21), and escaping was 40 % of a scrape."""

    def __missing__(self, value: str) -> str:
        self[value] = escaped = escape_label_value(value)
        return escaped


class LabelText(dict[str, str]):
    """One series' labels (a dict, as every other sample's) that also keep their exposition
    text, made at the first scrape that writes them and reused by every later one.

    Why: a series' labels never change, yet the writer sorted, escaped and joined them on each
    of its lines at each scrape (a request series' 25 labels on its 50 lines: 44 KB a label
    set). A collector that keeps one ``LabelText`` per series (``LabelTexts``) and passes it to
    ``add_metric`` makes the label work of a scrape proportional to the series that are new
    since the last one. ``around_le`` is the text split where a histogram bucket's ``le``
    sorts, so a bucket line is ``head + le="..." + tail`` with nothing else made per line."""

    __slots__ = ("_head", "_tail", "_text")

    def __init__(self, names: Iterable[str], values: Iterable[str]) -> None:
        super().__init__(zip(names, values, strict=True))
        self._text: str | None = None
        self._head = self._tail = ""

    def _render(self) -> str:
        pairs = [(key, f'{key}="{escape_label_value(self[key])}"') for key in sorted(self)]
        before = [pair for key, pair in pairs if key < "le"]
        after = [pair for key, pair in pairs if key > "le"]
        self._head = "".join(pair + "," for pair in before)
        self._tail = "".join("," + pair for pair in after)
        self._text = text = ",".join(pair for _, pair in pairs)
        return text

    def text(self) -> str:
        """``a="x",b="y"``: the labels sorted by name, values escaped."""
        text = self._text
        return self._render() if text is None else text

    def around_le(self) -> tuple[str, str]:
        """(head, tail) such that ``head + 'le="0.5"' + tail`` is a bucket line's label text."""
        if self._text is None:
            self._render()
        return self._head, self._tail


class LabelTexts(dict[tuple[str, ...], LabelText]):
    """A collector's ``LabelText`` per label values, made when first asked for (at a scrape,
    not on the data path) and kept for the collector's life, as its series are."""

    __slots__ = ("_names",)

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self._names = tuple(names)

    def __missing__(self, values: tuple[str, ...]) -> LabelText:
        self[values] = text = LabelText(self._names, values)
        return text


class _Formatted(dict[float, str]):
    """Sample values formatted, each once per exposition (a histogram's counts repeat from
    bucket to bucket and series to series). Not for zeros: -0.0 == 0.0 as a key."""

    def __missing__(self, value: float) -> str:
        self[value] = text = format_value(value)
        return text


# Histogram bounds as written in a LabelText series' bucket lines, escaped once for the
# process: a collector's bounds are a few fixed strings (a bound, not a label value, so the set
# stays small; it starts over past _MAX_BOUNDS all the same).
_bounds_escaped = _Escaped()
_MAX_BOUNDS = 4096


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class Sample(NamedTuple):
    name: str
    labels: dict[str, str]
    value: float


class _Buckets(NamedTuple):
    """A ``LabelText`` series of a ``HistogramMetricFamily`` as one row: its buckets, sum and
    count are written from it, so collecting a family of 1,000 such series makes 1,000 rows,
    not 22,000 (collecting is one step of a scrape; writing is cut in parts)."""

    labels: LabelText
    buckets: Sequence[tuple[str, float]]
    sum: float | None


# What the writer reads: a Sample, or (family name, _Buckets, 0.0).
_Row = tuple[str, dict[str, str] | _Buckets, float]


class MetricFamily:
    """One metric family (name, HELP, type) and its samples. A counter's ``name`` is without
    ``_total``, its samples' names with it (prometheus_client's ``Metric`` alike).

    ``samples`` are dicts of labels for whoever reads them; the writer reads ``rows``, where
    a histogram's ``LabelText`` series is one row (``_Buckets``)."""

    __slots__ = ("_buckets", "documentation", "name", "rows", "type")

    def __init__(self, name: str, documentation: str, typ: str) -> None:
        if typ not in _TYPES:
            raise ValueError(f"metric type {typ!r} is not one of {list(_TYPES)}")
        self.name = _check_metric_name(name)
        self.documentation = documentation
        self.type = typ
        self.rows: list[_Row] = []
        self._buckets = False  # some rows are _Buckets

    @property
    def samples(self) -> list[Sample]:
        """The samples, each with its labels as a dict (bucket rows made whole: for readers
        other than the writer, e.g. ``Registry.get_sample_value`` and tests)."""
        if not self._buckets:
            return cast(list[Sample], self.rows)  # only Samples were added
        out: list[Sample] = []
        for name, labels, value in self.rows:
            if isinstance(labels, _Buckets):
                series, buckets, total = labels
                out += [
                    Sample(name + "_bucket", {**series, "le": bound}, count)
                    for bound, count in buckets
                ]
                if total is not None and _has_sum(buckets):
                    out.append(Sample(name + "_count", series, buckets[-1][1]))
                    out.append(Sample(name + "_sum", series, total))
            else:
                out.append(Sample(name, labels, value))
        return out

    def add_sample(self, name: str, labels: dict[str, str], value: float) -> None:
        self.rows.append(Sample(name, labels, value))

    def __repr__(self) -> str:
        return f"MetricFamily({self.name!r}, {self.type!r}, {len(self.rows)} samples)"


def _series(names: tuple[str, ...], labels: Sequence[str] | LabelText) -> dict[str, str]:
    """A series' labels: the ``LabelText`` given (kept, with its text) or a new dict."""
    if type(labels) is LabelText:
        return labels
    return dict(zip(names, labels, strict=False))


class CounterMetricFamily(MetricFamily):
    """A counter a collector reports: ``add_metric`` per series, with the time it began if
    known (``created``, a ``_created`` sample)."""

    __slots__ = ("_labelnames",)

    def __init__(
        self,
        name: str,
        documentation: str,
        value: float | None = None,
        labels: Sequence[str] | None = None,
        created: float | None = None,
    ) -> None:
        super().__init__(name.removesuffix("_total"), documentation, "counter")
        if labels is not None and value is not None:
            raise ValueError(f"counter {name}: give either a value or label names, not both")
        self._labelnames = _check_label_names(labels or ())
        if value is not None:
            self.add_metric([], value, created)

    def add_metric(
        self, labels: Sequence[str] | LabelText, value: float, created: float | None = None
    ) -> None:
        series = _series(self._labelnames, labels)
        self.rows.append(Sample(self.name + "_total", series, value))
        if created is not None:
            self.rows.append(Sample(self.name + "_created", series, created))


class GaugeMetricFamily(MetricFamily):
    __slots__ = ("_labelnames",)

    def __init__(
        self,
        name: str,
        documentation: str,
        value: float | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__(name, documentation, "gauge")
        if labels is not None and value is not None:
            raise ValueError(f"gauge {name}: give either a value or label names, not both")
        self._labelnames = _check_label_names(labels or ())
        if value is not None:
            self.add_metric([], value)

    def add_metric(self, labels: Sequence[str] | LabelText, value: float) -> None:
        self.rows.append(Sample(self.name, _series(self._labelnames, labels), value))


class HistogramMetricFamily(MetricFamily):
    """A histogram a collector reports: per series its cumulative buckets as
    ``(upper bound as exposed, count)`` in order, ending with ``"+Inf"``, and the sum."""

    __slots__ = ("_labelnames",)

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[tuple[str, float]] | None = None,
        sum_value: float | None = None,
        labels: Sequence[str] | None = None,
    ) -> None:
        super().__init__(name, documentation, "histogram")
        if sum_value is not None and buckets is None:
            raise ValueError(f"histogram {name}: a sum needs its buckets")
        if labels is not None and buckets is not None:
            raise ValueError(f"histogram {name}: give either buckets or label names, not both")
        self._labelnames = _check_label_names(labels or (), reserved=("le",))
        if buckets is not None:
            self.add_metric([], buckets, sum_value)

    def add_metric(
        self,
        labels: Sequence[str] | LabelText,
        buckets: Sequence[tuple[str, float]],
        sum_value: float | None,
    ) -> None:
        if type(labels) is LabelText:
            self._buckets = True
            self.rows.append((self.name, _Buckets(labels, buckets, sum_value), 0.0))
            return
        add = self.rows.append
        bucket = self.name + "_bucket"
        pairs = list(zip(self._labelnames, labels, strict=False))
        series = dict(pairs)
        for bound, count in buckets:
            add(Sample(bucket, dict([*pairs, ("le", bound)]), count))
        if sum_value is not None and _has_sum(buckets):
            add(Sample(self.name + "_count", series, buckets[-1][1]))
            add(Sample(self.name + "_sum", series, sum_value))


def _has_sum(buckets: Sequence[tuple[str, float]]) -> bool:
    """As Prometheus' clients do: no _count and _sum when buckets go below zero."""
    return float(buckets[0][0]) >= 0


class Collector(Protocol):
    """Anything whose ``collect`` yields metric families at scrape."""

    def collect(self) -> Iterable[MetricFamily]: ...


class DuplicateMetricError(ValueError):
    """A collector would expose a name another collector of the registry already exposes."""


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}


class Registry:
    """Collectors in the order they were registered; ``collect`` yields their families in that
    order. A collector with ``describe`` (the metrics below) names what it exposes, and a
    second collector exposing one of those names is refused; with ``describe_by_collect``, a
    collector without ``describe`` is asked by ``collect`` (as prometheus_client's
    ``auto_describe``)."""

    def __init__(self, *, describe_by_collect: bool = False) -> None:
        self._describe_by_collect = describe_by_collect
        self._collectors: dict[Collector, tuple[str, ...]] = {}
        self._owners: dict[str, Collector] = {}

    def _names(self, collector: Collector) -> tuple[str, ...]:
        describe = getattr(collector, "describe", None)
        if describe is None and self._describe_by_collect:
            describe = collector.collect
        if describe is None:
            return ()
        names: list[str] = []
        for family in describe():
            names.append(family.name)
            names += [family.name + suffix for suffix in _SUFFIXES.get(family.type, ())]
        return tuple(names)

    def register(self, collector: Collector) -> None:
        names = self._names(collector)
        taken = sorted(set(names) & set(self._owners))
        if taken or collector in self._collectors:
            raise DuplicateMetricError(
                f"{collector!r} exposes {taken or 'what it exposes'}, which this registry "
                "already has: declare each metric once"
            )
        self._collectors[collector] = names
        for name in names:
            self._owners[name] = collector

    def unregister(self, collector: Collector) -> None:
        for name in self._collectors.pop(collector):
            del self._owners[name]

    def collect(self) -> Iterator[MetricFamily]:
        for collector in list(self._collectors):
            yield from collector.collect()

    def get_sample_value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """The value of one sample, or None (for tests: it collects everything)."""
        want = dict(labels or {})
        for family in self.collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == want:
                    return sample.value
        return None


# Lines per part of ``exposition_parts``: about 0.45 MB of Istio request series, under 1 ms.
PART_LINES = 500


def exposition(source: Collector) -> bytes:
    """The text exposition (format 0.0.4) of everything ``source`` collects."""
    return b"".join(exposition_parts(source))


def exposition_parts(source: Collector, lines: int = PART_LINES) -> Iterator[bytes]:
    """The exposition of ``source`` in parts of about ``lines`` lines, to be joined in order.

    Why parts: the agent renders ``/metrics`` on the loop that relays its connections; its
    server takes a part at a time and lets the loop run in between (``TelemetryComponent.
    render``), so a scrape of 1,000 label sets (46 MB) delays a connection by one part, not
    the whole render. A collector's family is made whole when it is reached (``collect`` runs
    between parts, so a family is read at one instant: what it iterates cannot change under
    it), and written from its own rows.

    Per scrape the label work is for dicts and new ``LabelText`` series only (a kept
    ``LabelText`` is written as it was last time), and each distinct value is formatted once
    (``values``: a histogram's counts repeat from bucket to bucket and series to series)."""
    out: list[str] = []
    append = out.append
    fmt = format_value
    esc = _Escaped()
    values = _Formatted()
    if len(_bounds_escaped) > _MAX_BOUNDS:
        _bounds_escaped.clear()
    bounds = _bounds_escaped
    for family in source.collect():
        name = family.name
        exposed = name + "_total" if family.type == "counter" else name
        doc = escape_help(family.documentation)
        append(f"# HELP {exposed} {doc}\n# TYPE {exposed} {family.type}\n")
        created_name = name + "_created"
        created: list[str] = []
        for sample_name, labels, value in family.rows:
            if isinstance(labels, _Buckets):  # a LabelText series of a histogram
                series, buckets, total = labels
                head, tail = series.around_le()
                bucket = sample_name + "_bucket"
                for bound, count in buckets:
                    text = values[count] if count else fmt(count)
                    append(f'{bucket}{{{head}le="{bounds[bound]}"{tail}}} {text}\n')
                if total is not None and _has_sum(buckets):
                    count, text = buckets[-1][1], series.text()
                    text = f"{{{text}}} " if text else " "
                    counted = values[count] if count else fmt(count)
                    summed = values[total] if total else fmt(total)
                    append(f"{sample_name}_count{text}{counted}\n")
                    append(f"{sample_name}_sum{text}{summed}\n")
                if len(out) >= lines:
                    yield "".join(out).encode()
                    out.clear()
                continue
            # Zeros are formatted each time: -0.0 == 0.0 as a key, but prints "-0.0".
            text = values[value] if value else fmt(value)
            if not labels:
                line = f"{sample_name} {text}\n"
            elif isinstance(labels, LabelText):
                line = f"{sample_name}{{{labels.text()}}} {text}\n"
            else:
                pairs = ",".join(
                    [f'{key}="{esc[labels[key]]}"' for key in sorted(labels)]
                    if len(labels) > 1
                    else [f'{key}="{esc[v]}"' for key, v in labels.items()]
                )
                line = f"{sample_name}{{{pairs}}} {text}\n"
            if sample_name == created_name:
                created.append(line)
            else:
                append(line)
                if len(out) >= lines:
                    yield "".join(out).encode()
                    out.clear()
        if created:
            append(f"# HELP {created_name} {doc}\n# TYPE {created_name} gauge\n")
            out += created
    yield "".join(out).encode()


# -- metrics updated in place ---------------------------------------------------------------


class _Metric:
    """What Counter, Gauge and Histogram share: a name, HELP, label names, and per label
    values a child (made at its first ``labels`` call, exposed in that order); a metric
    without labels is its own only child."""

    _type = "gauge"
    _reserved: tuple[str, ...] = ()
    __slots__ = ("_children", "_labelnames", "_labelvalues", "documentation", "name")

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        registry: Registry | None = None,
        _labelvalues: tuple[str, ...] = (),
    ) -> None:
        if self._type == "counter":
            name = name.removesuffix("_total")
        self.name = _check_metric_name(name)
        self.documentation = documentation
        self._labelnames = _check_label_names(labelnames, self._reserved)
        self._labelvalues = _labelvalues
        self._children: dict[tuple[str, ...], Self] = {}
        if not self._labelnames or _labelvalues:
            self._init_value()
        if registry is not None:
            registry.register(self)

    @property
    def labelnames(self) -> tuple[str, ...]:
        return self._labelnames

    def _init_value(self) -> None:
        raise NotImplementedError

    def _child(self, values: tuple[str, ...]) -> Self:
        """The child of ``values`` (a metric of the same kind, name and label names)."""
        return type(self)(self.name, self.documentation, self._labelnames, None, values)

    def labels(self, *values: object, **named: object) -> Self:
        """The child of these label values (by position or by name), made at first use."""
        if not self._labelnames:
            raise ValueError(f"metric {self.name} has no labels: update it without labels()")
        if self._labelvalues:
            raise ValueError(f"metric {self.name}: labels() is already applied")
        if values and named:
            raise ValueError(f"metric {self.name}: give label values by position or by name")
        if named:
            if sorted(named) != sorted(self._labelnames):
                raise ValueError(
                    f"metric {self.name} has labels {list(self._labelnames)}, not {sorted(named)}"
                )
            key = tuple(str(named[label]) for label in self._labelnames)
        else:
            if len(values) != len(self._labelnames):
                raise ValueError(
                    f"metric {self.name} has labels {list(self._labelnames)}: "
                    f"{len(values)} values given"
                )
            key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._child(key)
        return child

    def remove(self, *values: object) -> None:
        self._children.pop(tuple(str(v) for v in values), None)

    def clear(self) -> None:
        self._children.clear()

    def _check_observable(self) -> None:
        if self._labelnames and not self._labelvalues:
            raise ValueError(
                f"metric {self.name} has labels {list(self._labelnames)}: use .labels(...) first"
            )

    def _own_samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        raise NotImplementedError

    def describe(self) -> list[MetricFamily]:
        return [MetricFamily(self.name, self.documentation, self._type)]

    def collect(self) -> list[MetricFamily]:
        family = MetricFamily(self.name, self.documentation, self._type)
        add = family.rows.append
        name = self.name
        if self._labelnames:
            labelnames = self._labelnames
            for key, child in list(self._children.items()):
                series = dict(zip(labelnames, key, strict=True))
                for suffix, extra, value in child._own_samples():
                    add(Sample(name + suffix, {**series, **extra}, value))
        else:
            for suffix, extra, value in self._own_samples():
                add(Sample(name + suffix, extra, value))
        return [family]


class Counter(_Metric):
    """Counts up; exposed as ``<name>_total`` and, per series, ``<name>_created``."""

    _type = "counter"
    __slots__ = ("_created", "_value")

    def _init_value(self) -> None:
        self._value = 0.0
        self._created = time.time()

    def inc(self, amount: float = 1) -> None:
        self._check_observable()
        if amount < 0:
            raise ValueError(f"counter {self.name} can only go up: inc({amount})")
        self._value += amount

    def get(self) -> float:
        """This series' count (tests)."""
        return self._value

    def _own_samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        yield "_total", {}, self._value
        if _use_created:
            yield "_created", {}, self._created


class Gauge(_Metric):
    _type = "gauge"
    __slots__ = ("_value",)

    def _init_value(self) -> None:
        self._value = 0.0

    def inc(self, amount: float = 1) -> None:
        self._check_observable()
        self._value += amount

    def dec(self, amount: float = 1) -> None:
        self._check_observable()
        self._value -= amount

    def set(self, value: float) -> None:
        self._check_observable()
        self._value = float(value)

    def get(self) -> float:
        return self._value

    def _own_samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        yield "", {}, self._value


DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class Histogram(_Metric):
    """Observations counted in buckets (upper bounds, ``+Inf`` added), with their sum."""

    _type = "histogram"
    _reserved = ("le",)
    __slots__ = ("_bounds", "_counts", "_created", "_sum")

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        registry: Registry | None = None,
        _labelvalues: tuple[str, ...] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds):
            raise ValueError(f"histogram {name}: buckets {list(buckets)} are not in order")
        if not bounds or bounds[-1] != _INF:
            bounds.append(_INF)
        if len(bounds) < 2:
            raise ValueError(f"histogram {name}: give at least one bucket besides +Inf")
        self._bounds = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry, _labelvalues)

    def _init_value(self) -> None:
        self._counts = [0.0] * len(self._bounds)
        self._sum = 0.0
        self._created = time.time()

    def _child(self, values: tuple[str, ...]) -> Self:
        return type(self)(
            self.name, self.documentation, self._labelnames, None, values, self._bounds
        )

    def observe(self, amount: float) -> None:
        self._check_observable()
        self._sum += amount
        for i, bound in enumerate(self._bounds):
            if amount <= bound:
                self._counts[i] += 1
                break

    def _own_samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        total = 0.0
        for bound, count in zip(self._bounds, self._counts, strict=True):
            total += count
            yield "_bucket", {"le": format_value(bound)}, total
        yield "_count", {}, total
        if self._bounds[0] >= 0:
            yield "_sum", {}, self._sum
        if _use_created:
            yield "_created", {}, self._created
