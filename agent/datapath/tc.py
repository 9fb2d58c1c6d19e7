"""Attach the capture programs to interfaces with tc (clsact ingress, direct action).

Our filter is recognised by its priority (``TC_PRIORITY``) and program name on the clsact ingress
hook, so that other software's filters on the same interface are never touched.
Attaching uses ``replace``: on an interface that already has our filter (an adopted generation,
or an older one being upgraded) the kernel swaps the program atomically, so no packet passes
between the old and the new program. Removing our filter removes the clsact qdisc only when no
other filter is left on it, leaving the interface as it was before the agent came.

Only the netlink helper (``agent.datapath.netlinkd``, a child process) runs these functions:
the agent process does not import pyroute2.
"""

from __future__ import annotations

import errno
import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.base.constants import TC_PRIORITY
from agent.datapath.netlink import AttachError

log = logging.getLogger(__name__)

INGRESS = 0xFFFFFFF2
EGRESS = 0xFFFFFFF3
PROGRAM_NAMES = ("nm_pod_ingress", "nm_uplink_ingress")


def _ensure_clsact(ipr: IPRoute, ifindex: int) -> None:
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


def attach(ipr: IPRoute, ifindex: int, prog_fd: int, name: str) -> None:
    """Put program ``prog_fd`` on ``ifindex``'s ingress, replacing our previous one."""
    try:
        _ensure_clsact(ipr, ifindex)
        ipr.tc(
            "replace-filter",
            "bpf",
            ifindex,
            ":1",
            fd=prog_fd,
            name=name,
            parent="ffff:fff2",
            classid=1,
            direct_action=True,
            prio=TC_PRIORITY,
        )
    except NetlinkError as e:
        raise AttachError(
            f"attaching {name} to interface index {ifindex} failed: {e}; the interface may "
            "have gone away (pod deleted) or tc may be restricted in this network namespace"
        ) from e


def _filter_name(msg: object) -> str | None:
    options = msg.get_attr("TCA_OPTIONS")  # type: ignore[attr-defined]
    return options.get_attr("TCA_BPF_NAME") if options else None


def _filters(ipr: IPRoute, ifindex: int, parent: int) -> list[object]:
    try:
        return [f for f in ipr.get_filters(index=ifindex, parent=parent) if f.get("handle")]
    except NetlinkError as e:
        if e.code in (errno.EINVAL, errno.ENODEV, errno.ENOENT):
            return []
        raise


def ours(ipr: IPRoute, ifindex: int) -> str | None:
    """The name of our program attached to ``ifindex``'s ingress, if any."""
    for f in _filters(ipr, ifindex, INGRESS):
        name = _filter_name(f)
        if f["info"] >> 16 == TC_PRIORITY and name in PROGRAM_NAMES:  # type: ignore[index]
            return name
    return None


def attached_interfaces(ipr: IPRoute) -> dict[int, str]:
    """Every interface of this network namespace carrying one of our filters."""
    found = {}
    for link in ipr.get_links():
        name = ours(ipr, link["index"])
        if name:
            found[link["index"]] = name
    return found


def detach(ipr: IPRoute, ifindex: int) -> bool:
    """Remove our filter from ``ifindex``; drop clsact if nothing else uses it. False if absent."""
    if ours(ipr, ifindex) is None:
        return False
    try:
        ipr.tc("del-filter", "bpf", ifindex, ":1", parent="ffff:fff2", prio=TC_PRIORITY)
        if not _filters(ipr, ifindex, INGRESS) and not _filters(ipr, ifindex, EGRESS):
            ipr.tc("del", "clsact", ifindex)
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            return False
        raise AttachError(f"removing our tc filter from interface index {ifindex}: {e}") from e
    return True
