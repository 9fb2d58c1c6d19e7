"""The numbers nodemesh agrees on: ports, marks, the routing table, the tc priority.

Each is defined here once. Python imports it; the BPF programs are compiled with the datapath's
share of them as ``-D`` defines (``agent.datapath.programs.Marks.cflags``), so the C side cannot
drift from the agent; ARCHITECTURE.md ("Ports, marks and data flows at a glance") lists them for
people. Some can be moved by flags (``--admin-address``, ``--metrics-port``, ``--ready-port``,
``--capture-mark``, ``--route-table``): the values here are then only defaults, and whatever
depends on them (loop protection, the capture programs) takes the configured value from
``agent.config.AgentConfig``.
"""

from __future__ import annotations

from enum import IntEnum

# The agent's listeners (transparent: they accept connections addressed to any IP).
OUTBOUND_PORT = 15001  # captured connections of meshed pods
INBOUND_PORT = 15006  # plaintext to a meshed pod from outside the mesh (PERMISSIVE only)
HBONE_PORT = 15008  # mTLS HTTP/2 CONNECT tunnels from other nodes

# The agent's HTTP endpoints, and the mesh CA.
ADMIN_PORT = 15000  # admin API, on 127.0.0.1 only
METRICS_PORT = 15020  # GET /metrics
READY_PORT = 15021  # GET /healthz/ready
CA_PORT = 15012  # gRPC over TLS
# the audience the agents' projected token is bound to (daemonset/agent.yaml), which the CA
# checks in Kubernetes mode (``nodemesh ca --token-audience``)
DEFAULT_TOKEN_AUDIENCE = "nodemesh-ca"
CA_METRICS_PORT = 15014  # the CA's /metrics (istiod's monitoring port)

# SO_MARK of every socket the proxy opens: the capture programs let marked packets pass.
PROXY_MARK = 0x539
# Packets the programs assigned to a proxy socket carry this mark; a rule sends them to a table
# whose only route is ``local 0.0.0.0/0 dev lo``, so they are delivered to that socket.
CAPTURE_MARK = 0x1539
ROUTE_TABLE = 1539
RULE_PRIORITY = ROUTE_TABLE  # the agent gives its rule the table's number (--route-table)
# Priority of the capture filters on clsact ingress (how they are told from other software's).
TC_PRIORITY = 1539


class Listener(IntEnum):
    """The three listeners, by the one name each has everywhere (the datapath, the proxy, the
    admin API); the value is the listener's slot in the programs' SOCKMAP (``NM_LISTENER_*``)."""

    OUTBOUND = 0  # OUTBOUND_PORT
    INBOUND = 1  # INBOUND_PORT: the plaintext inbound listener
    HBONE = 2  # HBONE_PORT
