"""The access log: one JSON line per connection at close (and per HTTP request on declared
HTTP ports), and the same fields for live connections and recent requests.

Why JSON on a logger of its own (``nodemesh.access``): log pipelines parse it without a grammar,
an operator can silence or redirect it like any logger (``POST /logging?logger=nodemesh.access``),
and the admin API's ``/connections`` shows live connections with exactly these field names, so a
line and a row can be compared; ``/requests`` (``nodemesh requests``) shows recent requests with
the fields of their lines. Field names are stable (ARCHITECTURE.md, "Access log").

Request lines can be sampled (``RequestSampler``, ``--access-log-sample``), connection lines
never: a connection line is one per connection, a request line one per request, and a busy
HTTP service writes thousands a second.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

from agent.telemetry.labels import TcpLabels
from agent.telemetry.logwriter import AccessLogWriter
from agent.telemetry.records import ConnectionRecord, RequestRecord

ACCESS_LOGGER = "nodemesh.access"
access_log = logging.getLogger(ACCESS_LOGGER)
# Writes the lines as logging would, batched (a few ms), while the configuration is the
# one logging.basicConfig makes (agent.telemetry.logwriter); else they go through logging.
_writer = AccessLogWriter(access_log, logging.getLogger())
atexit.register(_writer.close)


class _Seconds:
    """Seconds ``_stamp`` formatted, with their text: the newest (``last``, one tuple: read and
    replaced whole) and, by second, the others of late (``earlier``). Why both: a connection
    line has two times, its close (the current second) and its start, which for any
    connection that crossed a second boundary is an earlier one; with the newest alone kept,
    every such line formatted both seconds anew, and so did the lines after it."""

    __slots__ = ("earlier", "last")

    def __init__(self) -> None:
        self.last: tuple[int, str] = (-1, "")
        self.earlier: dict[int, str] = {}

    def text(self, second: int) -> str:
        last = self.last
        if last[0] == second:
            return last[1]
        text = self.earlier.get(second)
        if text is None:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            if len(self.earlier) >= SECONDS_KEPT:
                self.earlier.clear()
            self.earlier[second] = text
        if second > last[0]:
            self.last = (second, text)
        return text


SECONDS_KEPT = 4096  # formatted seconds kept besides the newest (about an hour of starts)
_SECONDS = _Seconds()  # a busy node writes many lines a second


def _iso(ts: float) -> str:
    """``datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")`` (a test holds
    them equal), at a quarter of its cost (``_stamp``)."""
    text, millis = _stamp(ts)
    return f"{text}.{millis:03d}+00:00"


def _stamp(ts: float) -> tuple[str, int]:
    """``_iso(ts)``'s parts: the date and time of day to the second, and the milliseconds. The
    microseconds are rounded half to even as ``fromtimestamp`` rounds them, the date and time
    of day formatted once per second. The lines' templates take the parts as they are
    (``"%s.%03d+00:00"``): the text is digits and ``-:T``, which JSON never escapes, so it
    needs no quoting, and a line's two times skip building and quoting two strings."""
    frac, whole = _modf(ts)
    micros, second = round(frac * 1e6), int(whole)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    last = _SECONDS.last
    if last[0] != second:
        return _SECONDS.text(second), micros // 1000
    return last[1], micros // 1000


_modf = math.modf


def connection_entry(record: ConnectionRecord, labels: TcpLabels, now: float) -> dict[str, object]:
    """The documented fields of one connection (live or finished); never key material."""
    return {
        "id": record.id,
        "start_time": _iso(record.started),
        "duration_ms": max(0, round((now - record.started) * 1000)),
        "direction": record.direction,
        "path": record.path,
        "source_address": record.source,
        "destination_address": record.destination,
        "upstream_address": record.upstream or record.destination,
        "source_workload": labels.source_workload,
        "source_namespace": labels.source_workload_namespace,
        "source_identity": labels.source_principal,
        "destination_service": labels.destination_service,
        "destination_workload": labels.destination_workload,
        "destination_namespace": labels.destination_workload_namespace,
        "destination_identity": labels.destination_principal,
        "security": labels.connection_security_policy,
        "bytes_sent": record.bytes_sent,
        "bytes_received": record.bytes_received,
        "response_flags": labels.response_flags,
        "failure": record.failure or None,
        "policy": record.policy or None,
        "protocol": record.protocol,
        "requests": record.requests,
    }


