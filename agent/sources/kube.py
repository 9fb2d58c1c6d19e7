"""The Kubernetes source: the state from the API server, by list + watch, in worker threads.

The only product module that imports ``kubernetes`` (besides ``agent.ca`` for TokenReview). It
runs one ``Reflector`` thread per resource (Pods cluster-wide, Namespaces, Services,
EndpointSlices, the three nodemesh CRDs, the Gateway API's HTTPRoute and GRPCRoute): the
official client's calls block, and running them in threads means the proxy's event loop never
waits on the API server. Handlers convert raw JSON (``kubeobjects``) and write the
``StateStore`` under one lock, so the store still has a single writer per source.

Invalid objects never crash the agent and never wipe valid state: the previous valid version is
kept and the problem is reported where the user will look. For a pod that is an Event on the pod
(sent only by the agent of the pod's node, so a cluster of N nodes does not send N copies); for a
policy it is the ``Accepted`` condition in its status, written only when it differs from what is
there (every agent computes the same verdict, so after the first write the others find it done).
What is valid but likely not meant (an unknown ``nodemesh.io/`` pod annotation, a policy value
that can never match: ``agent.policy.warnings``) is used as written and warned of with a Warning
Event, once (``agent.sources.objectwarnings``): a pod's by the agent of its node, a policy's by
the holder of the route-status Lease below.

Gateway API routes are optional: users install those CRDs themselves (as with Linkerd and
Istio). Without them the route reflectors find a 404, count as synced with no routes, say so
once in the log and in ``describe()`` (``routes: unavailable``), and look again every minute.
Route status (``status.parents``) is written by ``routestatus.RouteStatusWriter``, by one
agent per cluster: the holder of the ``coordination.k8s.io`` Lease ``nodemesh-route-status``
in the mesh's namespace (``agent.sources.lease`` decides; a thread here reads and writes it
every two seconds, and gives it up when the source stops).

Ready (``ready`` / ``wait_ready``) after every resource's first full list.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError as TransportError

from agent.policy.warnings import ConfigWarning, namespace_warnings, policy_warnings
from agent.sources import kubehandlers as kh
from agent.sources import kubeobjects as ko
from agent.sources.kubeobjects import InvalidObject, Raw
from agent.sources.lease import (
    LEASE_DURATION,
    LEASE_NAME,
    RENEW_DEADLINE,
    RETRY_PERIOD,
    LeaseElection,
    LeaseRecord,
    micro_time,
)
from agent.sources.objectwarnings import Due, PodWarnings, PolicyWarnings, event_name
from agent.sources.reflector import ApiStatusError, Gone, Reflector, StreamResponse
from agent.sources.routestatus import RouteStatusWriter, StatusConflict
from agent.state import MESH_NAMESPACE_LABEL, StateStore

log = logging.getLogger(__name__)

GROUP, VERSION = "nodemesh.io", "v1alpha1"
POLICY_PLURALS = {
    "AuthorizationPolicy": "authorizationpolicies",
    "PeerAuthentication": "peerauthentications",
    "TrafficPolicy": "trafficpolicies",
    "RateLimitPolicy": "ratelimitpolicies",
    "HTTPFault": "httpfaults",
}
POLICY_KINDS = {plural: kind for kind, plural in POLICY_PLURALS.items()}
GATEWAY_GROUP, GATEWAY_VERSION = "gateway.networking.k8s.io", "v1"
ROUTE_PLURALS = {"HTTPRoute": "httproutes", "GRPCRoute": "grpcroutes"}
GATEWAY_API_INSTALL = (
    "install the Gateway API CRDs (standard channel) to use HTTPRoute and GRPCRoute: "
    "see README, Routes"
)
# Host-network pods are never meshed and finished pods hold IPs that may be reused: the API
# server filters them out, which also keeps them out of memory.
POD_FIELD_SELECTOR = "spec.hostNetwork=false,status.phase!=Succeeded,status.phase!=Failed"
# The namespace whose uid names the cluster (``KubeSource.cluster_id``): made once per cluster.
CLUSTER_NAMESPACE = ("", "kube-system")
LEASE_NAMESPACE = "nodemesh-system"  # the mesh's own namespace (daemonset/kustomization.yaml)
# Seconds a read may stall beyond a watch's own server-side timeout (or, for a list, at all)
# before the connection counts as dead and the reflector reconnects.
READ_SLACK = 30.0


def api_client(*, kubeconfig: str | None = None, in_cluster: bool = False) -> Any:
    """An ``ApiClient`` from ``--kubeconfig PATH`` or ``--in-cluster`` (for any component)."""
    cfg = client.Configuration()
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except config.ConfigException as e:
        where = "the in-cluster service account" if in_cluster else f"kubeconfig {kubeconfig}"
        raise RuntimeError(f"cannot configure the Kubernetes client from {where}: {e}") from e
    return client.ApiClient(cfg)


def _lister(func: Callable[..., Any], *args: Any, read_timeout: float) -> Callable[..., Any]:
    """Wrap a client list function: raw response, timeouts, errors in the reflector's terms."""

    def call(**kwargs: Any) -> StreamResponse:
        timeout = kwargs.get("timeout_seconds", 0) + read_timeout
        try:
            resp: StreamResponse = func(
                *args, _preload_content=False, _request_timeout=(10, timeout), **kwargs
            )
        except ApiException as e:
            if e.status == 410:
                raise Gone(str(e.reason)) from e
            raise ApiStatusError(int(e.status or 0), str(e.reason)) from e
        return resp

    return call


