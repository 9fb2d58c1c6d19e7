"""Policy routing for captured packets, and finding pods' and the node's interfaces.

A packet that a program assigned to a proxy socket still goes through the routing decision; its
destination is usually not a local address, so the kernel would forward it. The programs set
``capture_mark`` on it, and one rule sends marked packets to a table whose only route is
``local 0.0.0.0/0 dev lo``: every marked packet is delivered locally, to the assigned socket.
Both are created idempotently and removed by ``uninstall``.

Interfaces are found the way a veth-based CNI leaves them: a pod's host-side interface is the
one the node routes the pod's IP through (route lookup), not a naming convention.

Only the netlink helper (``agent.datapath.netlinkd``, a child process) runs these functions:
the agent process does not import pyroute2.
"""

from __future__ import annotations

import errno
import logging
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.datapath.netlink import RoutingConfig

log = logging.getLogger(__name__)


def _rule_present(ipr: IPRoute, cfg: RoutingConfig) -> bool:
    for rule in ipr.get_rules(family=socket.AF_INET):
        if rule.get_attr("FRA_FWMARK") == cfg.capture_mark and (
            rule.get_attr("FRA_TABLE") == cfg.table
        ):
            return True
    return False


def _route_present(ipr: IPRoute, cfg: RoutingConfig) -> bool:
    routes = ipr.get_routes(family=socket.AF_INET, table=cfg.table)
    return any(r["type"] == 2 and r["dst_len"] == 0 for r in routes)  # RTN_LOCAL


def _rule(cfg: RoutingConfig) -> dict[str, int]:
    return {
        "family": socket.AF_INET,
        "fwmark": cfg.capture_mark,
        "table": cfg.table,
        "priority": cfg.rule_priority,
    }


def _route(ipr: IPRoute, cfg: RoutingConfig) -> dict[str, object]:
    return {
        "dst": "0.0.0.0/0",
        "type": "local",
        "table": cfg.table,
        "oif": _lo(ipr),
        "scope": "host",
    }


def ensure(ipr: IPRoute, cfg: RoutingConfig) -> list[str]:
    """Create the rule and the local route if missing; returns what it created."""
    created = []
    if not _route_present(ipr, cfg):
        ipr.route("add", **_route(ipr, cfg))
        created.append(f"route local 0.0.0.0/0 dev lo table {cfg.table}")
    if not _rule_present(ipr, cfg):
        ipr.rule("add", **_rule(cfg))
        created.append(f"rule fwmark {cfg.capture_mark:#x} lookup {cfg.table}")
    return created


def remove(ipr: IPRoute, cfg: RoutingConfig) -> list[str]:
    """Remove the rule (every copy) and the route; returns what it removed."""
    removed = []
    while _rule_present(ipr, cfg):
        ipr.rule("del", **_rule(cfg))
        removed.append(f"rule fwmark {cfg.capture_mark:#x} lookup {cfg.table}")
    if _route_present(ipr, cfg):
        ipr.route("del", **_route(ipr, cfg))
        removed.append(f"route local 0.0.0.0/0 dev lo table {cfg.table}")
    return removed


def _lo(ipr: IPRoute) -> int:
    return int(ipr.link_lookup(ifname="lo")[0])


def interface_of(ipr: IPRoute, ip: str) -> int | None:
    """The interface the node routes ``ip`` through (a pod's host-side veth), or None."""
    try:
        routes = ipr.route("get", dst=ip)
    except NetlinkError as e:
        if e.code in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EINVAL):
            return None
        raise
    for r in routes:
        if r["type"] == 1:  # RTN_UNICAST; a local or blackhole answer is no pod
            oif = r.get_attr("RTA_OIF")
            return int(oif) if oif is not None else None
    return None


def uplinks(ipr: IPRoute, names: tuple[str, ...], exclude: set[int]) -> dict[int, str]:
    """The node's uplinks: the named ones, or else every up interface with a global IPv4
    address that is not loopback and not a pod's interface (``exclude``)."""
    links = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    if names:
        missing = [n for n in names if n not in links.values()]
        if missing:
            raise LookupError(
                f"uplink interface(s) {missing} do not exist in this network namespace "
                f"(have: {sorted(v for v in links.values())})"
            )
        return {i: n for i, n in links.items() if n in names}
    found = {}
    for addr in ipr.get_addr(family=socket.AF_INET):
        idx = addr["index"]
        if addr["scope"] == 0 and idx not in exclude and links.get(idx) != "lo":
            found[idx] = links[idx]
    return found