def write_access_log(record: ConnectionRecord, labels: TcpLabels) -> None:
    """Log the finished connection at INFO (a denied or failed one too: ``failure`` says why)."""
    if access_log.isEnabledFor(logging.INFO):
        now = time.time()
        line = connection_line(record, labels, now)
        if not _writer.write(line, now):
            access_log.info("%s", line)


# A connection line: ``{"time": ..., **connection_entry(...)}`` as one compact JSON object,
# written directly as the request lines are (a test holds it equal to ``json.dumps``), since
# every connection writes one (two when it crosses nodes): building the entry's dictionary and
# encoding it cost about 5.6 us a line, this about 2 us. Of its fields, only the times, the id,
# the client's address, the byte counts and the request count differ between the connections
# of one client pod to one destination; the rest (direction, path, destination and upstream
# addresses, the eight made of the labels, response flags, failure, policy, protocol) is its
# *shape*, rendered once (``_shape``) into the three runs of text between those fields: a line
# quotes one string (the client's address), not seven, and formats 13 values, not 19. The line
# is an f-string (``connection_line``), its milliseconds from a table (``_MILLIS``): the text
# the ``%`` template it replaced gave (a test holds the two equal byte for byte), about 3.5k
# instructions fewer a line (docs/performance/connection-cost.md, session 19).
_SHAPE_HEAD = '"direction":%s,"path":%s,"source_address":'
_SHAPE_MIDDLE = (
    ',"destination_address":%s,"upstream_address":%s,'
    '"source_workload":%s,"source_namespace":%s,"source_identity":%s,'
    '"destination_service":%s,"destination_workload":%s,"destination_namespace":%s,'
    '"destination_identity":%s,"security":%s,"bytes_sent":'
)
_SHAPE_TAIL = '"response_flags":%s,"failure":%s,"policy":%s,"protocol":%s,"requests":'
SHAPES_KEPT = 1024  # line shapes rendered (``_shape``; about 1 KB each); beyond, it starts over
# What a shape is made of: the record's direction, path, destination, upstream, failure, policy
# and protocol, and the labels (response flags included).
_ShapeKey = tuple[str, str, str, str, str, str, str, TcpLabels]
_shapes: dict[_ShapeKey, tuple[str, str, str]] = {}


def _shape(record: ConnectionRecord, labels: TcpLabels) -> tuple[str, str, str]:
    """The rendered text of ``record``'s line before the client's address, between it and
    ``bytes_sent``'s value, and between ``bytes_received``'s and ``requests``' values."""
    failure, policy = record.failure, record.policy
    key = (
        record.direction,
        record.path,
        record.destination,
        record.upstream,
        failure,
        policy,
        record.protocol,
        labels,
    )
    shape = _shapes.get(key)
    if shape is None:
        q = _quote
        shape = (
            _SHAPE_HEAD % (q(record.direction), q(record.path)),
            _SHAPE_MIDDLE
            % (
                q(record.destination),
                q(record.upstream or record.destination),
                q(labels.source_workload),
                q(labels.source_workload_namespace),
                q(labels.source_principal),
                q(labels.destination_service),
                q(labels.destination_workload),
                q(labels.destination_workload_namespace),
                q(labels.destination_principal),
                q(labels.connection_security_policy),
            ),
            _SHAPE_TAIL
            % (
                q(labels.response_flags),
                q(failure) if failure else "null",
                q(policy) if policy else "null",
                q(record.protocol),
            ),
        )
        if len(_shapes) >= SHAPES_KEPT:
            _shapes.clear()
        _shapes[key] = shape
    return shape


def connection_line(record: ConnectionRecord, labels: TcpLabels, now: float) -> str:
    """The access log line of ``record`` closed at ``now``: ``json.dumps`` (compact) of
    ``{"time": _iso(now), **connection_entry(record, labels, now)}``."""
    head, middle, tail = _shape(record, labels)
    time_text, time_ms = _stamp(now)
    start_text, start_ms = _stamp(record.started)
    return (
        f'{{"time":"{time_text}.{_MILLIS[time_ms]}+00:00","id":{record.id},'
        f'"start_time":"{start_text}.{_MILLIS[start_ms]}+00:00",'
        f'"duration_ms":{max(0, round((now - record.started) * 1000))},'
        f"{head}{_quote(record.source)}{middle}{record.bytes_sent},"
        f'"bytes_received":{record.bytes_received},{tail}{record.requests}}}'
    )


_MILLIS = tuple(f"{ms:03d}" for ms in range(1000))  # ``"%03d" % ms``, for ``connection_line``


