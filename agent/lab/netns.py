"""Entering network namespaces without leaving the host's mount namespace.

Why not ``ip netns exec``: it also unshares the mount namespace and remounts /sys, so a process
started that way cannot see the host's bpffs and its pins vanish with it (DATAPATH.md). The lab
only ever ``setns(CLONE_NEWNET)``: for child processes between fork and exec, for one-off calls
in a short-lived thread (a thread's network namespace is its own), and for sockets, which stay in
the namespace they were created in. Network namespace handles are the files that ``ip netns``
and pyroute2 keep under /run/netns, so the lab's namespaces are visible to ``ip netns list``.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def enter(name: str) -> None:
    """Move the calling thread (or a process between fork and exec) into network namespace
    ``name``. Only the network namespace changes."""
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into network namespace {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(name: str, func: Callable[..., T], *args: Any) -> T:
    """Run ``func(*args)`` in a new thread inside namespace ``name``; return or raise its result."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            enter(name)
            box["value"] = func(*args)
        except BaseException as e:  # handed to the caller's thread below
            box["error"] = e

    thread = threading.Thread(target=run, name=f"netns-{name}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    result: T = box["value"]
    return result


def write_sysctl(name: str, key: str, value: str) -> None:
    """Set a per-network-namespace sysctl (``net/ipv4/ip_forward``) inside ``name``."""

    def write() -> None:
        with open(f"/proc/sys/{key}", "w", encoding="ascii") as f:
            f.write(value)

    call_in(name, write)


def connect(name: str, host: str, port: int, *, timeout: float) -> socket.socket:
    """A TCP connection to ``host:port`` made from inside namespace ``name``."""

    def make() -> socket.socket:
        return socket.create_connection((host, port), timeout=timeout)

    return call_in(name, make)


def http_get(name: str, host: str, port: int, path: str, *, timeout: float) -> tuple[int, str]:
    """``GET path`` over a connection made inside ``name``: (status, body)."""
    sock = connect(name, host, port, timeout=timeout)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = sock
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def inode(name: str) -> int | None:
    """The namespace's inode (what /proc/PID/ns/net points at), or None if it is gone."""
    try:
        return os.stat(netns_path(name)).st_ino
    except FileNotFoundError:
        return None


def pids_in(inodes: set[int]) -> list[int]:
    """Processes whose network namespace is one of ``inodes``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                found.append(int(entry))
        except OSError:
            continue
    return found
