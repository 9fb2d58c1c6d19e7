"""The copies of a route's ``RequestMirror``, for both source shells: one task per copy, its
endpoint chosen by the mirror Service's own traffic control, the outcome counted.

Why a module of its own: a copy is fire and forget, a task that may outlive the client
connection it came from, bounded per node (``MAX_MIRRORS``) and in time (``MIRROR_TIMEOUT``);
only the protocol's part (``MirrorSend``: the request sent, the answer read and dropped) differs
between HTTP/1.1 (``agent.proxy.http_outbound``) and HTTP/2 (``agent.proxy.h2outbound``). What
they share lives here, apart from the HTTP/1.1 shell's per-request path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from agent.policy.traffic.attempts import Attempts
from agent.policy.traffic.service import Rejected
from agent.proxy.http_router import HttpRouter
from agent.proxy.resolve import Route, ServiceTarget
from agent.proxy.tunnel import TunnelError
from agent.state import Workload
from agent.telemetry.records import ConnectionRecord

if TYPE_CHECKING:
    from agent.proxy.outbound import Outbound

log = logging.getLogger(__name__)

MAX_MIRRORS = 64  # copies in flight per node; more are dropped (counted ``overflow``)
MIRROR_TIMEOUT = 10.0  # seconds a copy may take, connect to end of response


def service_name(target: ServiceTarget) -> str:
    return f"{target.service.namespace}/{target.service.name}"


@dataclass(slots=True)
class MirrorTry:
    """One copy to a mirror Service (``MirrorCopies.copy``): its endpoint (``ip`` by
    ``route``, reported on ``record``, counted in ``attempts``), and what the protocol's
    sender (``MirrorSend``) reports back."""

    target: ServiceTarget
    ip: str
    route: Route
    record: ConnectionRecord
    attempts: Attempts
    outcome: str = "failed"  # sent, denied (by the endpoint's policy), failed
    status: int = 0  # the answer's status, once its head came


# The protocol's part of a copy: on a fresh connection to the endpoint, counted
# ``attempts.connected``, the request sent and the answer read and dropped, the connection
# closed; what happened goes into the ``MirrorTry``.
MirrorSend = Callable[[MirrorTry], Awaitable[None]]


class MirrorCopies:
    """The copies of ``RequestMirror`` a node's source shells start (``HttpOutbound`` is one):
    what they read of it is its ``outbound``, its ``router`` and the tasks in flight."""

    outbound: Outbound
    router: HttpRouter
    mirroring: set[asyncio.Task[None]]  # copies in flight (RequestMirror)

    def mirror(
        self,
        targets: Sequence[ServiceTarget],
        whole: bool,
        source: Workload | None,
        record: ConnectionRecord,
        where: str,
        send: MirrorSend,
    ) -> None:
        """Start a copy (``copy``) per mirror Service of a complete request: fire and forget,
        tasks that may outlive the client connection, at most ``MAX_MIRRORS`` in flight per
        node (more are counted ``overflow``); a request not held whole (``whole`` False: its
        body went past the replay limit) is not copied (``too_large``)."""
        snap = self.outbound.core.snapshot()
        for target in targets:
            service = self.router.traffic.service(snap, target.service)
            if not whole:
                service.count("http_mirror", "too_large")
            elif len(self.mirroring) >= MAX_MIRRORS:
                service.count("http_mirror", "overflow")
            else:
                task = asyncio.create_task(
                    self.copy(target, source, record, where, send),
                    name=f"mirror {where} -> {service_name(target)}",
                )
                self.mirroring.add(task)
                task.add_done_callback(self.mirroring.discard)

    async def copy(
        self,
        target: ServiceTarget,
        source: Workload | None,
        record: ConnectionRecord,
        where: str,
        send: MirrorSend,
    ) -> None:
        """One copy to ``target``: an endpoint by the mirror Service's own traffic control,
        its route, and ``send`` (the protocol's) within ``MIRROR_TIMEOUT``; then the
        endpoint's attempt settled and the outcome counted (``nodemesh_http_mirrored_total``).
        ``record`` is the client connection's (its source is the copy's)."""
        core, out = self.outbound.core, self.outbound
        snap = core.snapshot()
        service = self.router.traffic.service(snap, target.service)
        labels = source.labels if source is not None else None
        src_ip = record.source.rsplit(":", 1)[0]
        try:
            attempts = service.admit(src_ip, labels, (core.node, None))
        except Rejected:
            return  # counted by the Service's limits
        attempt: MirrorTry | None = None
        try:
            ip = attempts.next_endpoint()
            if ip is None:
                return
            route = out.resolver.endpoint_route(snap, source, target, ip)
            copied = replace(record)
            out.describe_route(snap, route, copied)
            attempt = MirrorTry(target, ip, route, copied, attempts)
            async with asyncio.timeout(MIRROR_TIMEOUT):
                await send(attempt)
        except (OSError, TunnelError, TimeoutError) as e:
            log.debug("%s: mirror to %s failed: %r", where, service_name(target), e)
        finally:
            outcome = attempt.outcome if attempt is not None else "failed"
            status = attempt.status if attempt is not None else 0
            attempts.finish(reset_before_data=outcome == "failed", server_error=status >= 500)
            service.count("http_mirror", outcome)
