"""The binary layout of the capture maps, mirrored from ``bpf/nodemesh.h`` with ctypes.

This is the one place that knows how a pod, a listener slot or a counter is laid out in the
kernel's maps, so that the rest of the datapath works with Python values. The encoders are pure
functions (tested without a kernel). ``LAYOUT_VERSION`` must equal ``NM_LAYOUT_VERSION`` in the
header; the loader refuses to start if they differ, because adopting pinned maps of another
layout would misread every entry.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

LAYOUT_VERSION = 5
MAX_EXCLUDED_PORTS = 16
POD_MESHED = 0x1
SETTING_FAIL_OPEN = 0x1


class Program(IntEnum):
    """The capture programs, in counter order (``NM_PROG_*``)."""

    POD_INGRESS = 0
    UPLINK_INGRESS = 1


class Counter(IntEnum):
    """Per-program decisions (``NM_CNT_*``)."""

    CAPTURED = 0
    OWNED = 1
    PASSED = 2
    EXEMPT = 3
    FAILED_CLOSED = 4
    FAILED_OPEN = 5
    TIME_WAIT = 6
    FRAGMENT = 7


class AddrKey(ctypes.Structure):
    """``struct nm_addr``: family + 16 address bytes, so IPv6 pods fit the same maps."""

    _fields_ = [("family", ctypes.c_uint32), ("addr", ctypes.c_uint8 * 16)]


PortArray = ctypes.c_uint16 * MAX_EXCLUDED_PORTS


class PodValue(ctypes.Structure):
    """``struct nm_pod``."""

    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("exclude_out", PortArray),
        ("exclude_in", PortArray),
    ]


class SettingsValue(ctypes.Structure):
    """``struct nm_settings``."""

    _fields_ = [("flags", ctypes.c_uint32)]


class SpliceLink(ctypes.Structure):
    """``struct nm_splice_link``: a spliced socket's peer (by cookie), the bytes redirected
    to it, the bytes kept for the proxy, the sequence number after the last byte passed on
    (the program's own) and the bytes of retransmitted segments it cut off."""

    _fields_ = [
        ("peer", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("kept", ctypes.c_uint64),
        ("next", ctypes.c_uint64),
        ("trimmed", ctypes.c_uint64),
    ]


class SpliceCredit(ctypes.Structure):
    """``struct nm_splice_credit``: how far the kernel may redirect, what the proxy took."""

    _fields_ = [("limit", ctypes.c_uint64), ("taken", ctypes.c_uint64)]


class LayoutError(ValueError):
    """A value that cannot be represented in the maps (too many exempt ports, bad address)."""


@dataclass(frozen=True, slots=True)
class PodEntry:
    """What the programs need to know about one local pod."""

    ip: str
    ifindex: int
    meshed: bool
    exclude_outbound: frozenset[int] = frozenset()
    exclude_inbound: frozenset[int] = frozenset()


def addr_key(ip: str) -> AddrKey:
    """The map key of an address: IPv4 in the first four bytes (network order), rest zero."""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError as e:
        raise LayoutError(f"{ip!r} is not an IP address") from e
    key = AddrKey()
    if parsed.version == 4:
        key.family = socket.AF_INET
    else:
        key.family = socket.AF_INET6
    packed = parsed.packed
    ctypes.memmove(key.addr, packed, len(packed))
    return key


def key_ip(key: AddrKey) -> str:
    """The inverse of ``addr_key``."""
    raw = bytes(key.addr)
    if key.family == socket.AF_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw))


def _ports(ports: Iterable[int], what: str, ip: str) -> ctypes.Array[ctypes.c_uint16]:
    ordered = sorted(ports)
    if len(ordered) > MAX_EXCLUDED_PORTS:
        raise LayoutError(
            f"pod {ip} excludes {len(ordered)} {what} ports; the datapath holds at most "
            f"{MAX_EXCLUDED_PORTS} per direction (shorten the nodemesh.io/exclude-{what}-ports "
            "annotation)"
        )
    bad = [p for p in ordered if not 0 < p < 65536]
    if bad:
        raise LayoutError(f"pod {ip}: {what} ports {bad} are outside 1-65535")
    return PortArray(*ordered)


def pod_value(entry: PodEntry) -> PodValue:
    return PodValue(
        flags=POD_MESHED if entry.meshed else 0,
        ifindex=entry.ifindex,
        exclude_out=_ports(entry.exclude_outbound, "outbound", entry.ip),
        exclude_in=_ports(entry.exclude_inbound, "inbound", entry.ip),
    )


def pod_entry(key: AddrKey, value: PodValue) -> PodEntry:
    """Decode a map entry back into a ``PodEntry`` (to compare kernel state with desired)."""
    return PodEntry(
        ip=key_ip(key),
        ifindex=value.ifindex,
        meshed=bool(value.flags & POD_MESHED),
        exclude_outbound=frozenset(p for p in value.exclude_out if p),
        exclude_inbound=frozenset(p for p in value.exclude_in if p),
    )


def counter_index(program: Program, counter: Counter) -> int:
    return int(program) * len(Counter) + int(counter)