def request_entry(
    connection: ConnectionRecord, request: RequestRecord, labels: Mapping[str, str], ended: float
) -> dict[str, object]:
    """The documented fields of one finished HTTP request: the request, the pod address it
    went to (``upstream_address``), and the connection it came on with its identities;
    ``labels`` are its metric labels (``agent.telemetry.http.REQUEST_LABEL_NAMES``);
    ``policy`` (what refused it) and ``dry_run_policy`` (the dry-run policies that would have)
    only when set, so that the usual line stays short."""
    entry: dict[str, object] = {
        "time": _iso(ended),
        "connection_id": connection.id,
        "direction": connection.direction,
        "source_address": connection.source,
        "destination_address": connection.destination,
        "upstream_address": request.upstream or connection.upstream or connection.destination,
        "method": request.method,
        "path": request.path,
        "authority": request.authority,
        "response_code": request.status,
        "grpc_status": request.grpc_status,
        "duration_ms": round(request.duration_ms, 3),
        "request_bytes": request.request_bytes,
        "response_bytes": request.response_bytes,
        "response_flags": request.response_flags,
        "request_id": request.request_id,
    }
    if request.policy:
        entry["policy"] = request.policy
    if request.dry_run_policy:
        entry["dry_run_policy"] = request.dry_run_policy
    entry.update({
        "source_workload": labels["source_workload"],
        "source_namespace": labels["source_workload_namespace"],
        "source_identity": labels["source_principal"],
        "destination_service": labels["destination_service"],
        "destination_workload": labels["destination_workload"],
        "destination_namespace": labels["destination_workload_namespace"],
        "destination_identity": labels["destination_principal"],
        "security": labels["connection_security_policy"],
    })  # fmt: skip
    return entry


# ``request_entry`` as one compact JSON object, written directly: what ``json.dumps(entry,
# separators=(",", ":"))`` gives (a test holds them equal, against the earlier per-request
# rendering too), at less than half its cost, since this runs once per request at each end.
# Strings are escaped by json's own ASCII encoder, floats written as ``repr`` (as json does),
# integers as ``%d``. Of a line's fields only the times, the connection id, the method, path,
# authority, duration, byte counts and request id differ between the requests of one label
# set on one connection; the rest (direction, the three addresses, the response code, gRPC
# status and flags, the eight made of the metric labels) is the request's *shape*
# (``RequestShape``), which the caller renders once per label set and connection
# (``agent.telemetry.http``'s series): a line quotes four strings, not eleven.
_REQUEST_LINE = (
    '{"time":"%s.%03d+00:00","connection_id":%d,%s"method":%s,"path":%s,"authority":%s,%s'
    '"duration_ms":%r,"request_bytes":%d,"response_bytes":%d,%s"request_id":%s,'
)
_SHAPE_ENDS = '"direction":%s,"source_address":%s,"destination_address":%s,"upstream_address":%s,'
_SHAPE_ANSWER = '"response_code":%d,"grpc_status":%s,'
_SHAPE_FLAGS = '"response_flags":%s,'
_LABELS_TAIL = (
    '"source_workload":%s,"source_namespace":%s,"source_identity":%s,'
    '"destination_service":%s,"destination_workload":%s,"destination_namespace":%s,'
    '"destination_identity":%s,"security":%s}'
)
_quote = json.encoder.encode_basestring_ascii


class RequestShape(NamedTuple):
    """The rendered runs of a request line that are the same for every request of one label
    set on one connection (``request_shape``); ``_REQUEST_LINE`` puts the request's own values
    between them."""

    ends: str  # direction, source, destination and upstream addresses
    answer: str  # response code and gRPC status
    flags: str  # response flags
    tail: str  # the fields made of the metric labels (``labels_tail``)


def labels_tail(labels: Mapping[str, str]) -> str:
    """The end of a request line: the fields made of the request's metric labels, rendered."""
    q = _quote
    return _LABELS_TAIL % (
        q(labels["source_workload"]),
        q(labels["source_workload_namespace"]),
        q(labels["source_principal"]),
        q(labels["destination_service"]),
        q(labels["destination_workload"]),
        q(labels["destination_workload_namespace"]),
        q(labels["destination_principal"]),
        q(labels["connection_security_policy"]),
    )


def request_shape(connection: ConnectionRecord, request: RequestRecord, tail: str) -> RequestShape:
    """The constant runs of the lines of requests like ``request`` on ``connection``: made of
    the connection's direction and addresses, the request's upstream, status, gRPC status and
    flags, and ``tail`` (``labels_tail`` of their metric labels). The caller keys it by all of
    those (``HttpMetrics._series_of``)."""
    q = _quote
    return RequestShape(
        _SHAPE_ENDS
        % (
            q(connection.direction),
            q(connection.source),
            q(connection.destination),
            q(request.upstream or connection.upstream or connection.destination),
        ),
        _SHAPE_ANSWER % (request.status, q(request.grpc_status)),
        _SHAPE_FLAGS % q(request.response_flags),
        tail,
    )


