"""How the agent's parts meet: what each is told about, or reads from, the others.

The parts never import each other sideways; this module, at the top next to ``agent.app``, is
the one place that knows them all. The datapath is given this node's pods as plain data
(``local_pods``), so it does not depend on the state's model. Metrics (``--metrics-port``) and
the admin API (``--admin-address``) observe everything else, so they are assembled last
(``observability``) from the agent's parts: the proxy's connection registry (TCP metrics,
access log, ``/connections``), the identity manager (certificate states and expiry), the
datapath (BPF counters, attachments), the state source (loads, sync statistics, errors) and the
agent's own readiness and drain. Each part offers what is read from it as a method of its
declared interface (``ProxyComponent``, ``IdentityComponent``, ``StateSource``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.admin.api import AdminSources
from agent.admin.component import AdminComponent
from agent.base.component import Component, StateSource
from agent.base.conncaps import (
    PEER_LIMIT,
    POD_LIMIT,
    ConnectionCaps,
    SourceLimit,
    describe_cap,
    descriptor_limit,
    raise_descriptor_limit,
)
from agent.base.constants import Listener
from agent.base.http import Response
from agent.config import AgentConfig
from agent.datapath.datapath import Datapath
from agent.datapath.desired import LocalPod
from agent.state import Snapshot, StateStore
from agent.telemetry.agentmetrics import AgentSources
from agent.telemetry.component import TelemetryComponent

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from agent.identity.component import IdentityComponent
    from agent.proxy.component import ProxyComponent
    from agent.proxy.contexts import CertificateSource


class AgentParts(Protocol):
    config: AgentConfig
    store: StateStore
    datapath: Datapath
    source: StateSource | None
    identity: IdentityComponent | None
    proxy: ProxyComponent | None
    caps: ConnectionCaps | None

    def not_ready(self) -> list[str]: ...

    def degraded(self) -> list[str]: ...

    def request_stop(self) -> None: ...


def node_proxy(
    config: AgentConfig, store: StateStore, identities: CertificateSource
) -> ProxyComponent:
    """The node proxy over ``store`` with certificates from ``identities`` (the identity
    manager, or in a worker the main process's, through ``agent.workers.certs``)."""
    from agent.proxy.component import ProxyComponent
    from agent.proxy.core import Core, ProxySettings
    from agent.proxy.hbone_limits import with_stream_window
    from agent.proxy.server import NodeProxy

    # Loop protection: the ports this agent listens on, as configured (not the defaults).
    settings = ProxySettings(
        proxy_ports=config.own_ports(),
        h2_relay=config.h2_relay,
        max_header_fields=config.max_header_fields,
        hbone=with_stream_window(config.hbone_window),
        hbone_buffer_budget=config.budget_share,
        hbone_queue_budget=config.queue_budget_share,
    )
    core = Core(node=config.node, store=store, identities=identities, settings=settings)
    return ProxyComponent(NodeProxy(core))


def connection_caps(config: AgentConfig, *, passthrough: bool) -> ConnectionCaps:
    """What one proxy process's accept loops admit (``agent.base.conncaps``), from its own
    descriptor limit (raised to the hard limit first). On 15001, ``--max-connections-per-pod``;
    in plain passthrough (no CA, so no node proxy to do it) 15006 and 15008 also get the node
    proxy's per-address limit (``InboundLimits.max_connections_per_peer``). ``ConfigError``
    when ``--max-connections`` asks for more than the limit leaves room for."""
    from agent.proxy.hbone_limits import InboundLimits

    nofile = raise_descriptor_limit()
    total = config.connection_cap(nofile)
    why = describe_cap(nofile) if config.max_connections is None else "--max-connections"
    per_pod = config.per_pod_cap(total)
    per_source = {Listener.OUTBOUND: SourceLimit(per_pod, POD_LIMIT, "pod")}
    if passthrough:
        per_peer = InboundLimits().max_connections_per_peer
        per_source[Listener.INBOUND] = SourceLimit(per_peer, PEER_LIMIT, "client")
        per_source[Listener.HBONE] = SourceLimit(per_peer, PEER_LIMIT, "peer")
    log.info(
        "connections: at most %d in this process (%s), %d per pod on the outbound listener",
        total,
        why,
        per_pod,
    )
    return ConnectionCaps(total, per_source, why=why)


def count_in_proxy(caps: ConnectionCaps, proxy: ProxyComponent) -> None:
    """Make ``caps`` the node proxy's too: its refusals in the proxy's rejection counter, and
    the sockets a connection opens beyond its own upstream charged to it (``NodeProxy.count_in``:
    each inbound HBONE stream's pod socket, so the 15008 gate charges a connection its own
    descriptor only; each h2 source session's socket to a same-node or unmeshed endpoint).
    Before the accept loops start."""
    caps.reject = proxy.connections.reject
    proxy.proxy.count_in(caps)


def rejection_counts(parts: AgentParts) -> Callable[[], Mapping[str, int]] | None:
    """The rejection counter ``/metrics`` shows: the node proxy's; without one (plain
    passthrough), the accept loops' own (``ConnectionCaps.rejections``)."""
    proxy, caps = parts.proxy, parts.caps
    if proxy is not None:
        return lambda: proxy.connections.rejections
    if caps is not None:
        return lambda: caps.rejections
    return None


def local_pods(snapshot: Snapshot, node: str) -> list[LocalPod]:
    """Every pod of ``node`` that has an IP (meshed or not: a non-meshed pod's veth still needs
    the program, for its connections to meshed pods on the same node)."""
    pods = []
    for w in snapshot.workloads_on(node):
        if w.host_network:
            continue
        meshed = snapshot.is_meshed(w)
        for ip in w.ips:
            if ":" in ip:  # IPv6 capture is not implemented yet; the maps are ready for it
                continue
            pods.append(
                LocalPod(ip, w.uid, meshed, w.exclude_outbound_ports, w.exclude_inbound_ports)
            )
    return pods


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    return value


def effective_config(config: AgentConfig) -> dict[str, object]:
    """The agent's settings as JSON (paths, never file contents: no token, no key)."""
    out = {k: _jsonable(v) for k, v in dataclasses.asdict(config).items()}
    out["hbone_buffer_budget_per_process"] = config.budget_share  # with --workers N: an Nth
    out["hbone_queue_budget_per_process"] = config.queue_budget_share
    # what --max-connections comes to in each proxy process, under the limit it runs with
    cap = config.connection_cap(descriptor_limit())
    out["max_connections_per_process"] = cap
    out["max_connections_per_pod_per_process"] = config.per_pod_cap(cap)
    out["admin_address"] = f"{config.admin_address[0]}:{config.admin_address[1]}"
    out["capture_mark"] = hex(config.capture_mark)
    if config.ca is not None:
        ca = {k: _jsonable(v) for k, v in dataclasses.asdict(config.ca).items()}
        out["ca"] = {**ca, **_cert_ttl(config.ca.cert_ttl_seconds)}
    return out


def _cert_ttl(seconds: int) -> dict[str, object]:
    """The certificate lifetime the agent asks for, as a reader of the dump needs it: the
    setting's 0 is not a lifetime of zero seconds but "ask for nothing, the CA decides"
    (nodemesh's CA then gives its ``--max-ttl``, Istio's its own default). The agent cannot
    know that number before the CA answers, so the dump says who decides and where the
    answer shows: each certificate's ``not_before``/``not_after``."""
    if seconds == 0:
        return {
            "cert_ttl_seconds": None,
            "cert_ttl": "the CA's default (no --cert-ttl; the certificates' "
            "not_before/not_after show what the CA gave)",
        }
    return {
        "cert_ttl_seconds": seconds,
        "cert_ttl": f"{seconds}s requested (the CA may cap it at its maximum)",
    }


def source_view(source: StateSource | None) -> dict[str, object]:
    """What the state source says about itself (local file or Kubernetes)."""
    return source.describe() if source is not None else {"source": None}


class FanOut(Protocol):
    """With ``--workers N``: what the main process's endpoints ask the workers
    (``agent.workers.views.WorkerViews``)."""

    async def metrics(self, own: bytes) -> bytes: ...

    async def connections(self, own: list[dict[str, object]]) -> list[dict[str, object]]: ...

    async def requests(self, query: Mapping[str, str]) -> Response: ...

    async def workers(self) -> list[dict[str, object]]: ...

    async def set_level(self, level: str, logger: str) -> None: ...

    async def routed(self) -> Mapping[Any, int]: ...

    async def traffic(self) -> dict[str, object]: ...


def observability(parts: AgentParts, fanout: FanOut | None = None) -> list[Component]:
    """The telemetry and admin components of ``parts`` (an ``agent.app.Agent``); with
    ``fanout``, ``/metrics``, ``/connections`` and ``/requests`` also cover the workers."""
    proxy, identity = parts.proxy, parts.identity
    certificates = identity.certificates if identity is not None else None

    changed_at = [time.time()]  # the store's writer thread replaces the float: atomic
    parts.store.subscribe(lambda _snap, _kinds: changed_at.__setitem__(0, time.time()))

    def state_stats() -> Mapping[str, Mapping[str, int]]:
        return dict(parts.source.stats()) if parts.source is not None else {}

    telemetry = TelemetryComponent(
        store=parts.store,
        address=("0.0.0.0", parts.config.metrics_port),
        sources=AgentSources(
            rejections=rejection_counts(parts),
            denials=(lambda: proxy.connections.denials) if proxy is not None else None,
            rate_limited=((lambda: proxy.connections.rate_limited) if proxy is not None else None),
            pool_size=proxy.pool_size if proxy is not None else None,
            inbound_tunnels=proxy.inbound_tunnels if proxy is not None else None,
            hbone_budget=proxy.hbone_budget if proxy is not None else None,
            certificates=certificates,
            capture_counters=parts.datapath.counters,
            state_stats=state_stats,
            state_version=lambda: parts.store.snapshot().version,
            state_error=lambda: parts.source.last_error if parts.source is not None else None,
            state_changed_at=lambda: changed_at[0],
        ),
        access_log_sample=parts.config.access_log_sample,
        merge=fanout.metrics if fanout is not None else None,
    )
    if proxy is not None:
        proxy.connections.observers.append(telemetry.tcp)
        proxy.connections.request_observers.append(telemetry.http)
    tracing = None
    if parts.config.traces is not None:
        # Imported only when asked for: the OpenTelemetry SDK and its exporter add about 3 MiB
        # to every agent, and most agents never export a span.
        from agent.telemetry.traces import Tracing

        tracing = Tracing(parts.config.traces, parts.store, parts.config.node)
        telemetry.registry.register(tracing)
        if proxy is not None:
            proxy.connections.request_observers.append(tracing)
            if parts.config.traces.tcp:
                proxy.connections.observers.append(tracing)

    async def datapath_view() -> dict[str, object]:
        status = parts.datapath.status()
        status["attachments"] = await asyncio.to_thread(parts.datapath.attachments)
        return status

    admin = AdminComponent(
        address=parts.config.admin_address,
        sources=AdminSources(
            node=parts.config.node,
            store=parts.store,
            config=effective_config(parts.config),
            not_ready=parts.not_ready,
            degraded=parts.degraded,
            drain=parts.request_stop,
            connections=(
                (lambda: fanout.connections(telemetry.tcp.live()))
                if fanout is not None
                else telemetry.tcp.live
            ),
            requests=fanout.requests if fanout is not None else None,
            workers=fanout.workers if fanout is not None else None,
            set_worker_level=fanout.set_level if fanout is not None else None,
            tap=telemetry.http.tap if proxy is not None else None,
            certificates=certificates,
            datapath=datapath_view,
            state_source=lambda: source_view(parts.source),
            traffic=(
                fanout.traffic
                if fanout is not None
                else (lambda: proxy.traffic(parts.store.snapshot()))
                if proxy is not None
                else None
            ),
            routed=(
                fanout.routed if fanout is not None else proxy.routed if proxy is not None else dict
            ),
        ),
    )
    return [telemetry, admin] + ([tracing] if tracing is not None else [])
