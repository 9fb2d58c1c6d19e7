"""The access log's lines (``agent.telemetry.accesslog.request_line`` and ``connection_line``):
written directly for speed, each must be exactly what ``json.dumps`` makes of the documented
entry (``request_entry``, the fields the tap and ``nodemesh requests`` show; ``connection_entry``
with its ``time``, the fields ``/connections`` shows), for any values the records can hold."""

from __future__ import annotations

import calendar
import datetime as dt
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.telemetry import accesslog
from agent.telemetry.accesslog import (
    _iso,
    connection_entry,
    connection_line,
    request_entry,
    request_line,
)
from agent.telemetry.http import REQUEST_LABEL_NAMES
from agent.telemetry.labels import TcpLabels
from agent.telemetry.records import ConnectionRecord, RequestRecord
from tests.unit.telemetry.telemetry_helpers import COUNT, MILLIS, TEXT

TIME = st.floats(min_value=0.0, max_value=4e9, allow_nan=False)


@given(
    st.builds(
        ConnectionRecord,
        direction=st.sampled_from(["inbound", "outbound"]),
        source=TEXT,
        destination=TEXT,
        id=COUNT,
        upstream=TEXT,
    ),
    st.builds(
        RequestRecord,
        method=TEXT,
        path=TEXT,
        authority=TEXT,
        status=st.integers(min_value=0, max_value=999),
        duration_ms=MILLIS,
        request_bytes=COUNT,
        response_bytes=COUNT,
        response_flags=TEXT,
        request_id=TEXT,
        grpc_status=TEXT,
        upstream=TEXT,
        policy=TEXT,
        dry_run_policy=TEXT,
    ),
    st.lists(TEXT, min_size=len(REQUEST_LABEL_NAMES), max_size=len(REQUEST_LABEL_NAMES)),
    st.floats(min_value=0.0, max_value=4e9, allow_nan=False),
)
def test_the_request_line_is_json_dumps_of_the_request_entry(
    connection: ConnectionRecord, request: RequestRecord, values: list[str], ended: float
) -> None:
    labels = dict(zip(REQUEST_LABEL_NAMES, values, strict=True))
    entry = request_entry(connection, request, labels, ended)
    assert request_line(connection, request, labels, ended) == json.dumps(
        entry, separators=(",", ":")
    )


@given(
    st.builds(
        ConnectionRecord,
        direction=TEXT,
        source=TEXT,
        destination=TEXT,
        path=TEXT,
        started=TIME,
        bytes_sent=COUNT,
        bytes_received=COUNT,
        id=COUNT,
        upstream=TEXT,
        failure=TEXT,
        policy=TEXT,
        protocol=TEXT,
        requests=COUNT,
    ),
    st.builds(TcpLabels, *[TEXT] * len(TcpLabels._fields)),
    TIME,
)
def test_the_connection_line_is_json_dumps_of_the_connection_entry(
    record: ConnectionRecord, labels: TcpLabels, now: float
) -> None:
    """Every field, in order: strings a peer controls escaped as json escapes them (quotes,
    backslashes, controls, non-ASCII), an empty ``failure``/``policy`` as ``null``, a start
    after ``now`` as 0 ms; twice, so that the second renders the labels from the cache."""
    expected = json.dumps(
        {"time": _iso(now), **connection_entry(record, labels, now)}, separators=(",", ":")
    )
    assert connection_line(record, labels, now) == expected
    assert connection_line(record, labels, now) == expected


# ``connection_line`` as main wrote it (0972f4a), a ``%`` template over the same parts: the
# f-string that replaced it must give the same text, byte for byte.
_PERCENT_LINE = (
    '{"time":"%s.%03d+00:00","id":%d,"start_time":"%s.%03d+00:00","duration_ms":%d,'
    '%s%s%s%d,"bytes_received":%d,%s%d}'
)


def _percent_line(record: ConnectionRecord, labels: TcpLabels, now: float) -> str:
    head, middle, tail = accesslog._shape(record, labels)
    time_text, time_ms = accesslog._stamp(now)
    start_text, start_ms = accesslog._stamp(record.started)
    return _PERCENT_LINE % (
        time_text,
        time_ms,
        record.id,
        start_text,
        start_ms,
        max(0, round((now - record.started) * 1000)),
        head,
        accesslog._quote(record.source),
        middle,
        record.bytes_sent,
        record.bytes_received,
        tail,
        record.requests,
    )


# Strings a peer or the state can put in a line: any code point (quotes, backslashes,
# controls, surrogates, non-ASCII), and the JSON-significant ASCII ones often.
_ODD = st.text(alphabet=st.sampled_from('"\\/\b\f\n\r\t\x00\x1f\x7f{}:,%') | st.characters(),
               max_size=40)  # fmt: skip


@settings(max_examples=500)
@given(
    st.lists(
        st.builds(
            ConnectionRecord,
            direction=_ODD,
            source=_ODD,
            destination=_ODD,
            path=_ODD,
            started=TIME,
            bytes_sent=COUNT,
            bytes_received=COUNT,
            id=COUNT,
            upstream=_ODD,
            failure=_ODD,
            policy=_ODD,
            protocol=_ODD,
            requests=COUNT,
        ),
        min_size=1,
        max_size=8,
    ),
    st.builds(TcpLabels, *[_ODD] * len(TcpLabels._fields)),
    TIME,
)
def test_the_connection_line_is_byte_for_byte_main_s_template(
    records: list[ConnectionRecord], labels: TcpLabels, now: float
) -> None:
    """Each record's line, as the writer encodes it, is the bytes main's ``%`` template gave:
    every field in its place, every string escaped as before; several records per label set,
    so that most lines are made from a cached shape, as on a busy node."""
    for record in records:
        line = connection_line(record, labels, now)
        assert line.encode() == _percent_line(record, labels, now).encode()


