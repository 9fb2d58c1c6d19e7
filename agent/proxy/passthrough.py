"""What serves captured connections when the agent has no CA: plain TCP passthrough.

Without ``--ca-address`` the agent holds no certificates, so it can neither tunnel with mTLS
nor authorize a peer; it still has to serve what the programs capture, since dropping it would
break meshed pods. Every listener's connections go to their original destination
(``getsockname()``, as capture leaves it) from a socket with the proxy mark, copied both ways
by the proxy's relay, half-close included: the path the node proxy takes for destinations
outside the mesh, without policy, identities or telemetry. What it may hold is bounded where the
connections are accepted, as for the node proxy (``agent.base.conncaps``: per pod on 15001, the
process's cap), and there, since no node proxy does it, 15006 and 15008 also get the proxy's
per-address limit; the refusals are counted in ``nodemesh_rejected_connections_total``.
"""

from __future__ import annotations

import logging
import socket

from agent.base.constants import PROXY_MARK, Listener
from agent.proxy import sockets
from agent.proxy.relay import relay_sockets
from agent.proxy.resolve import looped
from agent.telemetry.records import INBOUND, OUTBOUND, ConnectionRecord

log = logging.getLogger(__name__)


class Passthrough:
    """Serves accepted connections of every listener the same way: to the original
    destination (``await passthrough.handle(sock, listener)`` for each)."""

    def __init__(self, *, mark: int = PROXY_MARK, connect_timeout: float = 10.0) -> None:
        self.mark = mark
        self.connect_timeout = connect_timeout

    async def handle(
        self,
        client: socket.socket,
        listener: Listener,
        original_dst: tuple[str, int] | None = None,
    ) -> None:
        """Relay ``client`` until both directions ended; ``original_dst`` overrides
        ``getsockname()`` (tests). The caller closes ``client``."""
        addresses = sockets.captured_addresses(client, original_dst)
        if addresses is None:
            return
        sockets.accepted(client)  # as the node proxy's listeners do (``ProxyComponent.handle``)
        src_ip, src_port, dst_ip, dst_port = addresses
        if looped(src_ip, dst_ip):
            log.info(
                "passthrough: %s:%d -> %s:%d refused: a connection from the node to itself is the "
                "passthrough's own, come back (it would loop)",
                src_ip,
                src_port,
                dst_ip,
                dst_port,
            )
            return
        try:
            upstream = await sockets.connect(
                (dst_ip, dst_port), mark=self.mark, timeout=self.connect_timeout
            )
        except (OSError, TimeoutError) as e:
            log.info("passthrough: %s:%d unreachable: %s", dst_ip, dst_port, e)
            return
        direction = OUTBOUND if listener is Listener.OUTBOUND else INBOUND
        record = ConnectionRecord(
            direction, f"{src_ip}:{src_port}", f"{dst_ip}:{dst_port}", path="passthrough"
        )
        try:
            await relay_sockets(client, upstream, record)
        except OSError as e:  # one side reset: the other learns it the same way
            log.debug("passthrough %s -> %s ended: %s", record.source, record.destination, e)
            sockets.abort(client)
        finally:
            upstream.close()
