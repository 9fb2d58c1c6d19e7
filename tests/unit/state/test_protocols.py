"""Which ports are HTTP: appProtocol, port-name prefix or pod annotation, never sniffed."""

from __future__ import annotations

from typing import Any

import pytest

from agent.sources import kubeobjects as ko
from agent.sources.document import DocumentError, dump_document, parse_document
from agent.state import Endpoint, Service, ServicePort, StateStore, Workload
from agent.state.protocols import GRPC, HTTP, HTTP2, TCP, declared_pod_ports, declared_protocol
from tests.fakeapi.objects import pod, service


@pytest.mark.parametrize(
    ("app_protocol", "name", "expected"),
    [
        ("http", "", HTTP),
        ("HTTP", "", HTTP),
        ("http2", "", HTTP2),
        ("kubernetes.io/h2c", "", HTTP2),
        ("grpc", "tcp-x", GRPC),
        ("mysql", "http-web", TCP),  # appProtocol wins over the name, unknown means TCP
        ("", "http", HTTP),
        ("", "http-web", HTTP),
        ("", "http2-api", HTTP2),
        ("", "grpc-api", GRPC),
        ("", "httpx", TCP),
        ("", "web-http", TCP),
        ("", "", TCP),
    ],
)
def test_declared_protocol(app_protocol: str, name: str, expected: str) -> None:
    assert declared_protocol(app_protocol, name) == expected


def test_declared_pod_ports_from_services_and_annotation() -> None:
    store = StateStore()
    with store.update() as tx:
        tx.put_workload(
            Workload("u1", "a", "default", "sa", "n1", ("10.0.0.1",), http_ports=frozenset({9000}))
        )
        tx.put_service(
            Service(
                "s",
                "default",
                ("10.96.0.1",),
                ports=(
                    ServicePort(80, 8080, name="web", app_protocol="http"),
                    ServicePort(81, 0, name="grpc-api"),
                    ServicePort(82, 8082, name="db"),
                ),
                endpoints=(
                    Endpoint("10.0.0.1", "u1", ports={"grpc-api": 7070}),
                    Endpoint("10.0.0.2", None),
                ),
            )
        )
    ports = declared_pod_ports(store.snapshot())
    assert dict(ports) == {
        ("10.0.0.1", 9000): HTTP,
        ("10.0.0.1", 8080): HTTP,
        ("10.0.0.2", 8080): HTTP,
        ("10.0.0.1", 7070): GRPC,
    }


def _uid(obj: dict[str, Any]) -> dict[str, Any]:
    obj["metadata"]["uid"] = "u1"
    return obj


def test_kube_objects_keep_app_protocol_and_http_ports_annotation() -> None:
    svc = service("s", "10.96.0.1")
    svc["spec"]["ports"][0]["appProtocol"] = "kubernetes.io/h2c"
    port = ko.service_of(svc).ports[0]
    assert (port.name, port.app_protocol) == ("http", "kubernetes.io/h2c")
    w = ko.workload_of(
        _uid(pod("a", "10.0.0.1", annotations={"nodemesh.io/http-ports": "80,8080"}))
    )
    assert w is not None and w.http_ports == {80, 8080}
    with pytest.raises(ko.InvalidObject, match=r"nodemesh\.io/http-ports"):
        ko.workload_of(_uid(pod("b", "10.0.0.2", annotations={"nodemesh.io/http-ports": "web"})))


DOC = """
nodes:
  - name: n1
    pods:
      - {name: a, namespace: default, labels: {app: a},
         annotations: {nodemesh.io/http-ports: "9000"}}
services:
  - {name: a, namespace: default, selector: {app: a},
     ports: [{port: 80, targetPort: 8080, appProtocol: http}, {port: 81, name: grpc-api}]}
"""


def test_document_accepts_declarations_and_round_trips() -> None:
    doc = parse_document(DOC, source="t.yaml")
    assert parse_document(dump_document(doc), source="again") == doc
    state = doc.to_state()
    (svc,) = state.services
    assert [(p.name, p.app_protocol) for p in svc.ports] == [("", "http"), ("grpc-api", "")]
    (w,) = state.workloads
    assert w.http_ports == {9000}


def test_document_refuses_a_bad_http_ports_annotation() -> None:
    bad = DOC.replace('"9000"', '"nine"')
    with pytest.raises(DocumentError, match=r"annotations\.nodemesh\.io/http-ports"):
        parse_document(bad, source="t.yaml")
