"""Test harness: the datapath of one lab node run in-process, with listeners that record.

The datapath runs in a worker thread that entered the node's network namespace (setns of net
only, so bpffs stays the host's; the rest of the test process is unaffected), exactly as the
agent runs it inside a lab node. Its listeners answer every captured connection with one line,
``<LISTENER> <original destination ip>:<port>``, so a client in a pod can tell whether its
connection was captured, by which listener, and that ``getsockname()`` is the original
destination. Pods' servers answer ``server <peer ip>`` instead, so an uncaptured connection
is just as visible.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from agent.base.constants import Listener
from agent.datapath.datapath import Datapath, DatapathConfig, uninstall
from agent.datapath.listeners import ListenerPorts, open_listeners
from agent.datapath.routing import RoutingConfig
from agent.lab import netns
from agent.lab.handle import Lab
from agent.sources.document import load_document
from agent.state import StateStore
from agent.wiring import local_pods

T = TypeVar("T")

TOPOLOGY = """\
nodes:
  - name: node1
    pods:
      - {name: client, namespace: default, serviceAccount: client, labels: {app: client},
         annotations: {nodemesh.io/mesh: enabled, nodemesh.io/exclude-outbound-ports: "9090"}}
      - {name: neighbor, namespace: default, serviceAccount: neighbor, labels: {app: neighbor},
         annotations: {nodemesh.io/mesh: enabled, nodemesh.io/exclude-inbound-ports: "7070"}}
      - {name: outsider, namespace: default, serviceAccount: outsider, labels: {app: outsider},
         annotations: {}}
  - name: node2
    pods:
      - {name: server, namespace: default, serviceAccount: server, labels: {app: server},
         annotations: {nodemesh.io/mesh: enabled}}
      - {name: plain, namespace: default, serviceAccount: plain, labels: {app: plain},
         annotations: {}}
"""

# One connection from a pod: print the first line the other side sends, or ERR <reason>.
CLIENT = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.settimeout(float(sys.argv[3]))
    print(s.makefile().readline().strip() or "ERR empty")
except OSError as e:
    print("ERR", type(e).__name__)
"""

# argv[2] "transparent": bound with IP_TRANSPARENT (as a proxy of its own would be), so it may
# answer for any address.
SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if sys.argv[2:] == ["transparent"]:
    s.setsockopt(socket.SOL_IP, socket.IP_TRANSPARENT, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("listening", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(("server %s\\n" % peer[0]).encode())
    c.close()
"""


class NodeDatapath:
    """The datapath of ``node`` in ``lab``, driven from the test."""

    def __init__(self, lab: Lab, node: str, *, fail_open: bool = False) -> None:
        self.lab = lab
        self.node = node
        self.netns = lab.netns(node)
        self.pin_dir = Path(f"/sys/fs/bpf/nodemesh/{lab.name}-{node}-test")
        self.routing = RoutingConfig()
        self.store = StateStore()
        self.reload_state()
        self.config = DatapathConfig(pin_dir=self.pin_dir, fail_open=fail_open)
        self._worker = ThreadPoolExecutor(1, initializer=netns.enter, initargs=(self.netns,))
        self.datapath: Datapath | None = None
        self.listeners: dict[Listener, socket.socket] = {}
        self.accepted: list[tuple[Listener, tuple[str, int], tuple[str, int]]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def in_node(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in the node's network namespace (the worker thread)."""
        return self._worker.submit(fn, *args).result(timeout=120)

    def reload_state(self) -> None:
        state = load_document(self.lab.state_dir / "cluster.yaml").to_state()
        with self.store.update() as txn:
            txn.replace("namespaces", state.namespaces)
            txn.replace("workloads", state.workloads)

    def annotate(self, pod: str, **changes: Any) -> None:
        """Change a pod's workload in the store (``meshed=``, ``exclude_outbound_ports=``...)."""
        w = self.store.snapshot().workloads[f"default/{pod}"]
        if "meshed" in changes:
            changes["mesh_annotation"] = "enabled" if changes.pop("meshed") else "disabled"
        with self.store.update() as txn:
            txn.put_workload(dataclasses.replace(w, **changes))

    def start(self, *, listeners: bool = True) -> Datapath:
        self.datapath = Datapath(self.config)
        self.in_node(self.datapath.start)
        if listeners:
            self.open_listeners()
        self.reconcile()
        return self.datapath

    def reconcile(self) -> Any:
        assert self.datapath is not None
        pods = local_pods(self.store.snapshot(), self.node)
        return self.in_node(self.datapath.reconcile, pods)

    def open_listeners(self) -> None:
        assert self.datapath is not None
        self.listeners = self.in_node(open_listeners, ListenerPorts())
        self.datapath.register_listeners(self.listeners)
        self._stop.clear()
        for slot, sock in self.listeners.items():
            t = threading.Thread(target=self._record, args=(slot, sock), daemon=True)
            t.start()
            self._threads.append(t)

    def close_listeners(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads.clear()
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()

    def _record(self, slot: Listener, sock: socket.socket) -> None:
        sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, peer = sock.accept()
            except TimeoutError:
                continue
            with conn:
                dst = conn.getsockname()
                self.accepted.append((slot, peer, dst))
                conn.sendall(f"{slot.name} {dst[0]}:{dst[1]}\n".encode())

    def stop(self) -> None:
        """Close everything and uninstall; safe to call twice and after a failed start."""
        self.close_listeners()
        if self.datapath is not None:
            self.datapath.close()
            self.datapath = None
        self.in_node(uninstall, self.pin_dir, self.routing)
        self._worker.shutdown()


def pod_ip(lab: Lab, pod: str) -> str:
    return str(lab.pod(pod)["ip"])


def connect(lab: Lab, pod: str, ip: str, port: int, timeout: float = 3.0) -> str:
    """One TCP connection from ``pod``: the first line it received, or ``ERR <reason>``."""
    out = lab.exec(
        pod, "python3", "-c", CLIENT, ip, str(port), str(timeout),
        capture_output=True, text=True, timeout=timeout + 10,
    )  # fmt: skip
    return out.stdout.strip()


def serve(lab: Lab, pod: str, port: int, *, transparent: bool = False) -> subprocess.Popen[str]:
    """A server in ``pod`` (or a node) answering ``server <peer ip>``; ``transparent``: bound
    with ``IP_TRANSPARENT``. The caller kills it."""
    extra = ("transparent",) if transparent else ()
    proc = lab.popen(
        pod, "python3", "-c", SERVER, str(port), *extra, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
    return proc


def snapshot(lab: Lab, node: str, pin_dir: Path) -> dict[str, str]:
    """Everything the datapath could leave behind in ``node``: tc, rules, routes, bpffs."""

    def run(*cmd: str) -> str:
        return lab.exec(node, *cmd, capture_output=True, text=True, check=True).stdout

    links = [ln.split(":")[1].strip().split("@")[0] for ln in run("ip", "-o", "link").splitlines()]
    state = {
        "qdisc": run("tc", "qdisc", "show"),
        "rules": run("ip", "rule", "show"),
        "routes": run("ip", "-4", "route", "show", "table", "all"),  # v6 link-local churns
        "bpffs": "\n".join(sorted(str(p) for p in pin_dir.rglob("*"))) if pin_dir.exists() else "",
    }
    for link in links:
        for hook in ("ingress", "egress"):
            state[f"tc {link} {hook}"] = run("tc", "filter", "show", "dev", link, hook)
    return state
