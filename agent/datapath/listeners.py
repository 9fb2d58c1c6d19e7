"""The transparent listeners the capture programs hand connections to.

``IP_TRANSPARENT`` lets a socket accept connections addressed to any IP: a captured SYN keeps
its original destination, so ``getsockname()`` of the accepted socket *is* the original
destination and no lookup table is needed. The listening sockets are registered in the
programs' SOCKMAP (``Datapath.register_listeners``) and then served by the agent
(``agent.app``, with the node proxy).

The port a listener is bound to is only its name: the programs hand it SYNs through the SOCKMAP,
whatever their destination port. So during an upgrade the successor binds ephemeral ports when
the predecessor still holds 15001/15006/15008 (``beside_another``), and registering its sockets
in the SOCKMAP is what moves new connections to it. ``SO_REUSEPORT`` would be wrong here: since
Linux 6.5 ``bpf_sk_assign`` to a listener in a reuseport group re-selects among the group (new
SYNs would be spread over both agents), and older kernels refuse to assign to such a listener.

That re-selection is what ``nodemesh agent --workers N`` uses (``open_listener_groups``): N
listeners per port in one reuseport group, one per worker process, of which only the first is
registered in the SOCKMAP; the kernel picks the member for each new SYN by its flow hash
(ARCHITECTURE.md, "Workers").
"""

from __future__ import annotations

import errno
import logging
import socket
from dataclasses import dataclass

from agent.base.constants import HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, Listener

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListenerPorts:
    outbound: int = OUTBOUND_PORT
    inbound: int = INBOUND_PORT
    hbone: int = HBONE_PORT

    def by_slot(self) -> dict[Listener, int]:
        return {
            Listener.OUTBOUND: self.outbound,
            Listener.INBOUND: self.inbound,
            Listener.HBONE: self.hbone,
        }


def transparent_listener(
    port: int, backlog: int = 1024, *, beside_another: bool = False, reuseport: bool = False
) -> socket.socket:
    """A non-blocking TCP listener on 0.0.0.0:``port`` that accepts any destination address;
    on an ephemeral port instead when ``beside_another`` agent still holds ``port``; in the
    port's reuseport group with ``reuseport``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as e:
            if not (beside_another and e.errno == errno.EADDRINUSE):
                raise
            sock.bind(("0.0.0.0", 0))
            log.info(
                "port %d is held by the agent being replaced: listening on %d (the programs "
                "reach a listener through the SOCKMAP, whatever its port)",
                port,
                sock.getsockname()[1],
            )
        sock.listen(backlog)
        sock.setblocking(False)
    except PermissionError as e:
        sock.close()
        raise PermissionError(
            e.errno, f"IP_TRANSPARENT listener on port {port} needs CAP_NET_ADMIN (run as root)"
        ) from e
    except OSError as e:
        sock.close()
        raise OSError(
            e.errno,
            f"cannot listen on port {port}: {e.strerror}; is another agent or process using it "
            "in this network namespace?",
        ) from e
    return sock


def open_listeners(
    ports: ListenerPorts, *, beside_another: bool = False
) -> dict[Listener, socket.socket]:
    """All three listeners, or none (a failure closes the ones already open)."""
    opened: dict[Listener, socket.socket] = {}
    try:
        for slot, port in ports.by_slot().items():
            opened[slot] = transparent_listener(port, beside_another=beside_another)
    except OSError:
        for sock in opened.values():
            sock.close()
        raise
    return opened


def open_listener_groups(
    ports: ListenerPorts, members: int, *, beside_another: bool = False
) -> dict[Listener, list[socket.socket]]:
    """``members`` listeners per port, each port's in one ``SO_REUSEPORT`` group (one per
    worker); all of them or none. ``beside_another`` agent (an upgrade): on an ephemeral port
    per group, never trying the configured ones, since a reuseport bind there would join the
    running agent's group when it runs workers too (its new SYNs would reach this agent before
    the takeover)."""
    opened: dict[Listener, list[socket.socket]] = {}
    try:
        for slot, port in ports.by_slot().items():
            group = opened[slot] = []
            for _ in range(members):
                at = group[0].getsockname()[1] if group else 0 if beside_another else port
                group.append(transparent_listener(at, reuseport=True))
    except OSError:
        for group in opened.values():
            for sock in group:
                sock.close()
        raise
    return opened
