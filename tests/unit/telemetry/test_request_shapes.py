"""Request telemetry rendered once per shape and label set (``accesslog.request_shape``,
``HttpMetrics._series_of``): the access log lines, the ``/metrics`` exposition and the tap's
entries are byte for byte what the earlier per-request rendering gave (kept here as the
reference), per request the line quotes only the request's own strings, no label set is
hashed, and what is remembered stays bounded."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.base.promtext import CounterMetricFamily, HistogramMetricFamily, exposition
from agent.proxy.records import Registry
from agent.telemetry import accesslog, http
from agent.telemetry.accesslog import (
    _quote,
    _stamp,
    labels_tail,
    request_line,
    request_shape,
    shaped_request_line,
)
from agent.telemetry.http import REQUEST_LABEL_NAMES, RequestLabels, _Series
from agent.telemetry.records import ConnectionRecord, RequestRecord
from tests.unit.telemetry.telemetry_helpers import (
    COUNT,
    MILLIS,
    TEXT,
    inbound,
    make_store,
    outbound,
)

# -- the reference: the request line as it was rendered per request before shapes ------------
_OLD_HEAD = (
    '{"time":"%s.%03d+00:00","connection_id":%d,"direction":%s,"source_address":%s,'
    '"destination_address":%s,"upstream_address":%s,"method":%s,"path":%s,"authority":%s,'
    '"response_code":%d,"grpc_status":%s,"duration_ms":%r,"request_bytes":%d,'
    '"response_bytes":%d,"response_flags":%s,"request_id":%s,'
)


def old_request_line(
    connection: ConnectionRecord, request: RequestRecord, tail: str, ended: float
) -> str:
    q = _quote
    time_text, time_ms = _stamp(ended)
    head = _OLD_HEAD % (
        time_text,
        time_ms,
        connection.id,
        q(connection.direction),
        q(connection.source),
        q(connection.destination),
        q(request.upstream or connection.upstream or connection.destination),
        q(request.method),
        q(request.path),
        q(request.authority),
        request.status,
        q(request.grpc_status),
        round(request.duration_ms, 3),
        request.request_bytes,
        request.response_bytes,
        q(request.response_flags),
        q(request.request_id),
    )
    why = ""
    if request.policy:
        why += f'"policy":{q(request.policy)},'
    if request.dry_run_policy:
        why += f'"dry_run_policy":{q(request.dry_run_policy)},'
    return head + why + tail


class OldHttpMetrics(http.HttpMetrics):
    """``HttpMetrics`` as it counted before: a ``Counter`` by label set per request, each
    histogram's ``observe``, the tap's own time, the line rendered whole per request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.old_requests: Counter[RequestLabels] = Counter()
        self.old_lines: list[tuple[ConnectionRecord, RequestRecord, str]] = []

    def requested(self, connection: ConnectionRecord, request: RequestRecord) -> None:
        series = self._series_of(connection, request)
        self.old_requests[series.labels] += 1
        series.duration.observe(request.duration_ms)
        series.request_bytes.observe(float(request.request_bytes))
        series.response_bytes.observe(float(request.response_bytes))
        self.tap.add(connection, request, series.named)
        if self._access_log and self._sampler.keep(request):
            self.old_lines.append((connection, request, labels_tail(series.named)))

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        families = super().collect()
        next(families)  # the new count of requests, replaced by the old one
        family = CounterMetricFamily(
            http.REQUESTS,
            "Requests served (Istio standard metric)",
            labels=REQUEST_LABEL_NAMES,
        )
        for labels, value in self.old_requests.items():
            family.add_metric(list(labels.values), value)
        yield family
        yield from families


CONNECTIONS = st.sampled_from([inbound, outbound, lambda: outbound(40001)])
REQUESTS = st.builds(
    RequestRecord,
    method=st.sampled_from(["GET", "POST", 'we"ird']),
    path=TEXT,
    authority=TEXT,
    status=st.sampled_from([200, 404, 503]),
    duration_ms=MILLIS,
    request_bytes=COUNT,
    response_bytes=COUNT,
    response_flags=st.sampled_from(["-", "UC", "RBAC"]),
    request_id=TEXT,
    protocol=st.sampled_from(["http", "grpc"]),
    grpc_status=st.sampled_from(["", "0", "14"]),
    upstream=st.sampled_from(["", "10.244.2.3:8080", 'x"\\\u00e9']),
    policy=st.sampled_from(["", "default/deny:rules[0]"]),
    dry_run_policy=st.sampled_from(["", "default/dry"]),
)


