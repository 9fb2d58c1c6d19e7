"""``agent.base.promtext`` writes what prometheus_client wrote for the same metrics, byte for byte
(the agent's /metrics before and after it left prometheus_client), the workers' merge of its
expositions is the merge prometheus_client's parser and writer made, and the agent's processes
no longer import prometheus_client."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from unittest.mock import patch

import prometheus_client
import pytest
from hypothesis import given, seed, settings
from hypothesis import strategies as st
from prometheus_client import core as pc_core
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from agent.base import promtext
from agent.workers import merge

# -- what the metrics are: one description, built through both libraries ---------------------

# Label values and HELP texts with what must be escaped, unicode (also the line and paragraph
# separators and blanks prometheus_client's parser treats specially), and the empty string.
_TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(["\\", '"', "\n", " ", "\t", "\r", "n", "=", ",", "{", "}", "#"]),
        st.sampled_from(["é", "日", "本", "\u2028", "\x85", "\xa0", "😀", "\x00", "\x1c"]),
        st.characters(codec="utf-8"),
    ),
    max_size=12,
)
_VALUE = st.one_of(
    st.integers(min_value=0, max_value=10**6),
    st.floats(min_value=0, max_value=1e22, allow_nan=False),
    st.sampled_from([0.0, 1.0, 0.1, 1e6, 999999.5, 1234567.0, 12345678.9, 1e16, 2.5e-9, math.inf]),
)
_SIGNED = st.one_of(_VALUE, st.floats(allow_nan=True), st.just(-math.inf))
_LABELS = st.lists(
    st.sampled_from(["a", "b", "service", "le_x", "_c", "Z9"]), unique=True, max_size=3
)
_BOUNDS = st.lists(
    st.floats(min_value=-100, max_value=1e9, allow_nan=False, allow_infinity=False),
    min_size=1,
    max_size=5,
    unique=True,
).map(sorted)


@dataclass
class Spec:
    kind: str  # counter, gauge, histogram: updated in place; c_family, g_family, h_family
    name: str
    doc: str
    labels: list[str]
    ops: list[tuple[list[str], float]] = field(default_factory=list)
    bounds: list[float] = field(default_factory=list)
    created: bool = False
    kept: bool = False  # our custom family's series as promtext.LabelText, as collectors keep


@st.composite
def _spec(draw: st.DrawFn, index: int) -> Spec:
    kind = draw(st.sampled_from(["counter", "gauge", "histogram", "c_family", "g_family"]))
    kind = draw(st.sampled_from([kind, "h_family"]))
    base = draw(st.sampled_from(["nodemesh_x", "istio_tcp:y", "_z", "a"]))
    name = f"{base}{index}" + draw(st.sampled_from(["", "_total", "_seconds", "_count"]))
    labels = draw(_LABELS)
    values = st.lists(_TEXT, min_size=len(labels), max_size=len(labels))
    amount = _SIGNED if kind in ("gauge", "g_family") else _VALUE
    ops = draw(st.lists(st.tuples(values, amount), max_size=6))
    return Spec(
        kind,
        name,
        draw(_TEXT),
        labels,
        ops,
        bounds=draw(_BOUNDS),
        created=draw(st.booleans()),
        kept=draw(st.booleans()),
    )


_SPECS = st.integers(min_value=1, max_value=6).flatmap(
    lambda n: st.tuples(*[_spec(i) for i in range(n)]).map(list)
)


def _family_series(spec: Spec) -> dict[tuple[str, ...], list[float]]:
    """A custom family's series: label values → the amounts given for them, in first-seen
    order (a collector reports each series once)."""
    out: dict[tuple[str, ...], list[float]] = {}
    for values, amount in spec.ops:
        out.setdefault(tuple(values), []).append(amount)
    return out


def _histogram_buckets(bounds: Sequence[float], amounts: list[float]) -> list[tuple[str, float]]:
    edges = [*bounds, math.inf]
    return [
        (promtext.format_value(edge), float(sum(1 for a in amounts if a <= edge))) for edge in edges
    ]


def _families(lib: object, spec: Spec) -> object:
    """A custom collector's family of ``spec`` through ``lib`` (promtext or prometheus_client's
    ``core``); both have the same three classes."""
    series = _family_series(spec)
    kept = lib is promtext and spec.kept
    texts = promtext.LabelTexts(spec.labels)

    def labels(values: tuple[str, ...]) -> object:
        return texts[values] if kept else list(values)

    if spec.kind == "c_family":
        family = lib.CounterMetricFamily(spec.name, spec.doc, labels=spec.labels)  # type: ignore[attr-defined]
        for values, amounts in series.items():
            created = 1.6e9 + len(values) if spec.created else None
            family.add_metric(labels(values), sum(amounts), created=created)
    elif spec.kind == "g_family":
        family = lib.GaugeMetricFamily(spec.name, spec.doc, labels=spec.labels)  # type: ignore[attr-defined]
        for values, amounts in series.items():
            family.add_metric(labels(values), amounts[-1])
    else:
        family = lib.HistogramMetricFamily(spec.name, spec.doc, labels=spec.labels)  # type: ignore[attr-defined]
        for values, amounts in series.items():
            buckets = _histogram_buckets(spec.bounds, amounts)
            family.add_metric(labels(values), buckets, sum(amounts))
    return family


class _Fixed:
    def __init__(self, families: list[object]) -> None:
        self.families = families

    def collect(self) -> Iterator[object]:
        yield from self.families


def _apply(metric: object, spec: Spec) -> None:
    for values, amount in spec.ops:
        target = metric.labels(*values) if spec.labels else metric  # type: ignore[attr-defined]
        if spec.kind == "counter":
            target.inc(amount)
        elif spec.kind == "gauge":
            target.set(amount)
        else:
            target.observe(amount)


def _build(specs: list[Spec], ours: bool) -> object:
    """A registry of ``specs``: metrics updated in place first, then one custom collector."""
    registry: object = promtext.Registry() if ours else CollectorRegistry()
    kinds = (
        {"counter": promtext.Counter, "gauge": promtext.Gauge, "histogram": promtext.Histogram}
        if ours
        else {
            "counter": prometheus_client.Counter,
            "gauge": prometheus_client.Gauge,
            "histogram": prometheus_client.Histogram,
        }
    )
    custom = []
    for spec in specs:
        if spec.kind in kinds:
            kw = {"buckets": spec.bounds} if spec.kind == "histogram" else {}
            metric = kinds[spec.kind](spec.name, spec.doc, spec.labels, registry=registry, **kw)
            _apply(metric, spec)
        else:
            custom.append(_families(promtext if ours else pc_core, spec))
    registry.register(_Fixed(custom))  # type: ignore[attr-defined]
    return registry


def _both(specs: list[Spec], created: bool) -> tuple[bytes, bytes]:
    clock = [1.7e9]

    def now() -> float:
        clock[0] += 0.25
        return clock[0]

    default = promtext.created_series()
    promtext.set_created_series(created)
    if created:
        prometheus_client.enable_created_metrics()
    else:
        prometheus_client.disable_created_metrics()
    try:
        with patch("time.time", now):
            registry = _build(specs, ours=True)
            ours = promtext.exposition(registry)  # type: ignore[arg-type]
            # Again: kept series (LabelText) now written from the text the first one made.
            assert promtext.exposition(registry) == ours  # type: ignore[arg-type]
            clock[0] = 1.7e9  # the same times again
            theirs = prometheus_client.generate_latest(_build(specs, ours=False))  # type: ignore[arg-type]
    finally:
        promtext.set_created_series(default)
        prometheus_client.enable_created_metrics()
    return ours, theirs


@settings(max_examples=300, deadline=None)
@given(specs=_SPECS, created=st.booleans())
@seed(18)
def test_the_exposition_is_prometheus_clients_byte_for_byte(
    specs: list[Spec], created: bool
) -> None:
    """Counters, gauges and histograms updated in place and the families of a collector, with
    any label values and HELP texts (escapes, unicode, empty), any values (integers, Go's
    exponent form, infinities, NaN), with and without ``_created``: the same bytes."""
    ours, theirs = _both(specs, created)
    assert ours == theirs


@pytest.mark.parametrize("run_seed", [1, 2, 3])
def test_the_exposition_is_prometheus_clients_for_other_seeds(run_seed: int) -> None:
    @settings(max_examples=100, deadline=None)
    @given(specs=_SPECS)
    @seed(run_seed)
    def check(specs: list[Spec]) -> None:
        ours, theirs = _both(specs, created=True)
        assert ours == theirs

    check()


def _reference_merge(texts: Sequence[bytes]) -> bytes:
    """``agent.workers.merge.expositions`` as it was, on prometheus_client's parser and
    writer: the merge must stay what it was."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            sums = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in sums:
                    sums[key] = sample.value
                elif sample.name.endswith("_created"):
                    sums[key] = min(sums[key], sample.value)
                else:
                    sums[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return prometheus_client.generate_latest(_Fixed(list(families.values())))  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(specs=_SPECS, scales=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=3))
