"""What the tests of the destination's per-request admission share (``test_h2admission``,
``test_request_admission_cost``): the server pod behind Service ``web``, its callers, and the
reference verdict of a request admitted from nothing."""

from __future__ import annotations

from typing import Any

from agent.policy.authz import Request
from agent.policy.schema import validate_policy
from agent.proxy.core import Core
from agent.proxy.http1 import RequestHead, Verdict
from agent.proxy.http_inbound import authorize
from agent.state import Endpoint, PolicyObject, Service, ServicePort, StateStore
from agent.state.model import Workload
from tests.workloads import workload

SERVER = workload("server", "node1", "10.244.1.3", app="server")
OTHER = workload("other", "node1", "10.244.1.4", app="other")
MTLS = Request("10.244.2.5", "10.244.1.3", 9080, "spiffe://cluster.local/ns/default/sa/client")
PLAIN = Request("10.244.2.5", "10.244.1.3", 9080, None)
# One request a second, a burst of two, on Service ``web`` (the server's port 9080).
RATE_LIMIT = validate_policy({
    "apiVersion": "nodemesh.io/v1alpha1", "kind": "RateLimitPolicy",
    "metadata": {"name": "web-limit", "namespace": "default"},
    "spec": {"targetRef": {"kind": "Service", "name": "web"}, "requestsPerSecond": 1, "burst": 2}},
    path="t")  # fmt: skip


def authz_policy(name: str, spec: dict[str, Any], *, dry_run: bool = False) -> PolicyObject:
    return PolicyObject("AuthorizationPolicy", "default", name, spec, dry_run=dry_run)


def admission_core(store: StateStore) -> Core:
    core = Core(node="node1", store=store, identities=None)  # type: ignore[arg-type]
    core.clock = lambda: 100.0  # the buckets refill at no instant of these tests
    return core


def admission_store(policies: list[PolicyObject], protocol: str = "http") -> StateStore:
    """SERVER and OTHER, Service ``web`` (port 80 → 9080, ``protocol``) on SERVER, and
    ``policies``."""
    store = StateStore()
    with store.update() as tx:
        tx.put_workload(SERVER)
        tx.put_workload(OTHER)
        port = ServicePort(80, 9080, name=protocol, app_protocol=protocol)
        tx.put_service(Service("web", "default", ("10.96.0.11",), (port,), {"app": "server"},
                               (Endpoint("10.244.1.3"),)))  # fmt: skip
        for p in policies:
            tx.put_policy(p)
    return store


def request_verdict(
    core: Core, connection: Request, workload: Workload, head: RequestHead, where: str
) -> Verdict:
    """The reference: one request admitted from nothing (``http_inbound.authorize`` with the
    core's policies and rate limits looked up for it alone), as every request was before
    ``RequestAdmission`` kept what does not depend on the request."""
    snap = core.snapshot()
    return authorize(core, connection, workload, head, where, core.policies(snap), snap, True)
