"""What the kernel should hold: pure functions, no kernel access.

The reconciler feeds these this node's pods (``LocalPod``: plain data the agent derives from its
state, so the datapath does not depend on the state's model) and what it read from the kernel,
and applies the resulting plan; keeping the decision here means "running it twice changes
nothing" and "a pod that disappears loses its entries" are properties of plain data, tested
without root.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from agent.datapath.layout import PodEntry


@dataclass(frozen=True, slots=True)
class LocalPod:
    """A pod of this node with an IP, before its interface is known."""

    ip: str
    uid: str
    meshed: bool
    exclude_outbound: frozenset[int]
    exclude_inbound: frozenset[int]


@dataclass(frozen=True)
class Plan:
    """Changes that bring the kernel to the desired state."""

    put: tuple[PodEntry, ...] = ()
    delete: tuple[str, ...] = ()
    attach_pod: tuple[int, ...] = ()
    attach_uplink: tuple[int, ...] = ()
    detach: tuple[int, ...] = ()
    unresolved: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not (self.put or self.delete or self.attach_pod or self.attach_uplink or self.detach)


def plan(
    pods: Iterable[LocalPod],
    interface_of: Callable[[str], int | None],
    current_entries: Mapping[str, PodEntry],
    current_attached: Mapping[int, str],
    uplinks: Iterable[int],
) -> Plan:
    """Compare desired with current and list the differences.

    ``current_attached`` maps interface index -> the program name attached there
    (``nm_pod_ingress`` / ``nm_uplink_ingress``).
    """
    wanted: dict[str, PodEntry] = {}
    unresolved = []
    for pod in pods:
        ifindex = interface_of(pod.ip)
        if ifindex is None:
            unresolved.append(pod.ip)
            continue
        wanted[pod.ip] = PodEntry(
            pod.ip, ifindex, pod.meshed, pod.exclude_outbound, pod.exclude_inbound
        )
    pod_ifaces = {e.ifindex for e in wanted.values()}
    uplink_ifaces = set(uplinks) - pod_ifaces
    return Plan(
        put=tuple(e for ip, e in sorted(wanted.items()) if current_entries.get(ip) != e),
        delete=tuple(sorted(ip for ip in current_entries if ip not in wanted)),
        attach_pod=tuple(
            sorted(i for i in pod_ifaces if current_attached.get(i) != "nm_pod_ingress")
        ),
        attach_uplink=tuple(
            sorted(i for i in uplink_ifaces if current_attached.get(i) != "nm_uplink_ingress")
        ),
        detach=tuple(sorted(set(current_attached) - pod_ifaces - uplink_ifaces)),
        unresolved=tuple(sorted(unresolved)),
    )