@seed(18)
def test_the_merge_of_processes_is_what_prometheus_clients_merge_gave(
    specs: list[Spec], scales: list[int]
) -> None:
    """Several processes with the same metrics and other values (as workers): the merged
    exposition of ours is what the old merge made of prometheus_client's."""
    texts = []
    for scale in scales:
        scaled = [replace(s, ops=[(v, a * scale) for v, a in s.ops]) for s in specs]
        ours, theirs = _both(scaled, created=True)
        assert ours == theirs
        texts.append(ours)
    assert merge.expositions(texts) == _reference_merge(texts)


@settings(max_examples=200, deadline=None)
@given(specs=_SPECS)
@seed(20)
def test_kept_label_texts_give_the_samples_and_bytes_of_label_lists(specs: list[Spec]) -> None:
    """A collector's family made with ``LabelText`` series reads as one made with label value
    lists: the same samples (a histogram's buckets with ``le`` in their dicts) and the same
    exposition, at its first scrape and at later ones."""

    def made(kept: bool) -> list[promtext.MetricFamily]:
        return [
            _families(promtext, replace(s, kept=kept))  # type: ignore[misc]
            for s in specs
            if s.kind.endswith("_family")
        ]

    kept, lists = made(True), made(False)
    assert [f.samples for f in kept] == [f.samples for f in lists]
    for _ in range(2):
        assert promtext.exposition(_Fixed(kept)) == promtext.exposition(_Fixed(lists))  # type: ignore[arg-type]


