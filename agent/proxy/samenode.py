"""A meshed pod addressing a pod of its own node directly on a port declared HTTP (same node).

Across nodes such a connection is L4 at the source and parsed at the destination, which
authorizes each request (L7 policy, rate limits) and reports it with ``reporter="destination"``.
On one node no other proxy is on the path. Before this module the connection was relayed as L4
(with ``--splice``, by the kernel): the port's policy was evaluated at connect, where an ALLOW
rule on paths or methods never matches and a DENY rule on them refuses the whole connection, and
no request was reported by either reporter. Now the node does what the destination node would:
the destination's HTTP session (``HttpSession`` for HTTP/1.1, ``H2Session`` for HTTP/2 and gRPC)
serves the client's socket, authorizes and rate-limits each request, and each request is
reported by both reporters once: ``source`` on the client's outbound record, as the source's
HTTP path reports (a refusal without the destination's ``RBAC``/``RL``, as a far node's 403 or
429 reaches that path), and ``destination`` on the record the destination would hold
(``same_node_destination``). That one is the connection's registered record, so the TCP
metrics count the connection as the far node counts a parsed one (``reporter="destination"``;
the source's HTTP connections are left out of them), and the central view keeps its edge.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from agent.policy.authz import Request
from agent.proxy import sockets
from agent.proxy.h2inbound import H2Session
from agent.proxy.http1 import NO_FLAGS
from agent.proxy.http_inbound import REFUSAL_FLAGS, HttpSession, SocketDownstream
from agent.proxy.records import Refused, cancel_current_task
from agent.proxy.resolve import Route
from agent.state.protocols import HTTP
from agent.telemetry.records import ConnectionRecord, RequestRecord, same_node_destination

if TYPE_CHECKING:
    from agent.proxy.outbound import Outbound

log = logging.getLogger(__name__)


async def serve_same_node_http(
    outbound: Outbound, client: socket.socket, record: ConnectionRecord, route: Route, protocol: str
) -> None:
    """Serve ``client`` (its outbound ``record``, pointed at ``route``, a same-node pod port
    declared ``protocol``) until it ends; closes ``client`` (reset unless it ended cleanly)."""
    core = outbound.core
    src_ip = record.source.rsplit(":", 1)[0]
    where = f"{record.source} -> {record.destination} (same node)"
    served = served_record(record, "", protocol)  # no CONNECT names a Service for a pod IP
    conn_id = record.id = core.registry.add(served, cancel_current_task())
    clean = False
    try:
        try:
            # A proxy port is refused there; each request is authorized by the session below.
            upstream = await outbound.open(route, record, src_ip, conn_id, requests_authorized=True)
        except (OSError, TimeoutError) as e:
            outbound.count_failure(e, route, record)
            raise
        assert isinstance(upstream, socket.socket)  # a local route: a plain socket
        try:
            await serve_requests(outbound, client, upstream, record, served, route, protocol)
            clean = True
        finally:
            upstream.close()
    except (OSError, Refused) as e:
        log.debug("%s ended: %s", where, e)
    finally:
        core.registry.remove(conn_id)
        if clean:
            client.close()
        else:
            sockets.abort(client)


def served_record(sent: ConnectionRecord, service: str, protocol: str) -> ConnectionRecord:
    """The destination's record of ``sent`` (``same_node_destination``), both marked with the
    declared ``protocol``: register it before serving the requests."""
    sent.protocol = "http/1.1" if protocol == HTTP else "http/2"
    return same_node_destination(sent, service)


async def serve_requests(
    outbound: Outbound,
    client: socket.socket,
    upstream: socket.socket,
    sent: ConnectionRecord,
    served: ConnectionRecord,
    route: Route,
    protocol: str,
) -> None:
    """Serve the requests of ``client`` to ``upstream`` (the same-node pod ``route`` points
    at, connected without its L7 conditions) with the destination's session, reporting each on
    ``sent`` (the source's record) and ``served`` (the destination's, registered by the
    caller), until the client's connection ends. Raises ``OSError``/``Refused`` as the session
    does; closes neither socket."""
    assert route.target is not None
    src_ip = sent.source.rsplit(":", 1)[0]
    # Admitted without the L7 conditions, which only a request can satisfy: each one is
    # authorized by the session (``RequestAdmission``), as at the destination.
    request = Request(src_ip, route.ip, route.port, sent.source_identity)
    kind = HttpSession if protocol == HTTP else H2Session
    core = outbound.core
    session = kind(core, SocketDownstream(client), upstream, served, request, route.target)
    session.report = _both_reporters(outbound, sent)
    await session.serve()


def _both_reporters(
    outbound: Outbound, sent: ConnectionRecord
) -> Callable[[ConnectionRecord, RequestRecord], None]:
    """The session's ``report``: a request on ``sent`` (the source's record), then on the
    session's own (the destination's). A refusal's flag (``RBAC``, ``RL``) is the destination's
    alone: the source reports it as the source's HTTP path reports a far node's 403 or 429,
    a plain response."""
    request_done = outbound.core.registry.request_done

    def report(connection: ConnectionRecord, request: RequestRecord) -> None:
        if request.response_flags in REFUSAL_FLAGS:
            request_done(sent, replace(request, response_flags=NO_FLAGS))
        else:
            request_done(sent, request)
        request_done(connection, request)

    return report
