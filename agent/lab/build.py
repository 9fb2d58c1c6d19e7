"""Create and remove the lab's namespaces and links with pyroute2.

Layout: a ``<lab>-switch`` namespace holds a bridge (the node segment); each node namespace gets
a veth to it (``eth0`` with the node IP) and, per pod, a veth whose host side ``pv<j>`` has a /32
route to the pod; the pod side is ``eth0`` with the pod IP as /32 and a default route through the
link-local gateway 169.254.1.1, resolved by a permanent neighbour entry (proxy ARP does not answer
for it, see DATAPATH.md). Nodes route each other's pod CIDRs through the segment and forward.
Nothing is added to the host's own namespace: every link is created inside a lab namespace.

All netlink work here is synchronous and must run outside an asyncio loop (pyroute2 0.9's
``IPRoute`` refuses a running loop). ``build`` is all-or-nothing for its caller: on any error the
caller runs ``teardown``, which is idempotent and needs only the plan (or just the lab name).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import signal
import time

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from agent.lab import netns
from agent.lab.topology import GATEWAY, SEGMENT, LabError, LabPlan, NodePlan, PodPlan

log = logging.getLogger(__name__)
BRIDGE = "br0"


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise LabError(f"interface {ifname} vanished while building the lab")
    return int(found[0])


def _mac(ipr: IPRoute, index: int) -> str:
    return str(ipr.get_links(index)[0].get_attr("IFLA_ADDRESS"))


def _veth_into(ipr: IPRoute, local: str, peer_ns: str, peer_name: str) -> int:
    """A veth ``local`` in ``ipr``'s namespace whose peer becomes ``peer_name`` in ``peer_ns``."""
    tmp = f"{local}p"
    ipr.link("add", ifname=local, kind="veth", peer=tmp)
    ipr.link("set", index=_index(ipr, tmp), net_ns_fd=peer_ns)
    with IPRoute(netns=peer_ns) as peer:
        peer.link("set", index=_index(peer, tmp), ifname=peer_name)
    return _index(ipr, local)


def _lo_up(ipr: IPRoute) -> None:
    ipr.link("set", index=_index(ipr, "lo"), state="up")


def _attach_to_switch(plan: LabPlan, port: str, target_ns: str, ip: str) -> None:
    with IPRoute(netns=plan.switch_netns) as sw:
        index = _veth_into(sw, port, target_ns, "eth0")
        sw.link("set", index=index, master=_index(sw, BRIDGE), state="up")
    with IPRoute(netns=target_ns) as ipr:
        _lo_up(ipr)
        eth0 = _index(ipr, "eth0")
        ipr.addr("add", index=eth0, address=ip, prefixlen=SEGMENT.prefixlen)
        ipr.link("set", index=eth0, state="up")


def _add_pod(plan: LabPlan, pod: PodPlan) -> None:
    node = next(n for n in plan.nodes if n.name == pod.node)
    with IPRoute(netns=node.netns) as ipr:
        host = _veth_into(ipr, pod.host_veth, pod.netns, "eth0")
        ipr.link("set", index=host, state="up")
        host_mac = _mac(ipr, host)
        with IPRoute(netns=pod.netns) as p:
            _lo_up(p)
            eth0 = _index(p, "eth0")
            p.addr("add", index=eth0, address=pod.ip, prefixlen=32)
            p.link("set", index=eth0, state="up")
            p.route("add", dst=f"{GATEWAY}/32", oif=eth0, scope="link")
            p.route("add", dst="0.0.0.0/0", gateway=GATEWAY, oif=eth0)
            p.neigh("add", dst=GATEWAY, lladdr=host_mac, ifindex=eth0, state="permanent")
            pod_mac = _mac(p, eth0)
        ipr.route("add", dst=f"{pod.ip}/32", oif=host, scope="link")
        ipr.neigh("add", dst=pod.ip, lladdr=pod_mac, ifindex=host, state="permanent")


