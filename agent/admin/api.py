"""The admin API on 127.0.0.1:15000: what this agent knows and does, as JSON.

Read endpoints (GET) show the state (workloads, services, policies), certificates (public
facts and chains, never keys), live connections and recent HTTP requests (the access log's
fields; ``/requests`` long-polls, ``agent.admin.tap``), the datapath's
attachments and BPF counters, and the effective configuration. Two POSTs change the agent:
``/logging`` (log levels at run time) and ``/quitquitquit`` (the same graceful drain as
SIGTERM). Every shape is documented in ARCHITECTURE.md ("Admin API") with stable field names.

Why loopback only: the API shows identities and topology and can stop the agent; it is
reachable from the node (``nodemesh status``, ``kubectl exec``/port-forward) but never from a
pod. ``agent.config`` refuses any other address.
"""

from __future__ import annotations

import datetime as dt
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from agent import __version__
from agent.admin import views
from agent.admin.tap import requests_view
from agent.base.http import Request, Response
from agent.policy.routes.model import RouteKey
from agent.state import Snapshot, StateStore
from agent.telemetry.loglevel import LogLevelError, levels, set_level
from agent.telemetry.tap import RequestRing

Rows = list[dict[str, object]]
Routed = Mapping[tuple[RouteKey, int, str], int]

ENDPOINTS = {
    "/": "this index",
    "/status": "node, version, readiness, degraded conditions, what the state source applied "
    "(per resource), certificates, counts, datapath mode",
    "/config_dump": "everything below in one document, plus the effective configuration",
    "/workloads": "workloads in the state (?local=1: this node's only)",
    "/services": "services with their endpoints",
    "/policies": "nodemesh.io objects (AuthorizationPolicy, PeerAuthentication, TrafficPolicy, "
    "RateLimitPolicy, HTTPFault)",
    "/certs": "certificates of local identities: state, serial, validity, chain (no keys)",
    "/connections": "live connections with the access log's fields",
    "/workers": "worker processes (--workers N): PID, up, restarts, accepted connections",
    "/requests": "recent HTTP requests (?since=CURSOR&wait=S long-polls; filters: workload, "
    "source, destination, service, method, path, status, grpc_status)",
    "/datapath": "BPF programs' generation, attachments, listeners and counters",
    "/traffic": "TrafficPolicy conditions, effective policy per Service, endpoint health",
    "/routes": "Gateway API routes: conditions per parent, rules, requests sent per backend",
    "/logging": "GET: log levels; POST ?level=debug[&logger=agent.proxy]: change one",
    "/quitquitquit": "POST: drain gracefully and exit (like SIGTERM)",
}


_NO_TAP = RequestRing(1)  # an agent without a proxy has no requests to show


def _empty() -> Rows:
    return []


@dataclass
class AdminSources:
    """What the API reads; callables so that every answer is current."""

    node: str
    store: StateStore
    config: Mapping[str, object]
    not_ready: Callable[[], list[str]]
    drain: Callable[[], None]
    degraded: Callable[[], list[str]] = list
    connections: Callable[[], Rows | Awaitable[Rows]] = _empty
    certificates: Callable[[], Rows] | None = None
    datapath: Callable[[], Awaitable[dict[str, object]]] | None = None
    state_source: Callable[[], dict[str, object]] | None = None
    traffic: Callable[[], dict[str, object] | Awaitable[dict[str, object]]] | None = None
    # requests this node routed per (route, rule, backend Service): HttpRouter.routed
    routed: Callable[[], Routed | Awaitable[Routed]] = dict
    tap: RequestRing | None = None
    # --workers N: the tap over every worker's ring, and the workers' own view (agent.workers)
    requests: Callable[[Mapping[str, str]], Awaitable[Response]] | None = None
    workers: Callable[[], Awaitable[Rows]] | None = None
    set_worker_level: Callable[[str, str], Awaitable[None]] | None = None
    started: float = field(default_factory=time.time)


