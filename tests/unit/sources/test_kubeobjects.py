"""Raw Kubernetes objects to state objects: the membership and validity rules, without I/O."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agent.sources import kubeobjects as ko
from agent.sources.reflector import Backoff, _lines
from tests.fakeapi.objects import authz, endpoint_slice, pod, service


def _uid(obj: dict[str, Any]) -> dict[str, Any]:
    obj["metadata"]["uid"] = "u1"
    return obj


def test_pod_fields_kept() -> None:
    w = ko.workload_of(
        _uid(
            pod(
                "a",
                "10.0.0.1",
                labels={"app": "a"},
                sa="client",
                annotations={
                    "nodemesh.io/mesh": "enabled",
                    "nodemesh.io/exclude-outbound-ports": "5432, 6379",
                    "unrelated": "x",
                },
            )
        )
    )
    assert w is not None
    assert (w.uid, w.name, w.namespace, w.node, w.ips) == (
        "u1",
        "a",
        "default",
        "node1",
        ("10.0.0.1",),
    )
    assert w.identity() == "spiffe://cluster.local/ns/default/sa/client"
    assert w.mesh_annotation == "enabled" and dict(w.labels) == {"app": "a"}
    assert w.exclude_outbound_ports == {5432, 6379} and not w.exclude_inbound_ports


def test_pending_finished_and_host_network_pods() -> None:
    pending = ko.workload_of(_uid(pod("p", None)))
    assert pending is not None and pending.ips == ()
    finished = _uid(pod("f", "10.0.0.2"))
    finished["status"]["phase"] = "Failed"
    assert ko.workload_of(finished) is None
    assert ko.workload_of(_uid(pod("h", "10.0.0.3", host_network=True))) is None


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("nodemesh.io/mesh", "on", "use enabled or disabled"),
        ("nodemesh.io/exclude-inbound-ports", "80,http", "'http' is not a port"),
    ],
)
def test_bad_annotations_are_invalid(key: str, value: str, reason: str) -> None:
    with pytest.raises(ko.InvalidObject) as info:
        ko.workload_of(_uid(pod("a", "10.0.0.1", annotations={key: value})))
    assert info.value.reason == "InvalidAnnotation"
    assert key in info.value.message and reason in info.value.message


def test_service_and_slices() -> None:
    headless = service("h", "None")
    assert ko.service_of(headless).cluster_ips == ()
    named = ko.service_of(service("s", "10.96.0.1", target="http"))
    assert named.ports[0].target_port == 0 and named.ports[0].name == "http"
    eps = ko.slice_endpoints(endpoint_slice("s-1", "s", ["10.0.0.1"], ready=False))
    assert [(e.ip, e.ready, dict(e.ports)) for e in eps] == [("10.0.0.1", False, {"http": 8080})]
    assert ko.slice_service(endpoint_slice("s-1", "s", [])) == ("default", "s")


def test_policy_validation_names_the_object() -> None:
    bad = authz("p")
    bad["spec"]["action"] = "NOPE"
    assert ko.policy_of(authz("p")).spec["action"] == "ALLOW"
    with pytest.raises(ko.InvalidObject, match=r"AuthorizationPolicy default/p\.spec\.action"):
        ko.policy_of(bad)


class _Chunks:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def stream(self, amt: int | None = None, decode_content: bool | None = None) -> Iterator[bytes]:
        return iter(self.chunks)


def test_watch_lines_split_across_chunks() -> None:
    chunks = [b'{"type": "ADD', b'ED", "object": {}}\n{"type"', b': "BOOKMARK", "object": {}}\n']
    assert [e["type"] for e in _lines(_Chunks(chunks))] == ["ADDED", "BOOKMARK"]  # type: ignore[arg-type]


def test_backoff_grows_is_capped_and_resets() -> None:
    b = Backoff(base=0.5, cap=4.0)
    delays = [b.next_delay() for _ in range(10)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert b.failures == 10
    b.reset()
    assert b.next_delay() <= 0.5