def _route_between_nodes(plan: LabPlan, node: NodePlan) -> None:
    with IPRoute(netns=node.netns) as ipr:
        for other in plan.nodes:
            if other is not node:
                ipr.route("add", dst=other.pod_cidr, gateway=other.ip)
    netns.write_sysctl(node.netns, "net/ipv4/ip_forward", "1")


def build(plan: LabPlan) -> None:
    """Create every namespace and link of ``plan``. The caller tears down on failure."""
    try:
        for name in plan.netns_names():
            pr_netns.create(name)
        with IPRoute(netns=plan.switch_netns) as sw:
            _lo_up(sw)
            sw.link("add", ifname=BRIDGE, kind="bridge")
            sw.link("set", index=_index(sw, BRIDGE), state="up")
        for node in plan.nodes:
            _attach_to_switch(plan, node.switch_port, node.netns, node.ip)
        _attach_to_switch(plan, "swca", plan.ca_netns, plan.ca_ip)
        for pod in plan.pods:
            _add_pod(plan, pod)
        for node in plan.nodes:
            _route_between_nodes(plan, node)
    except (NetlinkError, OSError) as e:
        raise LabError(f"building lab {plan.lab} failed: {e}") from e


def address_on_bridge(plan: LabPlan, ip: str) -> None:
    """Give the switch's bridge the segment address ``ip``, so that a process in the switch
    namespace (the lab's Prometheus) reaches every node and the CA."""
    try:
        with IPRoute(netns=plan.switch_netns) as sw:
            index = _index(sw, BRIDGE)
            sw.addr("add", index=index, address=ip, prefixlen=SEGMENT.prefixlen)
    except (NetlinkError, OSError) as e:
        raise LabError(f"adding {ip} to the switch of lab {plan.lab} failed: {e}") from e


def lab_netns(lab: str) -> list[str]:
    """Every namespace named ``<lab>-...`` (lab names have no '-', so the prefix is exact)."""
    try:
        return sorted(n for n in os.listdir(netns.NETNS_DIR) if n.startswith(f"{lab}-"))
    except FileNotFoundError:
        return []


# An agent answers SIGTERM by draining its open connections for its --drain-seconds (5 by
# default) before it exits: the grace outlasts that, so a lab whose pods keep a connection open
# is not killed mid-drain (and warned about) at the very moment it would have exited.
STOP_GRACE = 8.0


def stop_processes(lab: str, pids: list[int], *, grace: float = STOP_GRACE) -> None:
    """SIGTERM the given PIDs and every process inside the lab's namespaces (all started by the
    lab or by ``lab exec``), then SIGKILL what is still there after ``grace`` seconds."""
    inodes = {i for i in (netns.inode(n) for n in lab_netns(lab)) if i is not None}
    targets = set(pids) | set(netns.pids_in(inodes))
    targets.discard(os.getpid())
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid in targets if _signal(pid, sig)]
        deadline = time.monotonic() + grace
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [pid for pid in alive if _exists(pid)]
        if not alive:
            return
        log.warning("lab %s: processes %s ignored SIGTERM; killing them", lab, alive)
        targets = set(alive)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def _exists(pid: int) -> bool:
    """Alive and not a zombie; a zombie child of this process (``lab up`` run in-process, as
    the test fixture does) is reaped here so that no process entry outlives ``down``.

    The reap comes after the look: a child that dies between a reap and the look would
    otherwise be taken for gone while its entry stays (a zombie of another parent is gone to
    us too: only its parent can remove it)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            alive = f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    if not alive:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    return alive


def teardown(lab: str, *, pids: list[int], pin_dirs: list[str], state_dir: str) -> None:
    """Remove everything of lab ``lab``: processes, namespaces (their links go with them),
    pinned BPF objects and the state directory. Safe to call any number of times."""
    stop_processes(lab, pids)
    for name in lab_netns(lab):
        try:
            pr_netns.remove(name)
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise LabError(f"cannot remove network namespace {name}: {e}") from e
    for path in pin_dirs:
        shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(state_dir, ignore_errors=True)
