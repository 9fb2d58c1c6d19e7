"""vagrant/admin_check.py reads the admin API's documents as the agent writes them.

The connection documents are built by the agent's own ``connection_entry`` (the function behind
``/connections``), so a renamed field breaks this test rather than the smoke run on a cluster.
"""

from __future__ import annotations

import importlib.util
import time
from types import ModuleType

from agent.state import StateStore
from agent.telemetry.accesslog import connection_entry
from agent.telemetry.labels import tcp_labels
from agent.telemetry.records import INBOUND, SECURITY_MTLS, SECURITY_NONE, ConnectionRecord
from tests.unit.deploy.manifests import REPO

CLIENT = "spiffe://cluster.local/ns/nodemesh-demo/sa/client"
SERVER = "spiffe://cluster.local/ns/nodemesh-demo/sa/server"


def admin_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("admin_check", REPO / "vagrant/admin_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def connections(security: str) -> dict[str, object]:
    record = ConnectionRecord(
        direction=INBOUND,
        source="10.244.1.2:40000",
        destination="10.244.2.3:8080",
        source_identity=CLIENT,
        destination_identity=SERVER,
        security=security,
    )
    labels = tcp_labels(record, StateStore().snapshot(), {})
    return {"connections": [connection_entry(record, labels, time.time())]}


def test_mtls_check_accepts_only_a_mutual_tls_connection() -> None:
    check = admin_check()
    assert check.mtls_problem(connections(SECURITY_MTLS), CLIENT, SERVER) is None
    assert "not mutual TLS" in check.mtls_problem(connections(SECURITY_NONE), CLIENT, SERVER)
    assert "no live connection" in check.mtls_problem(connections(SECURITY_MTLS), SERVER, CLIENT)


def test_cert_check_wants_an_available_certificate() -> None:
    check = admin_check()
    entry = {"identity": SERVER, "state": "Available", "last_error": None}
    assert check.cert_problem({"certificates": [entry]}, SERVER) is None
    failing = {**entry, "state": "Unavailable", "last_error": "CA unreachable"}
    assert "CA unreachable" in check.cert_problem({"certificates": [failing]}, SERVER)
    assert "no certificate" in check.cert_problem({"certificates": []}, SERVER)