def test_the_rendered_line_shapes_are_bounded() -> None:
    """A node whose connections carry ever new label sets or destinations (pods come and go)
    keeps at most ``SHAPES_KEPT`` line shapes rendered, and still renders each one right."""
    for n in range(accesslog.SHAPES_KEPT + 10):
        record = ConnectionRecord("outbound", "10.0.0.1:5000", f"10.0.{n % 7}.2:80")
        labels = TcpLabels(*[f"w{n}"] * len(TcpLabels._fields))
        line = json.loads(connection_line(record, labels, 1e9))
        assert line["source_workload"] == f"w{n}"
        assert line["destination_address"] == f"10.0.{n % 7}.2:80"
        assert len(accesslog._shapes) <= accesslog.SHAPES_KEPT


def test_a_line_quotes_only_the_client_address_once_its_shape_is_rendered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Connections of one client pod to one destination differ in their times, id, client
    port, byte and request counts: the rest of the line is rendered once per shape, so each
    further line quotes one string (the client's address; seven on main, with the label
    fields rendered once per label set) and is still exactly ``json.dumps``'s. A change of
    any shape field (here the failure, which changes the response flags too) renders anew."""
    quoted: list[str] = []
    quote = accesslog._quote

    def counting(text: str) -> str:
        quoted.append(text)
        return quote(text)

    monkeypatch.setattr(accesslog, "_quote", counting)
    labels = TcpLabels(*[f"l{i}" for i in range(len(TcpLabels._fields))])
    counts = []
    for port in (5000, 5001, 5002):
        record = ConnectionRecord(
            "inbound", f"10.0.0.1:{port}", "10.0.0.2:80", path="hbone", started=1e9, id=port
        )
        record.bytes_sent, record.bytes_received = port, 2 * port
        quoted.clear()
        line = connection_line(record, labels, 1e9 + 0.5)
        expected = {"time": _iso(1e9 + 0.5), **connection_entry(record, labels, 1e9 + 0.5)}
        assert line == json.dumps(expected, separators=(",", ":"))
        assert quoted[-1] == record.source
        counts.append(len(quoted))
    assert counts[0] > 1 and counts[1:] == [1, 1]
    record.failure = "policy_denied"
    denied = labels._replace(response_flags="DENY")
    quoted.clear()
    line = json.loads(connection_line(record, denied, 1e9 + 0.5))
    assert (line["failure"], line["response_flags"]) == ("policy_denied", "DENY")
    assert len(quoted) > 1


@given(st.floats(min_value=0.0, max_value=4e9, allow_nan=False))
def test_times_are_what_datetime_makes_of_them(ts: float) -> None:
    expected = dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")
    assert _iso(ts) == expected


def test_times_round_microseconds_as_datetime_does() -> None:
    """Half a microsecond below a second, below a millisecond and at them (half to even)."""
    for ts in (1.9999995, 1.9999994999, 1764998399.9999996, 1764998400.0005, 0.0, 59.9995):
        expected = dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")
        assert _iso(ts) == expected


def _denied(policy: str = "", dry_run: str = "") -> RequestRecord:
    return RequestRecord(
        "POST",
        "/admin",
        "web",
        403,
        0.2,
        0,
        19,
        "RBAC",
        "r1",
        policy=policy,
        dry_run_policy=dry_run,
    )


def test_a_refused_request_names_its_policy_and_the_usual_line_has_no_such_field() -> None:
    """Envoy's RBAC filter puts the effective policy in its metadata; the line carries it (and
    the dry-run policies that would have denied) only when set, so most lines stay as short."""
    connection = ConnectionRecord("inbound", "10.0.0.1:5000", "10.0.0.2:80")
    labels = dict.fromkeys(REQUEST_LABEL_NAMES, "x")
    usual = json.loads(request_line(connection, _denied(), labels, 0.0))
    assert "policy" not in usual and "dry_run_policy" not in usual
    denied = json.loads(request_line(connection, _denied("default/no-admin"), labels, 0.0))
    assert (denied["response_flags"], denied["policy"]) == ("RBAC", "default/no-admin")
    assert "dry_run_policy" not in denied
    both = _denied("default/no-admin", "default/try-a,default/try-b")
    line = json.loads(request_line(connection, both, labels, 0.0))
    assert (line["policy"], line["dry_run_policy"]) == (
        "default/no-admin",
        "default/try-a,default/try-b",
    )
    assert list(line)[list(line).index("request_id") + 1 :][:2] == ["policy", "dry_run_policy"]


def test_a_start_in_an_earlier_second_is_formatted_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lines of connections that began seconds ago (the usual long-lived one) format each
    second once, not twice a line (their start's and then the current one again), and still
    give ``datetime``'s text."""
    formatted: list[float] = []
    strftime = time.strftime

    def counting(fmt: str, t: time.struct_time) -> str:
        formatted.append(calendar.timegm(t))
        return strftime(fmt, t)

    monkeypatch.setattr(accesslog.time, "strftime", counting)
    record = ConnectionRecord("outbound", "10.0.0.1:5000", "10.0.0.2:80", started=1_700_000_000.25)
    labels = TcpLabels(*["x"] * len(TcpLabels._fields))
    for i in range(10):
        now = 1_700_000_100.5 + i / 100
        line = json.loads(connection_line(record, labels, now))
        assert line["start_time"] == _iso(record.started) == "2023-11-14T22:13:20.250+00:00"
        assert line["time"] == dt.datetime.fromtimestamp(now, dt.UTC).isoformat(
            timespec="milliseconds"
        )
    assert sorted(formatted) == [1_700_000_000, 1_700_000_100]