def _utc(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def certificates_summary(certs: Rows) -> dict[str, object]:
    """``/status``'s ``certificates``: how many identities, how many hold a usable certificate,
    and the soonest expiry among those held (what ``nodemesh proxy-status`` shows)."""
    expiries = sorted(
        str(cert["not_after"])
        for row in certs
        if isinstance(cert := row.get("certificate"), Mapping) and cert.get("not_after")
    )
    return {
        "identities": len(certs),
        "available": sum(1 for c in certs if c.get("state") == "Available"),
        "soonest_expiry": _soonest(expiries),
    }


def _policies(snap: Snapshot) -> dict[str, object]:
    """``/policies``: the policies, and the trust domain their principals are matched in
    (``nodemesh policies`` warns of principals of another)."""
    return {"policies": views.policies_view(snap), "trust_domain": snap.trust_domain}


def _soonest(isotimes: list[str]) -> str | None:
    """The earliest of ISO 8601 times that may carry different offsets."""
    if not isotimes:
        return None
    return min(isotimes, key=lambda t: dt.datetime.fromisoformat(t.replace("Z", "+00:00")))


class AdminApi:
    def __init__(self, sources: AdminSources) -> None:
        self.s = sources
        # When the store's current snapshot was committed: (version, time), replaced whole by
        # the store's writer thread (atomic). A version committed before the API existed has no
        # known time (``applied_at`` null) until the next change.
        self._applied: tuple[int, float] | None = None
        self.s.store.subscribe(lambda snap, _kinds: self._committed(snap.version))
        self._get: dict[str, Callable[[Request], object]] = {
            "/": lambda _r: {"node": self.s.node, "endpoints": ENDPOINTS},
            "/status": lambda _r: self.status(),
            "/config_dump": lambda _r: self.config_dump(),
            "/workloads": lambda r: {"workloads": self.workloads(r.query.get("local") == "1")},
            "/services": lambda _r: {"services": views.services_view(self.s.store.snapshot())},
            "/policies": lambda _r: _policies(self.s.store.snapshot()),
            "/certs": lambda _r: {"certificates": self.certificates()},
            "/connections": lambda _r: self._connections(),
            "/workers": lambda _r: self._workers(),
            "/datapath": lambda _r: self.datapath(),
            "/traffic": lambda _r: self.traffic(),
            "/routes": lambda _r: self._routes(),
            "/logging": lambda _r: {"levels": levels()},
        }

    def _committed(self, version: int) -> None:
        self._applied = (version, time.time())

    def applied_at(self, version: int) -> str | None:
        """When snapshot ``version`` was committed (UTC), if this API saw it happen."""
        applied = self._applied
        return _utc(applied[1]) if applied is not None and applied[0] == version else None

    async def handle(self, request: Request) -> Response:
        if request.method == "POST" and request.path == "/logging":
            return await self._logging(request)
        if request.path == "/logging" and {"level", "logger"} & request.query.keys():
            # A GET that means to change a level must not answer 200 with nothing changed.
            query = "&".join(f"{k}={v}" for k, v in request.query.items())
            return Response.json(
                405,
                {
                    "error": "GET /logging only lists the levels; change one with "
                    f"POST /logging?{query} (curl -XPOST)"
                },
            )
        if request.method == "POST" and request.path == "/quitquitquit":
            self.s.drain()
            return Response.json(200, {"draining": True})
        if request.path == "/quitquitquit":
            return Response.json(405, {"error": "POST /quitquitquit drains the agent"})
        if request.path == "/requests" and request.method == "GET":
            if self.s.requests is not None:
                return await self.s.requests(request.query)
            ring = self.s.tap if self.s.tap is not None else _NO_TAP
            return await requests_view(ring, self.s.node, request.query)
        view = self._get.get(request.path)
        if view is None:
            known = ", ".join(ENDPOINTS)
            return Response.json(404, {"error": f"no endpoint {request.path}; try: {known}"})
        if request.method != "GET":
            return Response.json(405, {"error": f"{request.path} answers GET"})
        result = view(request)
        return Response.json(200, await result if inspect.isawaitable(result) else result)

    async def _logging(self, request: Request) -> Response:
        level = request.query.get("level")
        if not level:
            return Response.json(400, {"error": "POST /logging?level=debug[&logger=NAME]"})
        logger = request.query.get("logger", "root")
        try:
            changed = set_level(level, logger)
        except LogLevelError as e:
            return Response.json(400, {"error": str(e)})
        if self.s.set_worker_level is not None:
            await self.s.set_worker_level(level, logger)  # the same change in every worker
        return Response.json(200, {"levels": changed})

    # -- views -------------------------------------------------------------------------------
    async def connections(self) -> Rows:
        rows = self.s.connections()
        return await rows if inspect.isawaitable(rows) else rows

    async def _connections(self) -> dict[str, object]:
        return {"connections": await self.connections()}

    async def _routes(self) -> dict[str, object]:
        routed = self.s.routed()
        counts = await routed if inspect.isawaitable(routed) else routed
        return {"routes": views.routes_view(self.s.store.snapshot(), counts)}

    async def _workers(self) -> dict[str, object]:
        return {"workers": await self.s.workers() if self.s.workers is not None else []}

    def workloads(self, local_only: bool = False) -> Rows:
        return views.workloads_view(self.s.store.snapshot(), self.s.node, local_only=local_only)

    def certificates(self) -> Rows:
        return self.s.certificates() if self.s.certificates is not None else []

    async def traffic(self) -> dict[str, object]:
        """Traffic control (``agent.policy.traffic.control.TrafficControl.describe``)."""
        if self.s.traffic is None:
            return {"policies": {}, "effective": {}, "services": {}}
        found = self.s.traffic()
        return await found if inspect.isawaitable(found) else found

    async def datapath(self) -> dict[str, object]:
        return {"datapath": await self.s.datapath() if self.s.datapath is not None else None}

    async def status(self) -> dict[str, object]:
        snap = self.s.store.snapshot()
        reasons = self.s.not_ready()
        certs = self.certificates()
        datapath = await self.s.datapath() if self.s.datapath is not None else {}
        return {
            "node": self.s.node,
            "version": __version__,
            "ready": not reasons,
            "not_ready": reasons,
            "degraded": self.s.degraded(),
            "uptime_seconds": round(time.time() - self.s.started, 1),
            "state": {
                "version": snap.version,
                "applied_at": self.applied_at(snap.version),
                "trust_domain": snap.trust_domain,
                **(self.s.state_source() if self.s.state_source else {}),
            },
            "certificates": certificates_summary(certs),
            "counts": {
                **views.summary(snap, self.s.node),
                "connections": len(await self.connections()),
                "certificates": len(certs),
                "certificates_available": sum(1 for c in certs if c.get("state") == "Available"),
            },
            "datapath": {
                k: datapath.get(k) for k in ("failure_mode", "generation", "pods", "listeners")
            },
        }

    async def config_dump(self) -> dict[str, object]:
        snap = self.s.store.snapshot()
        return {
            "version": __version__,
            "node": self.s.node,
            "config": dict(self.s.config),
            "state": {"version": snap.version, "trust_domain": snap.trust_domain},
            "workloads": views.workloads_view(snap, self.s.node),
            "services": views.services_view(snap),
            "policies": views.policies_view(snap),
            "certificates": self.certificates(),
            "datapath": (await self.datapath())["datapath"],
            "traffic": await self.traffic(),
        }
