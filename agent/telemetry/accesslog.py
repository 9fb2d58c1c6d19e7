"""The access log: one JSON line per connection at close (and per HTTP request on declared
HTTP ports), and the same fields for live connections.

Why JSON on a logger of its own (``nodemesh.access``): log pipelines parse it without a grammar,
an operator can silence or redirect it like any logger (``POST /logging?logger=nodemesh.access``),
and the admin API's ``/connections`` shows live connections with exactly these field names, so a
line and a row can be compared. Field names are stable (ARCHITECTURE.md, "Access log").
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Mapping

from agent.telemetry.labels import TcpLabels
from agent.telemetry.records import ConnectionRecord, RequestRecord

ACCESS_LOGGER = "nodemesh.access"
access_log = logging.getLogger(ACCESS_LOGGER)


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


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
    }


def write_access_log(record: ConnectionRecord, labels: TcpLabels) -> None:
    """Log the finished connection at INFO (a denied or failed one too: ``failure`` says why)."""
    if access_log.isEnabledFor(logging.INFO):
        now = time.time()
        entry = {"time": _iso(now), **connection_entry(record, labels, now)}
        access_log.info("%s", json.dumps(entry, separators=(",", ":")))


def write_request_log(
    connection: ConnectionRecord, request: RequestRecord, labels: Mapping[str, str]
) -> None:
    """Log one HTTP request at INFO: the connection it came on (``connection_id``), the request
    and the labels its metrics carry."""
    if access_log.isEnabledFor(logging.INFO):
        entry = {
            "time": _iso(time.time()),
            "connection_id": connection.id,
            "direction": connection.direction,
            "source_address": connection.source,
            "destination_address": connection.destination,
            "method": request.method,
            "path": request.path,
            "authority": request.authority,
            "response_code": request.status,
            "duration_ms": round(request.duration_ms, 3),
            "request_bytes": request.request_bytes,
            "response_bytes": request.response_bytes,
            "response_flags": request.response_flags,
            "request_id": request.request_id,
            "source_workload": labels["source_workload"],
            "source_identity": labels["source_principal"],
            "destination_workload": labels["destination_workload"],
            "destination_service": labels["destination_service"],
        }
        access_log.info("%s", json.dumps(entry, separators=(",", ":")))
