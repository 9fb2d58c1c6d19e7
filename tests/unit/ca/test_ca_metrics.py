"""The CA's own metrics: one outcome per request, INTERNAL for an unexpected end, expiries read
from the authority in use at scrape time."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from agent.ca.metrics import CaMetrics
from agent.ca.storage import load_or_create_dir


def sample(metrics: CaMetrics, series: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    raise AssertionError(f"{series} is not exported")


def test_each_request_counts_once_and_an_unexpected_end_counts_as_internal(
    tmp_path: Path,
) -> None:
    authority = load_or_create_dir(tmp_path, "cluster.local")
    metrics = CaMetrics(lambda: authority, "cluster.local")
    with metrics.deciding() as report:
        report(grpc.StatusCode.PERMISSION_DENIED)
        report(None)  # only the first report of a request counts
    with metrics.deciding() as report:
        report(None)
    with pytest.raises(RuntimeError), metrics.deciding():
        raise RuntimeError("a bug in the issuer")
    requests = "nodemesh_ca_server_requests_total"
    assert sample(metrics, f'{requests}{{outcome="PERMISSION_DENIED"}}') == 1
    assert sample(metrics, f'{requests}{{outcome="ok"}}') == 1
    assert sample(metrics, f'{requests}{{outcome="INTERNAL"}}') == 1
    assert sample(metrics, "nodemesh_ca_server_decision_seconds_count") == 3


def test_expiries_follow_the_authority_in_use(tmp_path: Path) -> None:
    first = load_or_create_dir(tmp_path / "a", "cluster.local")
    second = load_or_create_dir(tmp_path / "b", "cluster.local")
    current = [first]
    metrics = CaMetrics(lambda: current[0], "cluster.local")
    for authority in (first, second):
        current[0] = authority
        root = authority.roots[0]
        serial = format(root.serial_number, "x")
        expiry = f'nodemesh_ca_server_root_expiry_timestamp_seconds{{serial="{serial}"}}'
        assert sample(metrics, expiry) == root.not_valid_after_utc.timestamp()
        signing = "nodemesh_ca_server_signing_expiry_timestamp_seconds"
        assert sample(metrics, signing) == authority.signing_cert.not_valid_after_utc.timestamp()
    assert sample(metrics, 'nodemesh_ca_server_info{trust_domain="cluster.local"}') == 1
