"""The transparent listeners the capture programs hand connections to.

``IP_TRANSPARENT`` lets a socket accept connections addressed to any IP: a captured SYN keeps
its original destination, so ``getsockname()`` of the accepted socket *is* the original
destination and no lookup table is needed. The listening sockets are registered in the
programs' SOCKMAP (``Datapath.register_listeners``) and then served by the agent
(``agent.app``, with the node proxy).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from agent.base.constants import HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, Listener


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


def transparent_listener(port: int, backlog: int = 1024) -> socket.socket:
    """A non-blocking TCP listener on 0.0.0.0:``port`` that accepts any destination address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
        sock.bind(("0.0.0.0", port))
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


def open_listeners(ports: ListenerPorts) -> dict[Listener, socket.socket]:
    """All three listeners, or none (a failure closes the ones already open)."""
    opened: dict[Listener, socket.socket] = {}
    try:
        for slot, port in ports.by_slot().items():
            opened[slot] = transparent_listener(port)
    except OSError:
        for sock in opened.values():
            sock.close()
        raise
    return opened
