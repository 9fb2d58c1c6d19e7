"""Inbound plaintext (15006): connections from outside the mesh to a meshed pod of this node.

Admitted only where the destination's PeerAuthentication mode for the port is PERMISSIVE and
policy allows a source without identity (a plaintext caller has no principal, so only
``ipBlocks``-style rules can admit it). The proxy then connects to the pod with the caller's IP as
source, so the pod sees its real client. STRICT refuses with RST. On a port declared HTTP/1.1,
HTTP/2 or gRPC the requests are parsed and authorized one by one (``agent.proxy.http_inbound``,
``agent.proxy.h2inbound``), as on the HBONE path.

Any address that reaches a meshed pod may connect, so, as on 15008 (``agent.proxy.inbound``), one
client address holds at most ``InboundLimits.max_connections_per_peer`` connections at once (the
same setting, 256 by default, counted apart from 15008's: an HBONE peer is a node, a plaintext
client is not). One more is reset before anything else is done for it and counted as the
rejection ``peer_connection_limit`` (logged once while the client stays at the limit:
``conncaps.PeerSlots``); a slot is released when its connection's handler returns,
whichever way the connection ended. Without it a single client could open connections until the
agent ran out of file descriptors, and every other pod's traffic on the node with it. All clients
together are within the process's cap, checked when the connection is accepted
(``agent.base.conncaps``).
"""

from __future__ import annotations

import logging
import socket
from typing import NoReturn

from agent.base.conncaps import PeerSlots
from agent.policy.authz import Request
from agent.policy.peerauth import STRICT
from agent.proxy import sockets
from agent.proxy.core import Core
from agent.proxy.h2inbound import H2Session
from agent.proxy.hbone_limits import InboundLimits
from agent.proxy.http_inbound import HttpSession, SocketDownstream
from agent.proxy.records import Refused, cancel_current_task
from agent.proxy.relay import relay_sockets
from agent.state import Workload
from agent.state.protocols import HTTP, TCP
from agent.telemetry.records import INBOUND, ConnectionRecord

log = logging.getLogger(__name__)


class InboundPlaintext:
    def __init__(self, core: Core) -> None:
        self.core = core
        # Only ``max_connections_per_peer`` applies here (no TLS handshake, no HTTP/2 idle).
        self.limits = InboundLimits()
        self.peers = PeerSlots()  # connections being served, by client address

    async def handle(
        self, client: socket.socket, original_dst: tuple[str, int] | None = None
    ) -> None:
        """Serve one captured connection; ``original_dst`` overrides ``getsockname()`` (tests)."""
        addresses = sockets.captured_addresses(client, original_dst)
        if addresses is None:
            return
        src_ip, src_port, dst_ip, dst_port = addresses
        peers, most = self.peers, self.limits.max_connections_per_peer
        if peers.at_limit(src_ip, most):
            self.core.registry.reject(
                "peer_connection_limit",
                f"plaintext {src_ip}:{src_port} -> {dst_ip}:{dst_port}: {most} connections from "
                "that client already (more are counted, not logged, until one of them ends)",
                quiet=not peers.first_refusal(src_ip),
            )
            sockets.abort(client)
            return
        record = ConnectionRecord(
            INBOUND, f"{src_ip}:{src_port}", f"{dst_ip}:{dst_port}", path="plaintext"
        )
        conn_id = self.core.registry.add(record, cancel_current_task())
        peers.take(src_ip)  # released below, however the connection ends
        clean = False
        try:
            upstream, admitted = await self._admit(record, conn_id, src_ip, dst_ip, dst_port)
            try:
                if admitted is None:  # its reader takes the connect's over (``_admit``)
                    await relay_sockets(client, upstream, record)
                else:
                    request, workload, protocol = admitted
                    kind = HttpSession if protocol == HTTP else H2Session
                    down = SocketDownstream(client)
                    await kind(self.core, down, upstream, record, request, workload).serve()
                clean = True
            finally:
                upstream.close()  # no registration left: the relay's stop removed its reader
        except (OSError, Refused) as e:
            log.debug("plaintext %s -> %s ended: %s", record.source, record.destination, e)
        finally:
            self.core.registry.remove(conn_id)
            peers.release(src_ip)
            if clean:
                client.close()
            else:
                sockets.abort(client)

    async def _admit(
        self, record: ConnectionRecord, conn_id: int, src_ip: str, dst_ip: str, dst_port: int
    ) -> tuple[socket.socket, tuple[Request, Workload, str] | None]:
        """The connected pod socket; and, on a declared HTTP port, what each request is
        authorized with and the protocol (there the connection is admitted without the L7
        conditions)."""
        where = f"plaintext {record.source} -> {record.destination}"
        snap = self.core.snapshot()
        workload = self.core.local_workload(snap, dst_ip)
        if workload is None:
            self._refuse("not_local_workload", f"{where}: not a meshed workload on this node")
        if dst_port in self.core.settings.proxy_ports:
            self._refuse("proxy_port", f"{where}: port {dst_port} is the proxy's own")
        record.destination_identity = self.core.identity(workload, snap)
        policies = self.core.policies(snap)
        if policies.peerauth.mode(workload, dst_port) == STRICT:
            self._refuse("strict_mtls", f"{where}: PeerAuthentication is STRICT (mTLS required)")
        request = Request(src_ip, dst_ip, dst_port, None)
        protocol = self.core.protocol(snap, dst_ip, dst_port)
        http = protocol != TCP
        if not http:
            if not self.core.authorize(request, workload, where, snap):
                raise Refused(where)
            self.core.registry.authorized(conn_id, request, workload)
        s = self.core.settings
        try:
            # A TCP connection's relay starts on the pod socket before anything awaits: it
            # keeps the connect's poll handle (``sockets.connect``).
            upstream = await sockets.connect(
                (dst_ip, dst_port),
                mark=s.mark,
                timeout=s.connect_timeout,
                source_ip=src_ip,
                hold_reader=not http,
            )
        except (OSError, TimeoutError) as e:
            self._refuse("upstream_unreachable", f"{where}: {e!r}")
            raise
        return upstream, ((request, workload, protocol) if http else None)

    def _refuse(self, key: str, detail: str) -> NoReturn:
        self.core.registry.reject(key, detail)
        raise Refused(detail)