@settings(max_examples=100, deadline=None)
@given(specs=_SPECS, lines=st.integers(min_value=1, max_value=4))
@seed(20)
def test_the_parts_of_an_exposition_join_to_it(specs: list[Spec], lines: int) -> None:
    """``exposition_parts`` cuts the text at whole lines (``_created`` families included)
    every ``lines`` samples; joined, the parts are the exposition."""
    registry = _build(specs, ours=True)
    parts = list(promtext.exposition_parts(registry, lines))  # type: ignore[arg-type]
    whole = promtext.exposition(registry)  # type: ignore[arg-type]
    assert b"".join(parts) == whole
    assert all(part.endswith(b"\n") for part in parts if part)


@pytest.mark.parametrize(
    ("names", "head", "tail"),
    [
        ((), "", ""),
        (("a",), 'a="1",', ""),
        (("z",), "", ',z="1"'),
        (("le_x", "a", "l"), 'a="1",l="1",', ',le_x="1"'),
        (("reporter", "destination_app", "lf"), 'destination_app="1",', ',lf="1",reporter="1"'),
    ],
)
def test_a_bucket_line_has_le_where_its_name_sorts(
    names: tuple[str, ...], head: str, tail: str
) -> None:
    text = promtext.LabelText(names, ["1"] * len(names))
    assert text.around_le() == (head, tail)
    assert text.text() == ",".join(f'{n}="1"' for n in sorted(names))


def test_the_content_type_is_the_one_served_before() -> None:
    assert promtext.CONTENT_TYPE == prometheus_client.CONTENT_TYPE_LATEST


def test_format_value_is_gos() -> None:
    cases = {
        1: "1.0",
        0.5: "0.5",
        1e7: "1e+07",
        12345678.9: "1.23456789e+07",
        1234567.0: "1.234567e+06",
        123456.5: "123456.5",
        -12345678.0: "-12345678.0",
        1e22: "1e+22",
        math.inf: "+Inf",
        -math.inf: "-Inf",
        math.nan: "NaN",
    }
    for value, text in cases.items():
        assert promtext.format_value(value) == text


def test_a_name_prometheus_cannot_read_unescaped_is_refused_at_declaration() -> None:
    with pytest.raises(ValueError, match="not a Prometheus metric name"):
        promtext.Counter("nodemesh-requests", "Requests")
    with pytest.raises(ValueError, match="label name 'le' is not allowed"):
        promtext.Histogram("nodemesh_latency", "Latency", ["le"])
    with pytest.raises(ValueError, match="'__x' is not allowed"):
        promtext.GaugeMetricFamily("nodemesh_g", "G", labels=["__x"])


def test_a_name_registered_twice_is_refused() -> None:
    registry = promtext.Registry()
    promtext.Counter("nodemesh_things_total", "Things", registry=registry)
    with pytest.raises(promtext.DuplicateMetricError, match="nodemesh_things_total"):
        promtext.Gauge("nodemesh_things_total", "Things now", registry=registry)


def test_children_and_sample_lookup() -> None:
    registry = promtext.Registry()
    c = promtext.Counter("nodemesh_events", "Events", ["kind"], registry=registry)
    c.labels("a").inc()
    c.labels(kind="a").inc(2)
    assert c.labels("a").get() == 3.0
    assert registry.get_sample_value("nodemesh_events_total", {"kind": "a"}) == 3.0
    assert registry.get_sample_value("nodemesh_events_total", {"kind": "b"}) is None
    with pytest.raises(ValueError, match=r"use \.labels"):
        c.inc()
    with pytest.raises(ValueError, match="can only go up"):
        c.labels("a").inc(-1)


def test_the_agents_processes_do_not_import_prometheus_client() -> None:
    """The main process's modules (``nodemesh agent`` with its proxy), a worker's entry module
    and the netlink helper's: prometheus_client's import costs 4.5 MiB in each."""
    probe = (
        "import sys; import agent.app, agent.proxy.server, agent.proxy.component, "
        "agent.identity.component, agent.telemetry.component, agent.workers.worker, "
        "agent.datapath.netlinkd; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prometheus_client'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
