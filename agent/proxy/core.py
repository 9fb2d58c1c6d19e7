"""What every proxy path shares: settings, the state, compiled policies, TLS, pool, registry.

Policies are compiled once per state version (``policies()`` checks the version, so a path never
evaluates stale policies and never compiles twice). ``watch_policies`` re-checks live
connections when the policies change; the store calls subscribers from the writer's thread, so
the re-check is handed to the event loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from agent.base.conncaps import ConnectionCaps
from agent.base.constants import (
    ADMIN_PORT,
    HBONE_PORT,
    INBOUND_PORT,
    METRICS_PORT,
    OUTBOUND_PORT,
    PROXY_MARK,
    READY_PORT,
)
from agent.policy.authz import DEFAULT_ROOT_NAMESPACE, Authorizer, Decision, Request
from agent.policy.peerauth import STRICT, PeerAuthenticator
from agent.policy.ratelimit import Limiter, RateLimit, RateLimiter, limits_by_endpoint
from agent.proxy.budget import DEFAULT_BUDGET, DEFAULT_QUEUE_BUDGET, HboneBudget
from agent.proxy.contexts import CertificateSource, Contexts
from agent.proxy.h2wire import HboneSettings
from agent.proxy.http1_codec import DEFAULT_MAX_FIELDS
from agent.proxy.records import Registry
from agent.proxy.splice import Splicer
from agent.state import Snapshot, StateStore, Workload
from agent.state.model import spiffe_id
from agent.state.protocols import TCP, declared_pod_ports
from agent.telemetry.records import ConnectionRecord

log = logging.getLogger(__name__)

# The ``policy`` label of a denial by PeerAuthentication STRICT (metrics, access log).
STRICT_DENIAL = "peer-authentication-strict"


@dataclass(frozen=True)
class ProxySettings:
    mark: int = PROXY_MARK
    hbone_port: int = HBONE_PORT
    # Never valid tunnel or plaintext targets (loop protection): the ports the agent listens on.
    # These are the defaults; ``nodemesh agent`` passes its configured ones
    # (``AgentConfig.own_ports``), since --metrics-port and friends move them.
    proxy_ports: frozenset[int] = frozenset(
        {ADMIN_PORT, OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT, METRICS_PORT, READY_PORT}
    )
    connect_timeout: float = 10.0
    handshake_timeout: float = 10.0
    pool_idle_timeout: float = 300.0
    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    hbone: HboneSettings = field(default_factory=HboneSettings)
    # Bytes this process's HBONE connections may hold or have promised, all together
    # (``agent.proxy.budget``; ``nodemesh agent --hbone-buffer-budget``, this worker's share).
    hbone_buffer_budget: int = DEFAULT_BUDGET
    # Bytes this process's HBONE connections may hold in outgoing queues, all together
    # (``budget.QueueBudget``; ``--hbone-queue-budget``, this worker's share).
    hbone_queue_budget: int = DEFAULT_QUEUE_BUDGET
    # HTTP/2 and gRPC through HBONE relayed frame by frame (``h2relay``), not terminated
    # (``--no-h2-relay``: False)
    h2_relay: bool = True
    # Fields an HTTP/1.1 head or trailer block may have, every reader's: a client's requests at
    # either node, an endpoint's responses (``http1_codec``; ``--max-header-fields``)
    max_header_fields: int = DEFAULT_MAX_FIELDS


@dataclass(frozen=True)
class Policies:
    version: int
    authz: Authorizer
    peerauth: PeerAuthenticator

    def live(self, request: Request, workload: Workload) -> Decision:
        """Is a connection that is already open still allowed? AuthorizationPolicy for all of
        them, and PeerAuthentication for plaintext ones: a workload switched to STRICT must not
        keep plaintext connections it admitted while PERMISSIVE."""
        if request.principal is None and (
            self.peerauth.mode(workload, request.destination_port) == STRICT
        ):
            return Decision(
                False, "PeerAuthentication is STRICT (mTLS required)", policy=STRICT_DENIAL
            )
        return self.authz.evaluate(request, workload)


@functools.lru_cache(maxsize=4096)
def _identity(trust_domain: str, namespace: str, service_account: str) -> str:
    return spiffe_id(trust_domain, namespace, service_account)


class Core:
    def __init__(
        self,
        *,
        node: str,
        store: StateStore,
        identities: CertificateSource,
        settings: ProxySettings | None = None,
        splicer: Splicer | None = None,
    ) -> None:
        self.node = node
        # The kernel side of the same-node splice, when the agent runs with it (--splice).
        self.splicer = splicer
        self.store = store
        self.settings = settings or ProxySettings()
        self.contexts = Contexts(identities)
        self.registry = Registry()
        # The process's descriptor budget, for the sockets a connection's streams open beyond
        # its own upstream (``NodeProxy.count_in``); None: not counted (tests, tools).
        self.caps: ConnectionCaps | None = None
        self.hbone_budget = HboneBudget(
            self.settings.hbone_buffer_budget, queue_limit=self.settings.hbone_queue_budget
        )
        self._policies: Policies | None = None
        self._protocols: tuple[int, Mapping[tuple[str, int], str]] | None = None
        # In-process buckets; a worker of --workers N swaps in the agent's shared ones, and so
        # does the agent at an upgrade, for as long as both agents serve (agent.handover).
        self.limiter: Limiter = RateLimiter()
        self.clock: Callable[[], float] = time.monotonic
        self._limits: tuple[int, Mapping[tuple[str, int], tuple[RateLimit, ...]]] | None = None

    def snapshot(self) -> Snapshot:
        return self.store.snapshot()

    def policies(self, snap: Snapshot | None = None) -> Policies:
        snap = snap or self.snapshot()
        cached = self._policies
        if cached is None or cached.version != snap.version:
            objs = list(snap.policies.values())
            root = self.settings.root_namespace
            cached = Policies(
                snap.version,
                Authorizer.compile(
                    objs, root_namespace=root, previous=cached.authz if cached else None
                ),
                PeerAuthenticator.compile(objs, root_namespace=root),
            )
            self._policies = cached
        return cached

    def protocol(self, snap: Snapshot, ip: str, port: int) -> str:
        """The declared protocol of a local pod port (``agent.state.protocols``), from a
        table built once per state version."""
        cached = self._protocols
        if cached is None or cached[0] != snap.version:
            cached = (snap.version, declared_pod_ports(snap))
            self._protocols = cached
        return cached[1].get((ip, port), TCP)

    def rate_limit(self, request: Request, snap: Snapshot) -> RateLimit | None:
        """The RateLimitPolicy that refuses this request (counted by Service), or None when
        none applies or each has a token left. The table of limits per pod port is built once
        per state version; buckets of limits no longer in force are dropped then."""
        cached = self._limits
        if cached is None or cached[0] != snap.version:
            cached = self._limit_table(snap)
        limits = cached[1].get((request.destination_ip, request.destination_port))
        if not limits:
            return None
        refused = self.limiter.admit(
            limits, request.destination_ip, request.principal, self.clock()
        )
        if refused is not None:
            self.registry.rate_limited[refused.service] += 1
        return refused

    def rate_limited_port(self, ip: str, port: int, snap: Snapshot) -> bool:
        """Whether any RateLimitPolicy applies to the pod port ``ip``:``port`` in this state
        version: where none does, ``rate_limit`` refuses no request to it until the version
        changes (``RequestAdmission`` asks this once per version, not per request)."""
        cached = self._limits
        if cached is None or cached[0] != snap.version:
            cached = self._limit_table(snap)
        return bool(cached[1].get((ip, port)))

    def _limit_table(
        self, snap: Snapshot
    ) -> tuple[int, Mapping[tuple[str, int], tuple[RateLimit, ...]]]:
        """The limits per pod port of ``snap``'s version, kept; buckets of limits no longer in
        force are dropped."""
        cached = (snap.version, limits_by_endpoint(snap))
        self._limits = cached
        self.limiter.forget(limit for limits in cached[1].values() for limit in limits)
        return cached

    def local_workload(self, snap: Snapshot, ip: str) -> Workload | None:
        """The meshed workload on this node that owns ``ip``, if any."""
        w = snap.workload_by_ip.get(ip)
        return w if w is not None and w.node == self.node and snap.is_meshed(w) else None

    def identity(self, workload: Workload, snap: Snapshot) -> str:
        """The workload's SPIFFE ID; one string per identity, shared by every record (each
        connection's record keeps two for its life)."""
        return _identity(snap.trust_domain, workload.namespace, workload.service_account)

    def authorize(
        self,
        request: Request,
        workload: Workload,
        where: str,
        snap: Snapshot,
        *,
        unregistered: ConnectionRecord | None = None,
    ) -> bool:
        """Evaluate, log dry-run and AUDIT outcomes, count and log a denial; True if allowed.
        ``unregistered``: the connection's record when it is not in the registry yet (an HBONE
        stream), so that a denial still reaches metrics and the access log."""
        decision = self.policies(snap).authz.evaluate(request, workload)
        for note in decision.would:
            log.info("%s: %s", where, note)
        for ref in decision.audited:
            log.info(
                "%s: audited by %s (%s)", where, ref, "allowed" if decision.allowed else "denied"
            )
        if not decision.allowed:
            self.registry.deny(decision, where, record=unregistered)
        return decision.allowed

    def request_decided(self, decision: Decision, where: str) -> None:
        """The reports of one HTTP request's ``decision`` (``http_inbound.authorize``): its
        dry-run and AUDIT outcomes logged, a denial and what dry-run policies would deny
        counted and logged; the connection stays open whatever the answer. A decision that
        allows, with no dry-run or AUDIT outcome, has none: a caller may skip it then, and
        build ``where`` only for a decision that has."""
        for note in decision.would:
            log.info("%s: %s", where, note)
        for ref in decision.audited:
            log.info(
                "%s: audited by %s (%s)", where, ref, "allowed" if decision.allowed else "denied"
            )
        self.registry.request_denied(decision, where)

    def watch_policies(self, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
        """Re-check live connections after every policy change; returns the unsubscribe."""

        def recheck() -> None:
            policies = self.policies()
            closed = self.registry.recheck(policies.live)
            if closed:
                log.info("policy change closed %d live connection(s)", closed)

        def on_change(_snap: Snapshot, kinds: frozenset[str]) -> None:
            if kinds & {"policies", "workloads", "namespaces"}:
                loop.call_soon_threadsafe(recheck)

        return self.store.subscribe(on_change)