def request_line(
    connection: ConnectionRecord, request: RequestRecord, labels: Mapping[str, str], ended: float
) -> str:
    """``request_entry``'s fields as the access log's JSON line."""
    shape = request_shape(connection, request, labels_tail(labels))
    return shaped_request_line(connection, request, shape, ended)


def shaped_request_line(
    connection: ConnectionRecord, request: RequestRecord, shape: RequestShape, ended: float
) -> str:
    """``request_line`` with its constant runs already rendered (``request_shape`` of this
    request, connection and labels)."""
    q = _quote
    time_text, time_ms = _stamp(ended)
    head = _REQUEST_LINE % (
        time_text,
        time_ms,
        connection.id,
        shape.ends,
        q(request.method),
        q(request.path),
        q(request.authority),
        shape.answer,
        round(request.duration_ms, 3),
        request.request_bytes,
        request.response_bytes,
        shape.flags,
        q(request.request_id),
    )
    if request.policy or request.dry_run_policy:  # a refusal or a dry-run's would-deny
        return head + _why(request) + shape.tail
    return head + shape.tail


def _why(request: RequestRecord) -> str:
    """The ``policy`` and ``dry_run_policy`` fields of a line, each when set."""
    out = ""
    if request.policy:
        out += f'"policy":{_quote(request.policy)},'
    if request.dry_run_policy:
        out += f'"dry_run_policy":{_quote(request.dry_run_policy)},'
    return out


class SampleRateError(ValueError):
    """An access log sample rate outside 0..1."""


def check_sample_rate(rate: float) -> float:
    """``rate`` if it is a fraction of requests to log (0 to 1), else ``SampleRateError``."""
    if math.isnan(rate) or not 0.0 <= rate <= 1.0:
        raise SampleRateError(
            f"--access-log-sample {rate}: expected a fraction of requests to log between 0 "
            "and 1 (1 logs every request, 0.1 one in ten, 0 only errors and denials)"
        )
    return rate


class RequestSampler:
    """Which HTTP requests get an access log line.

    A request answered 5xx, denied by policy (``RBAC``), ended by a failure (any other
    response flag: ``UC``, ``DC``) or that a dry-run policy would have denied is always
    logged: those are the lines an operator searches the log for after an incident (or while
    trying a policy out), they are few when the service is healthy, and a sampled log that
    lost the one failing request answers nothing. Every other request is logged with
    probability ``rate`` (independently per request, like Envoy's runtime fraction filter), so
    the volume of a busy service's log drops by ``rate`` while the failures stay complete.
    """

    def __init__(self, rate: float = 1.0, draw: Callable[[], float] = random.random) -> None:
        self.rate = check_sample_rate(rate)
        self._draw = draw

    def keep(self, request: RequestRecord) -> bool:
        if request.status >= 500 or request.response_flags != "-" or request.dry_run_policy:
            return True
        if self.rate >= 1.0:
            return True
        return self.rate > 0.0 and self._draw() < self.rate


def write_request_log(
    connection: ConnectionRecord, request: RequestRecord, shape: RequestShape, now: float
) -> None:
    """Log one HTTP request at INFO (``request_entry``'s fields), ended at ``now``; ``shape``
    is ``request_shape`` of it (rendered once per label set and connection by the caller).

    The line is ``shaped_request_line`` (what ``json.dumps`` gives of ``request_entry``,
    written directly). It goes to ``_writer`` (``agent.telemetry.logwriter``: no ``LogRecord``,
    the lines of a few ms in one write) when the logging configuration is the agent's; otherwise
    the record is handed to the logger without ``Logger.info``'s search of the stack for its
    caller (the record names this function): one line per request is the hot path of a busy
    node."""
    if access_log.isEnabledFor(logging.INFO):
        line = shaped_request_line(connection, request, shape, now)
        if _writer.write(line, now):
            return
        access_log.handle(
            access_log.makeRecord(
                ACCESS_LOGGER,
                logging.INFO,
                __file__,
                _REQUEST_LOG_LINE,
                "%s",
                (line,),
                None,
                _REQUEST_LOG_FUNC,
            )
        )


_REQUEST_LOG_FUNC = write_request_log.__name__
_REQUEST_LOG_LINE = write_request_log.__code__.co_firstlineno
