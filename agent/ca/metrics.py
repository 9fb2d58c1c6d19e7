"""The CA's own metrics: what it decided, how long deciding took, when its roots expire.

Why the CA needs them although every agent counts its requests (``nodemesh_ca_requests_total``
on the agent side): an agent only sees its own calls, and a refusal it sees as
``PERMISSION_DENIED`` may be a misconfigured node or an attack on another node's identities.
The CA sees every caller, and only it knows how long the Kubernetes checks (TokenReview, the
pod lookup) take and when its signing certificate runs out. Istio's istiod reports the same
facts (``citadel_server_*``) on its monitoring port 15014; the CA uses that port too.

The registry is the CA's own, not the agents' shared one (``agent.base.metrics``): the CA and an
agent can share a test process, and neither may report the other's series. The endpoint is
prometheus-client's threaded server, because the CA is a threaded gRPC server with no event loop.
Outcomes are ``ok``, gRPC status names and the two causes of a refusal before the handler
(bounded set), never a caller's name or an identity.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.ca.authority import Authority

ISSUED = "ok"  # the agents' ``nodemesh_ca_requests_total`` uses the same values
# Calls grpcio refuses before the handler runs (``agent.ca.server``'s ``RefusalCounter``):
# past ``MAX_CONCURRENT_RPCS`` at once, and calls that ended without their request being read:
# one over ``MAX_REQUEST_BYTES`` (grpcio answers RESOURCE_EXHAUSTED), or a caller that left
# before sending it; grpcio tells the handler neither which nor why, so one value holds both
# (``agent.ca.server.RefusalCounter`` says what was tried to tell them apart).
TOO_MANY_CALLS = "too_many_calls"
REQUEST_UNREAD = "request_unread"
# From a few milliseconds (standalone: one ECDSA signature) to the seconds an API server under
# load can take for TokenReview and the pod lookup.
DECISION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def outcome(code: grpc.StatusCode | None) -> str:
    """The ``outcome`` label: ``ok``, or the refusal's gRPC status name (``PERMISSION_DENIED``)."""
    return ISSUED if code is None else code.name


class _AuthorityCollector(Collector):
    """Expiry of the roots and the signing certificate, read at scrape time from the authority
    in use (so a rotated root is reported without anyone remembering to update a gauge)."""

    def __init__(self, authority: Callable[[], Authority], trust_domain: str) -> None:
        self._authority = authority
        self._trust_domain = trust_domain

    def collect(self) -> Iterator[GaugeMetricFamily]:
        authority = self._authority()
        roots = GaugeMetricFamily(
            "nodemesh_ca_server_root_expiry_timestamp_seconds",
            "When each trusted root certificate expires (Unix time)",
            labels=["serial"],
        )
        for root in authority.roots:
            roots.add_metric([format(root.serial_number, "x")], _unix(root.not_valid_after_utc))
        yield roots
        signing = GaugeMetricFamily(
            "nodemesh_ca_server_signing_expiry_timestamp_seconds",
            "When the certificate that signs workload certificates expires (Unix time); "
            "workload certificates are never issued past it",
        )
        signing.add_metric([], _unix(authority.signing_cert.not_valid_after_utc))
        yield signing
        info = GaugeMetricFamily(
            "nodemesh_ca_server_info", "The CA's trust domain", labels=["trust_domain"]
        )
        info.add_metric([self._trust_domain], 1.0)
        yield info


def _unix(moment: dt.datetime) -> float:
    return moment.timestamp()


class CaMetrics:
    """The counters the gRPC service updates, and the registry the endpoint serves."""

    def __init__(self, authority: Callable[[], Authority], trust_domain: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "nodemesh_ca_server_requests_total",
            "Certificate requests the CA decided, by outcome (ok or the gRPC status of the "
            "refusal), and those refused before deciding (too_many_calls: past the concurrency "
            "limit; request_unread: larger than the request limit, or the caller left before "
            "sending it)",
            ["outcome"],
            registry=self.registry,
        )
        self._decision = Histogram(
            "nodemesh_ca_server_decision_seconds",
            "Time from a request's arrival to its answer: authentication, authorization "
            "(API calls in Kubernetes mode) and signing",
            buckets=DECISION_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_AuthorityCollector(authority, trust_domain))

    def refused(self, cause: str) -> None:
        """Count a call refused before the handler ran (``TOO_MANY_CALLS``,
        ``REQUEST_UNREAD``); it took no decision, so no duration is observed."""
        self._requests.labels(outcome=cause).inc()

    @contextmanager
    def deciding(self) -> Iterator[Callable[[grpc.StatusCode | None], None]]:
        """Time one request; the caller reports its outcome once through the yielded function.
        A request that ends without a reported outcome (an unexpected exception) counts as
        ``INTERNAL``, which is what gRPC answers in that case."""
        started = time.monotonic()
        reported: list[str] = []

        def report(code: grpc.StatusCode | None) -> None:
            if not reported:
                reported.append(outcome(code))

        try:
            yield report
        finally:
            self._decision.observe(time.monotonic() - started)
            self._requests.labels(
                outcome=reported[0] if reported else grpc.StatusCode.INTERNAL.name
            ).inc()


def serve(metrics: CaMetrics, listen: str) -> tuple[WSGIServer, int]:
    """Serve ``/metrics`` on ``listen`` (``host:port``, port 0 picks one) in a thread; returns
    the server (``shutdown()`` stops it) and the bound port."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"--metrics-listen {listen!r} is not HOST:PORT (e.g. 0.0.0.0:15014)")
    server, _ = start_http_server(int(port_text), host.strip("[]") or "0.0.0.0", metrics.registry)
    return server, server.server_address[1]