@given(
    st.builds(
        ConnectionRecord,
        direction=st.sampled_from(["inbound", "outbound"]),
        source=TEXT,
        destination=TEXT,
        id=COUNT,
        upstream=TEXT,
    ),
    REQUESTS,
    st.lists(TEXT, min_size=len(REQUEST_LABEL_NAMES), max_size=len(REQUEST_LABEL_NAMES)),
    st.floats(min_value=0.0, max_value=4e9, allow_nan=False),
)
def test_a_shaped_line_is_the_per_request_line_byte_for_byte(
    connection: ConnectionRecord, request: RequestRecord, values: list[str], ended: float
) -> None:
    labels = dict(zip(REQUEST_LABEL_NAMES, values, strict=True))
    tail = labels_tail(labels)
    old = old_request_line(connection, request, tail, ended)
    assert request_line(connection, request, labels, ended) == old
    shape = request_shape(connection, request, tail)
    assert shaped_request_line(connection, request, shape, ended) == old


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(CONNECTIONS, REQUESTS), min_size=1, max_size=30))
def test_metrics_lines_and_tap_are_what_the_per_request_path_gave(
    traffic: list[tuple[Any, RequestRecord]],
) -> None:
    store = make_store()
    new, old = http.HttpMetrics(store), OldHttpMetrics(store)
    lines: list[str] = []
    original = http.write_request_log
    http.write_request_log = lambda c, r, shape, now: lines.append(  # type: ignore[assignment]
        shaped_request_line(c, r, shape, 1e9)
    )
    try:
        for make, request in traffic:
            connection = make()
            new.requested(connection, request)
            old.requested(connection, request)
    finally:
        http.write_request_log = original
    assert exposition(new) == exposition(old)
    assert lines == [old_request_line(c, r, tail, 1e9) for c, r, tail in old.old_lines]
    new_tap, old_tap = new.tap.since(0), old.tap.since(0)
    for entries in (new_tap.entries, old_tap.entries):
        for entry in entries:
            entry.pop("time")  # when each was reported
    assert new_tap == old_tap


def _quotes_per_request(
    monkeypatch: pytest.MonkeyPatch, metrics: http.HttpMetrics, connection: ConnectionRecord
) -> int:
    calls = 0

    def counting(text: str) -> str:
        nonlocal calls
        calls += 1
        return _quote(text)

    monkeypatch.setattr(accesslog, "_quote", counting)
    monkeypatch.setattr(accesslog._writer, "write", lambda line, now: True)
    request = RequestRecord("GET", "/items/42", "server:80", 200, 3.0, 10, 2000, "-", "rid")
    metrics.requested(connection, request)  # renders the shape
    calls = 0
    for _ in range(10):
        metrics.requested(connection, request)
    return calls


def test_a_request_line_quotes_only_the_requests_own_strings(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=accesslog.ACCESS_LOGGER)
    # method, path, authority, request id (ten when the line was rendered whole)
    assert _quotes_per_request(monkeypatch, http.HttpMetrics(make_store()), inbound()) == 40


def test_a_request_hashes_no_label_set(monkeypatch: pytest.MonkeyPatch) -> None:
    hashed = 0

    class Counted(RequestLabels):
        def __hash__(self) -> int:
            nonlocal hashed
            hashed += 1
            return super().__hash__()

    monkeypatch.setattr(http, "RequestLabels", Counted)
    metrics = http.HttpMetrics(make_store(), access_log=False)
    request = RequestRecord("GET", "/", "server:80", 200, 3.0, 10, 2000, "-", "rid")
    connection = inbound()
    metrics.requested(connection, request)  # finds its labels and histograms: hashes them
    hashed = 0
    for _ in range(10):
        metrics.requested(connection, request)
    assert hashed == 0  # the counter by label set hashed its fourteen labels twice a request
    assert b'response_code="200"' in exposition(metrics)


def test_request_done_makes_few_python_calls(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The Python functions entered per reported request (the writer's ``write`` replaced by
    one that keeps the line): ``request_done``, ``requested``, ``_series_of``,
    ``snapshot``, ``RequestRing.add``, ``write_request_log``, ``Logger.isEnabledFor``,
    ``shaped_request_line``, ``_stamp`` and the writer: 10. Before shapes it was 17 (a closure
    and ``_tell``, three ``observe``, ``Tapped.__new__``, ``RequestSampler.keep``)."""
    caplog.set_level(logging.INFO, logger=accesslog.ACCESS_LOGGER)
    monkeypatch.setattr(accesslog._writer, "write", lambda line, now: True)
    registry = Registry()
    metrics = http.HttpMetrics(make_store())
    registry.request_observers.append(metrics)
    connection = inbound()
    request = RequestRecord("GET", "/", "server:80", 200, 3.0, 10, 2000, "-", "rid")
    registry.request_done(connection, request)
    calls: Counter[str] = Counter()

    def count(frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            calls[frame.f_code.co_qualname] += 1

    sys.setprofile(count)
    try:
        for _ in range(10):
            registry.request_done(connection, request)
    finally:
        sys.setprofile(None)
    # a second's text is formatted once per second (another test's later times can make
    # that every line here: ``_Seconds`` keeps the newest)
    calls.pop("_Seconds.text", None)
    assert sum(calls.values()) == 10 * 10, calls


def test_series_and_their_shapes_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http, "MAX_CACHED_SERIES", 8)
    metrics = http.HttpMetrics(make_store(), access_log=False)
    connection = inbound()
    for port in range(50):  # each upstream its own line shape
        request = RequestRecord(
            "GET", "/", "s", 200, 1.0, 1, 1, "-", "r", upstream=f"10.244.2.2:{port}"
        )
        metrics.requested(connection, request)
        assert len(metrics._series) <= 8
        assert all(isinstance(s, _Series) for s in metrics._series.values())
    # one label set for all of them: the count is whole across the cache's restarts
    lines = [
        line
        for line in exposition(metrics).decode().splitlines()
        if line.startswith("istio_requests_total{")
    ]
    assert len(lines) == 1 and lines[0].endswith(" 50.0")
