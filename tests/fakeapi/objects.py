"""Objects as the API server would hold them, and a polling wait, for tests of the kube source."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def pod(
    name: str,
    ip: str | None,
    *,
    ns: str = "default",
    node: str = "node1",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    sa: str = "default",
    host_network: bool = False,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running" if ip else "Pending"}
    if ip:
        status.update(podIP=ip, podIPs=[{"ip": ip}])
    spec: dict[str, Any] = {
        "nodeName": node,
        "serviceAccountName": sa,
        "containers": [{"name": "app", "image": "app"}],
    }
    if host_network:
        spec["hostNetwork"] = True
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": labels or {},
            "annotations": annotations or {},
        },
        "spec": spec,
        "status": status,
    }


def service(
    name: str,
    ip: str,
    *,
    ns: str = "default",
    selector: dict[str, str] | None = None,
    target: int | str = 8080,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "clusterIP": ip,
            "clusterIPs": [ip],
            "selector": selector or {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": target, "protocol": "TCP"}],
        },
    }


def endpoint_slice(
    name: str, svc: str, ips: list[str], *, ns: str = "default", ready: bool = True
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}} for ip in ips],
    }


def authz(name: str, action: str = "ALLOW", *, ns: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "nodemesh.io/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"action": action, "rules": [{"to": [{"operation": {"ports": ["8080"]}}]}]},
    }


def wait_for(probe: Callable[[], T], timeout: float = 10.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(0.01)
