"""A minimal node for datapath tests: one node namespace with pods on veths, and a peer
namespace standing for another node (its "remote pod" address lives on its loopback).

    pod netns (eth0 10.x.1.N/32, gw 169.254.1.1) --veth-- node netns --link-- peer netns
                                                          up0 10.x.0.1      10.x.0.2, pod 10.x.2.2

Names carry a random suffix so concurrent test runs never collide; ``destroy`` removes every
namespace (and so every link, route and filter inside them).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000


def sh(*args: str, ns: str | None = None, check: bool = True) -> str:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True).stdout


@dataclass
class Topology:
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    octet: int = field(default_factory=lambda: 10 + secrets.randbelow(200))
    pods: dict[str, str] = field(default_factory=dict)  # name -> ip
    created: list[str] = field(default_factory=list)

    @property
    def node(self) -> str:
        return f"nmdp-n-{self.suffix}"

    @property
    def peer(self) -> str:
        return f"nmdp-p-{self.suffix}"

    @property
    def remote_ip(self) -> str:
        return f"10.{self.octet}.2.2"

    @property
    def node_ip(self) -> str:
        return f"10.{self.octet}.0.1"

    def ns(self, pod: str) -> str:
        return f"nmdp-{pod}-{self.suffix}"

    def _netns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.created.append(name)
        sh("ip", "link", "set", "lo", "up", ns=name)

    def build(self, pods: list[str]) -> None:
        self._netns(self.node)
        self._netns(self.peer)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=self.node)
        up, down = f"nmu{self.suffix}", f"nmd{self.suffix}"
        sh(
            "ip",
            "link",
            "add",
            up,
            "netns",
            self.node,
            "type",
            "veth",
            "peer",
            down,
            "netns",
            self.peer,
        )
        sh("ip", "link", "set", up, "name", "up0", ns=self.node)
        sh("ip", "addr", "add", f"{self.node_ip}/24", "dev", "up0", ns=self.node)
        sh("ip", "link", "set", "up0", "up", ns=self.node)
        sh("ip", "addr", "add", f"10.{self.octet}.0.2/24", "dev", down, ns=self.peer)
        sh("ip", "link", "set", down, "up", ns=self.peer)
        sh("ip", "addr", "add", f"{self.remote_ip}/32", "dev", "lo", ns=self.peer)
        sh(
            "ip",
            "route",
            "add",
            f"10.{self.octet}.2.0/24",
            "via",
            f"10.{self.octet}.0.2",
            ns=self.node,
        )
        sh("ip", "route", "add", f"10.{self.octet}.1.0/24", "via", self.node_ip, ns=self.peer)
        for i, pod in enumerate(pods, start=2):
            self.add_pod(pod, f"10.{self.octet}.1.{i}")

    def add_pod(self, pod: str, ip: str) -> None:
        ns = self.ns(pod)
        self._netns(ns)
        host = f"nmv{len(self.pods)}{self.suffix}"
        sh(
            "ip",
            "link",
            "add",
            host,
            "netns",
            self.node,
            "type",
            "veth",
            "peer",
            "eth0",
            "netns",
            ns,
        )
        sh("ip", "link", "set", host, "up", ns=self.node)
        sh("ip", "route", "add", f"{ip}/32", "dev", host, ns=self.node)
        sh("ip", "addr", "add", f"{ip}/32", "dev", "eth0", ns=ns)
        sh("ip", "link", "set", "eth0", "up", ns=ns)
        mac = sh("cat", f"/sys/class/net/{host}/address", ns=self.node).strip()
        sh("ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link", ns=ns)
        sh("ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0", ns=ns)
        sh(
            "ip",
            "neigh",
            "add",
            "169.254.1.1",
            "lladdr",
            mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
            ns=ns,
        )
        self.pods[pod] = ip

    def destroy(self) -> None:
        for name in reversed(self.created):
            sh("ip", "netns", "del", name, check=False)
        self.created.clear()


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the block with the calling *thread* in network namespace ``ns`` (setns of net
    only, so bpffs stays the host's); restores the thread's namespace afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
        try:
            yield
        finally:
            libc.setns(original, CLONE_NEWNET)
    finally:
        os.close(target)
        os.close(original)