class KubeSource:
    """Feed ``store`` from the API server reached through ``api`` (an ``ApiClient``)."""

    def __init__(
        self,
        api: Any,
        store: StateStore,
        *,
        node: str | None = None,
        report_status: bool = True,
        watch_timeout: int = 300,
        page_size: int = 500,
        absent_recheck: float = 60.0,
        lease_namespace: str = LEASE_NAMESPACE,
        lease_timing: tuple[float, float, float] = (LEASE_DURATION, RENEW_DEADLINE, RETRY_PERIOD),
    ) -> None:
        self.store = store
        self.node = node
        self.report_status = report_status
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.coordination = client.CoordinationV1Api(api)
        self._reported: set[tuple[str, str]] = set()
        self.route_status = RouteStatusWriter(self._patch_route_status)
        self.pod_warnings = PodWarnings(node)
        self.policy_warnings = PolicyWarnings()
        self.namespace_warnings = PolicyWarnings()
        duration, renew_deadline, self._lease_period = lease_timing
        self.lease_namespace = lease_namespace
        self.election = LeaseElection(
            node or f"{socket.gethostname()}-{os.getpid()}",
            duration=duration,
            renew_deadline=renew_deadline,
            clock=time.monotonic,
        )
        self._stopping = threading.Event()
        self._lease_failing = False  # the last Lease call failed (logged once per run)
        ctx = kh.Context(store, self)
        rt = READ_SLACK
        discovery = client.DiscoveryV1Api(api)
        specs: list[tuple[str, Callable[..., Any], Any, str | None]] = [
            (
                "pods",
                _lister(self.core.list_pod_for_all_namespaces, read_timeout=rt),
                kh.Pods(ctx),
                POD_FIELD_SELECTOR,
            ),
            (
                "namespaces",
                _lister(self.core.list_namespace, read_timeout=rt),
                kh.Namespaces(ctx),
                None,
            ),
            (
                "services",
                _lister(self.core.list_service_for_all_namespaces, read_timeout=rt),
                kh.Services(ctx),
                None,
            ),
            (
                "endpointslices",
                _lister(discovery.list_endpoint_slice_for_all_namespaces, read_timeout=rt),
                kh.EndpointSlices(ctx),
                None,
            ),
        ]
        for kind, plural in POLICY_PLURALS.items():
            lister = _lister(
                self.custom.list_cluster_custom_object, GROUP, VERSION, plural, read_timeout=rt
            )
            specs.append((plural, lister, kh.Policies(ctx, kind, plural), None))
        self.reflectors = [
            Reflector(
                name,
                lister,
                handler,
                field_selector=fs,
                page_size=page_size,
                watch_timeout=watch_timeout,
                track=CLUSTER_NAMESPACE if name == "namespaces" else None,
            )
            for name, lister, handler, fs in specs
        ]
        self.route_reflectors = [
            Reflector(
                plural,
                _lister(
                    self.custom.list_cluster_custom_object,
                    GATEWAY_GROUP,
                    GATEWAY_VERSION,
                    plural,
                    read_timeout=rt,
                ),
                kh.Routes(ctx, kind),
                page_size=page_size,
                watch_timeout=watch_timeout,
                optional=True,
                absent_recheck=absent_recheck,
            )
            for kind, plural in ROUTE_PLURALS.items()
        ]
        self.reflectors.extend(self.route_reflectors)
        self._threads: list[threading.Thread] = []

    @property
    def ready(self) -> bool:
        return all(r.synced.is_set() for r in self.reflectors)

    def not_ready(self) -> list[str]:
        """Resources not listed yet (for the readiness endpoint's body)."""
        return [r.name for r in self.reflectors if not r.synced.is_set()]

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until every resource was listed once, or ``timeout`` seconds in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for r in self.reflectors:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not r.synced.wait(left):
                return False
        return True

    def stats(self) -> dict[str, dict[str, int]]:
        return {r.name: dict(r.stats) for r in self.reflectors}

    @property
    def last_error(self) -> str | None:
        """Always ``None``: failures are per resource and retried, counted in ``stats()``
        (``errors``); the source as a whole never stops on one."""
        return None

    def routes_unavailable(self) -> str | None:
        """Why Gateway API routes are not followed (``None``: they are)."""
        absent = [f"{r.name}: {r.absent}" for r in self.route_reflectors if r.absent is not None]
        return f"{'; '.join(absent)}; {GATEWAY_API_INSTALL}" if absent else None

    def describe(self) -> dict[str, object]:
        """What the admin API shows about this source (``agent.base.component.StateSource``)."""
        unavailable = self.routes_unavailable()
        return {
            "source": "kubernetes",
            "synced": self.ready,
            "sync": self.stats(),
            "applied": self.applied(),
            "cluster_id": self.cluster_id(),
            "routes": "available" if unavailable is None else f"unavailable ({unavailable})",
            "route_status_writer": self.election.leading(),  # holds the route-status Lease
            "warnings": self.warnings(),
        }

    def applied(self) -> dict[str, dict[str, object]]:
        """Per resource, what this agent has applied (``nodemesh proxy-status`` compares them).

        ``resource_version`` is that of the last list, event or bookmark the reflector took in
        (``None`` before the first list, while relisting after a 410, or when an optional
        resource is not served): an etcd revision, the same counter for every resource and every
        agent of one cluster, so agents can be compared. ``digest`` and ``objects``: the objects
        applied (``agent.sources.contents``), equal on two agents that hold the same, whatever
        their revisions. ``synced``: listed at least once; ``absent``: an optional resource
        (Gateway API routes) the API server does not serve."""
        return {
            r.name: {
                "resource_version": r.resource_version,
                "digest": r.contents.digest(),
                "objects": len(r.contents),
                "synced": r.synced.is_set(),
                "absent": r.absent is not None,
            }
            for r in self.reflectors
        }

    def cluster_id(self) -> str | None:
        """Which cluster this agent follows: the uid of its ``kube-system`` namespace (made
        once per cluster, the identity Kubernetes tools commonly use for one), ``None`` until
        the namespaces are listed. The API server's address cannot tell clusters apart: in a
        pod it is ``kubernetes.default.svc`` in every cluster."""
        namespaces = next(r for r in self.reflectors if r.name == "namespaces")
        return namespaces.contents.tracked_uid()

    def warnings(self) -> list[dict[str, str]]:
        """What this agent warns of now: its node's pods, then the namespaces and the policies
        (every agent)."""
        return (
            self.pod_warnings.current()
            + self.namespace_warnings.current()
            + self.policy_warnings.current()
        )

    def start(self) -> None:
        self._stopping.clear()
        runs = [(r.run, f"kube:{r.name}") for r in self.reflectors]
        if self.report_status:
            runs.append((self._lead, "kube:route-status-lease"))
        for run, name in runs:
            t = threading.Thread(target=run, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stopping.set()
        for r in self.reflectors:
            r.stop()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    # -- reporting ---------------------------------------------------------------------------
    def report_invalid(self, obj: Raw, error: InvalidObject) -> None:
        meta = obj.get("metadata") or {}
        once = (str(meta.get("uid")), str(meta.get("resourceVersion")))
        if once in self._reported:
            return
        if len(self._reported) >= 10_000:  # bounded memory; worst case a repeated log line
            self._reported.clear()
        self._reported.add(once)
        log.warning(
            "skipping %s: %s; the previous valid version stays in force",
            ko.object_ref(obj),
            error.message,
        )
        if (
            obj.get("kind") == "Pod"
            and self.node
            and (obj.get("spec") or {}).get("nodeName") == self.node
        ):
            key = ("Pod", meta["namespace"], meta["name"])
            self._event(key, str(meta.get("uid") or ""), "", error.reason, error.message)

    def report_pod(self, obj: Raw, deleted: bool) -> None:
        """Warn of the pod's unknown annotations: an Event, once (only for this node's pods)."""
        for due in self.pod_warnings.observe(obj, deleted=deleted):
            self._warn(due)

    def report_namespace(self, obj: Raw, deleted: bool) -> None:
        """Warn of a mesh label no agent reads: every agent logs it, the Lease holder records
        the Event (a namespace has no node), once per label value."""
        labels = (obj.get("metadata") or {}).get("labels") or {}
        warnings = [] if deleted else namespace_warnings(labels)
        occasion = str(labels.get(MESH_NAMESPACE_LABEL, ""))
        self.namespace_warnings.observe("Namespace", obj, warnings, occasion=occasion)
        self.report_namespace_warnings()

    def report_namespace_warnings(self) -> None:
        write = self.report_status and self.election.leading()
        live = {("Namespace", "", name) for name in self.store.snapshot().namespaces}
        for due in self.namespace_warnings.due(live, write=write):
            self._warn(due)

    def _warn(self, due: Due) -> None:
        self._event(due.key, due.uid, due.occasion, due.warning.reason, due.warning.message)

    def _event(
        self, key: tuple[str, str, str], uid: str, occasion: str, reason: str, message: str
    ) -> None:
        """Record a Warning Event on object ``key`` (kind, namespace, name), unless an Event
        saying the same on the same occasion exists (``objectwarnings.event_name``). A
        cluster-scoped object's Events live in ``default``, as Kubernetes' own do for nodes."""
        kind, namespace, name = key
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        api_version = "v1" if kind in ("Pod", "Namespace") else f"{GROUP}/{VERSION}"
        body = {
            "metadata": {
                "name": event_name(key, uid, occasion, reason, message),
                "namespace": namespace or "default",
            },
            "involvedObject": {
                "kind": kind,
                "apiVersion": api_version,
                "name": name,
                "namespace": namespace,
                "uid": uid,
            },
            "reason": reason,
            "message": message,
            "type": "Warning",
            "source": {"component": "nodemesh-agent", "host": self.node},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(namespace or "default", body)
        except ApiException as e:
            if e.status == 409:  # said already: before a restart, or by the last Lease holder
                log.debug("Event for %s %s/%s exists: %s", *key, reason)
                return
            log.warning("cannot record an Event for %s %s/%s: %s %s", *key, e.status, e.reason)

    def report_policy(self, plural: str, obj: Raw, error: InvalidObject | None) -> None:
        """Set the ``Accepted`` condition when it differs from the object's current one, and
        warn of what an accepted policy can never match (``report_policy_warnings``)."""
        warnings: list[ConfigWarning] = []
        if error is None:
            warnings = policy_warnings(
                POLICY_KINDS[plural],
                obj.get("spec") or {},
                trust_domain=self.store.snapshot().trust_domain,
            )
        self.policy_warnings.observe(POLICY_KINDS[plural], obj, warnings)
        self.report_policy_warnings()
        if not self.report_status:
            return
        meta = obj["metadata"]
        generation = meta.get("generation", 0)
        status, reason, message = (
            ("True", "Accepted", "") if error is None else ("False", error.reason, error.message)
        )
        current = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or ()}
        have = current.get("Accepted") or {}
        if (
            have.get("status"),
            have.get("reason"),
            have.get("message"),
            have.get("observedGeneration"),
        ) == (status, reason, message, generation):
            return
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        current["Accepted"] = {
            "type": "Accepted",
            "status": status,
            "reason": reason,
            "message": message,
            "observedGeneration": generation,
            "lastTransitionTime": now,
        }
        patch = {"status": {"observedGeneration": generation, "conditions": list(current.values())}}
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], plural, meta["name"], patch
            )
        except ApiException as e:
            log.warning(
                "cannot update the status of %s: %s %s", ko.object_ref(obj), e.status, e.reason
            )

    def report_policy_warnings(self) -> None:
        """Record the policies' warnings not recorded yet: only the Lease holder does (so N
        agents do not write N Events); the others hold them until they take the Lease."""
        write = self.report_status and self.election.leading()
        for due in self.policy_warnings.due(self.store.snapshot().policies, write=write):
            self._warn(due)

    # -- routes ------------------------------------------------------------------------------
    def observe_route(self, kind: str, obj: Raw, deleted: bool) -> None:
        self.route_status.observe(kind, obj, deleted)

    def report_routes(self) -> None:
        """Re-evaluate the routes' status after a change of routes or Services (the handlers
        call it only once the Services were listed; routes not listed yet are not written).
        Only the Lease holder writes; the others log refused routes all the same."""
        write = self.report_status and self.election.leading()
        self.route_status.sync(self.store.snapshot(), write=write)

    # -- the route-status Lease --------------------------------------------------------------
    def _lead(self) -> None:
        """Take part in the election until the source stops, then give the Lease up."""
        while True:
            self._lease_step()
            if self._stopping.wait(self._lease_period):
                break
        read = self._read_lease()
        record = self.election.release(read[0], micro_time()) if read is not None else None
        if read is not None and record is not None:
            self._write_lease(record, read[1])

    def _lease_step(self) -> None:
        was = self.election.leading()
        read = self._read_lease()
        if read is None:
            return  # could not read it: decide nothing (a holder leads until its deadline)
        record = self.election.decide(read[0], micro_time())
        if record is not None:
            self._write_lease(record, read[1])
        if self.election.leading() and not was:
            log.info(
                "this agent writes route status now (Lease %s/%s)", self.lease_namespace, LEASE_NAME
            )
            self.report_routes()  # what changed while another agent held it
            self.report_policy_warnings()
            self.report_namespace_warnings()
        elif was and not self.election.leading():
            log.info("this agent no longer writes route status (another holds the Lease)")

    def _read_lease(self) -> tuple[LeaseRecord | None, str | None] | None:
        """The Lease and its resourceVersion, (None, None) when it does not exist, or None
        when it could not be read."""
        try:
            resp = self.coordination.read_namespaced_lease(
                LEASE_NAME, self.lease_namespace, _preload_content=False, _request_timeout=10
            )
            obj = json.loads(resp.data)
        except ApiException as e:
            if e.status == 404:
                return None, None
            self._lease_trouble(f"cannot read it: {e.status} {e.reason}; check the agent's RBAC")
            return None
        except (OSError, TransportError, ValueError) as e:
            self._lease_trouble(f"cannot read it: {e}")
            return None
        self._lease_failing = False
        version = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        return LeaseRecord.from_spec(obj.get("spec") or {}), version

    def _write_lease(self, record: LeaseRecord, version: str | None) -> None:
        """Create the Lease (``version`` None) or replace the version we read."""
        metadata: dict[str, str] = {"name": LEASE_NAME, "namespace": self.lease_namespace}
        if version is not None:
            metadata["resourceVersion"] = version
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": metadata, "spec": record.spec()}  # fmt: skip
        try:
            if version is None:
                self.coordination.create_namespaced_lease(
                    self.lease_namespace, body, _request_timeout=10
                )
            else:
                self.coordination.replace_namespaced_lease(
                    LEASE_NAME, self.lease_namespace, body, _request_timeout=10
                )
        except ApiException as e:
            self.election.wrote(record, ok=False, conflict=e.status == 409)
            if e.status != 409:
                self._lease_trouble(f"cannot write it: {e.status} {e.reason}; check the RBAC")
        except (OSError, TransportError) as e:
            self.election.wrote(record, ok=False)
            self._lease_trouble(f"cannot write it: {e}")
        else:
            self.election.wrote(record, ok=True)

    def _lease_trouble(self, what: str) -> None:
        """Log a failed Lease call: a warning for the first of a run, then at debug level (an
        API outage would otherwise log every retry period)."""
        level = logging.DEBUG if self._lease_failing else logging.WARNING
        self._lease_failing = True
        log.log(level, "route-status Lease %s/%s: %s", self.lease_namespace, LEASE_NAME, what)

    def _patch_route_status(self, kind: str, namespace: str, name: str, body: Raw) -> None:
        try:
            self.custom.patch_namespaced_custom_object_status(
                GATEWAY_GROUP, GATEWAY_VERSION, namespace, ROUTE_PLURALS[kind], name, body
            )
        except ApiException as e:
            if e.status == 409:
                raise StatusConflict(str(e.reason)) from e
            log.warning(
                "cannot update the status of %s %s/%s: %s %s",
                kind,
                namespace,
                name,
                e.status,
                e.reason,
            )
