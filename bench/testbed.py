"""The bench's lab: two nodes, meshed and unmeshed pods, echo and iperf3 servers, stunnel4.

One lab serves every path, so all of them share the same namespaces, veths, node link and
processes on the same cores:

    direct           outsider (node1, unmeshed) -> plain (node2, unmeshed)
    nodemesh cross   client (node1, meshed) -> server (node2, meshed): HBONE mTLS, both proxies
    nodemesh same    client (node1, meshed) -> neighbor (node1, meshed): one proxy, no TLS
    stunnel4         outsider -> node1 stunnel -> mTLS -> node2 stunnel -> plain

and the HTTP/1.1 workload's six (``HttpPath``), to one HTTP server program:

    direct           outsider -> plain:8000
    nodemesh L4      client -> server:8001, a port nothing declares HTTP: opaque bytes over HBONE
    nodemesh HTTP    client -> server:8000, declared by the pod annotation
                     ``nodemesh.io/http-ports``: node2's agent parses, authorizes and counts
                     every request
    Service L4       client -> Service bench-l4:80 -> server:8001 (balanced per connection)
    Service HTTP     client -> Service bench-http:80 -> server:8000, declared by the Service
                     port: node1's agent terminates HTTP and routes each request, node2's
                     parses it again (what a client of a Service on an HTTP port gets)
    Service routed   client -> Service bench-routed:80 -> server:8000, through an HTTPRoute
                     attached to it: a header match rule (``x-bench-canary: true`` -> bench-v2,
                     which the bench's requests do not send, so every request evaluates it and
                     falls through), then a 90/10 split between Services bench-v1 and bench-v2
                     with retries on 503 enabled (GEP-1731). Both backends select the same
                     server pod, so it differs from Service HTTP only by routing

The unmeshed pods are the stunnel path's ends too, so stunnel's numbers differ from direct only by
the tunnel. Client namespaces get ``tcp_tw_reuse=1`` and a wide local port range: the
connection-rate workload opens tens of thousands of short connections per run, and TIME_WAIT
would otherwise exhaust the ports of the later repetitions and paths.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from agent.lab import components, control, netns
from agent.lab.handle import Lab
from bench import stunnel

REPO = Path(__file__).resolve().parent.parent
MESH = "{nodemesh.io/mesh: enabled}"
HTTP_PORT = 8000  # declared HTTP/1.1 on the server pod
HTTP_L4_PORT = 8001  # the same server program on a port left undeclared (opaque L4)
SVC_L4 = "bench-l4"  # Service port 80 -> 8001: balanced per connection, opaque bytes
SVC_HTTP = "bench-http"  # Service port 80 -> 8000 declared HTTP: parsed at both nodes
SVC_ROUTED = "bench-routed"  # like bench-http, with an HTTPRoute: match, 90/10 split, retry
ROUTE_BACKENDS = ("bench-v1", "bench-v2")  # the split's Services, both selecting the server
TOPOLOGY = f"""\
nodes:
  - name: node1
    pods:
      - {{name: client, namespace: default, serviceAccount: client, annotations: {MESH}}}
      - {{name: neighbor, namespace: default, serviceAccount: neighbor, annotations: {MESH}}}
      - {{name: outsider, namespace: default, serviceAccount: outsider}}
  - name: node2
    pods:
      - {{name: server, namespace: default, serviceAccount: server, labels: {{app: server}},
         annotations: {{nodemesh.io/mesh: enabled, nodemesh.io/http-ports: "{HTTP_PORT}"}}}}
      - {{name: plain, namespace: default, serviceAccount: plain}}
services:
  - {{name: {SVC_L4}, namespace: default, selector: {{app: server}},
     ports: [{{port: 80, targetPort: {HTTP_L4_PORT}}}]}}
  - {{name: {SVC_HTTP}, namespace: default, selector: {{app: server}},
     ports: [{{port: 80, targetPort: {HTTP_PORT}, name: http, appProtocol: http}}]}}
  - {{name: {SVC_ROUTED}, namespace: default, selector: {{app: server}},
     ports: [{{port: 80, targetPort: {HTTP_PORT}, name: http, appProtocol: http}}]}}
  - {{name: {ROUTE_BACKENDS[0]}, namespace: default, selector: {{app: server}},
     ports: [{{port: 80, targetPort: {HTTP_PORT}, name: http, appProtocol: http}}]}}
  - {{name: {ROUTE_BACKENDS[1]}, namespace: default, selector: {{app: server}},
     ports: [{{port: 80, targetPort: {HTTP_PORT}, name: http, appProtocol: http}}]}}
routes:
  - apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {{name: {SVC_ROUTED}, namespace: default}}
    spec:
      parentRefs: [{{group: "", kind: Service, name: {SVC_ROUTED}, port: 80}}]
      rules:
        - matches: [{{headers: [{{name: x-bench-canary, value: "true"}}]}}]
          backendRefs: [{{name: {ROUTE_BACKENDS[1]}, port: 80}}]
        - backendRefs:
            - {{name: {ROUTE_BACKENDS[0]}, port: 80, weight: 90}}
            - {{name: {ROUTE_BACKENDS[1]}, port: 80, weight: 10}}
          retry: {{attempts: 2, codes: [503], backoff: 10ms}}
"""
ECHO_PORT = 7000
IPERF_PORT = 5201
STUNNEL_CLIENT_OFFSET = 20000  # node1 accepts on 27000 / 25201
STUNNEL_SERVER_OFFSET = 30000  # node2 accepts on 37000 / 35201


@dataclass(frozen=True)
class BenchPath:
    key: str
    title: str
    client: str  # pod the client programs run in
    host: str  # address they dial
    echo_port: int
    iperf_port: int
    target: str  # pod that answers
    proxy_pids: tuple[int, ...]  # processes whose CPU and memory are the path's cost
    wire: str  # "plaintext" or "tls" on the node link, "local" when it never leaves node1
    agent_path: str | None  # how node1's agent must record it ("hbone", "local"), None: never
    fds_per_connection: int  # sockets one proxy process holds per proxied connection, at most


@dataclass(frozen=True)
class HttpPath:
    key: str
    title: str
    client: str
    host: str
    port: int
    proxy_pids: tuple[int, ...]
    declared: bool  # node2's agent parses the requests (an HTTP port) or relays bytes (L4)


class Testbed:
    """Context manager: builds everything on enter, removes everything on exit."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or "bn" + secrets.token_hex(3)
        self.lab: Lab | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.echo_pids: dict[str, int] = {}  # pod → its echo server's PID (CPU per connection)
        self.paths: list[BenchPath] = []
        self.http_paths: list[HttpPath] = []
        self.stunnel_pids: tuple[int, ...] = ()

    def __enter__(self) -> Testbed:
        # Children (agents, stunnel, clients) inherit the lifted soft limit.
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        try:
            self.lab = Lab.up(self.name, topology=TOPOLOGY, timeout=120)
            self._tune()
            self._start_servers()
            self.stunnel_pids = self._start_stunnel()
            self.paths, self.http_paths = self._paths(), self._http_paths()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for proc in self.procs:
            stop(proc)
        if self.lab is not None:
            self.lab.down()

    @property
    def the_lab(self) -> Lab:
        if self.lab is None:
            raise RuntimeError("the testbed is not up")
        return self.lab

    def popen(self, target: str, *argv: str, **kw: object) -> subprocess.Popen[bytes]:
        """A bench program (``bench.programs.<name>``) or a tool inside ``target``'s netns."""
        proc = self.the_lab.popen(target, *argv, cwd=str(REPO), **kw)
        self.procs.append(proc)
        return proc

    def _tune(self) -> None:
        for pod in ("client", "outsider"):
            name = self.the_lab.netns(pod)
            netns.write_sysctl(name, "net/ipv4/tcp_tw_reuse", "1")
            netns.write_sysctl(name, "net/ipv4/ip_local_port_range", "1024 65000")

    def _start_servers(self) -> None:
        for pod in ("server", "neighbor", "plain"):
            with self.log_file(f"{pod}-echo") as out:
                echo = self.popen(pod, sys.executable, "-m", "bench.programs.echo_server",
                                  "--port", str(ECHO_PORT), stdout=out, stderr=out)  # fmt: skip
            self.echo_pids[pod] = echo.pid
            with self.log_file(f"{pod}-iperf3") as out:
                self.popen(pod, "iperf3", "-s", "-p", str(IPERF_PORT), stdout=out, stderr=out)
        for pod, ports in (("server", (HTTP_PORT, HTTP_L4_PORT)), ("plain", (HTTP_PORT,))):
            flags = [arg for port in ports for arg in ("--port", str(port))]
            with self.log_file(f"{pod}-http") as out:
                self.popen(pod, sys.executable, "-m", "bench.programs.http_server", *flags,
                           stdout=out, stderr=out)  # fmt: skip

    def log_file(self, name: str) -> IO[bytes]:
        """An append-mode log file ``<lab state>/logs/bench-<name>.log`` for a child's output."""
        return open(Path(self.the_lab.state_dir) / "logs" / f"bench-{name}.log", "ab")

    def _start_stunnel(self) -> tuple[int, ...]:
        lab = self.the_lab
        node1, node2 = lab.node("node1")["ip"], lab.node("node2")["ip"]
        plain = lab.pod("plain")["ip"]
        tunnels = [
            stunnel.Tunnel(
                name,
                f"{node1}:{port + STUNNEL_CLIENT_OFFSET}",
                f"{node2}:{port + STUNNEL_SERVER_OFFSET}",
                f"{plain}:{port}",
            )
            for name, port in (("echo", ECHO_PORT), ("iperf", IPERF_PORT))
        ]
        directory = Path(lab.state_dir) / "bench-stunnel"
        stunnel.write_credentials(directory)
        server = stunnel.start(lab.netns("node2"), directory, tunnels, client=False)
        self.procs.append(server)
        client = stunnel.start(lab.netns("node1"), directory, tunnels, client=True)
        self.procs.append(client)
        return (client.pid, server.pid)

    def agent_pids(self) -> tuple[int, ...]:
        pids = Path(self.the_lab.state_dir) / "pids"
        return tuple(int((pids / f"agent-{n}").read_text()) for n in ("node1", "node2"))

    def restart_agent(
        self, node: str, *, workers: int | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        """Replace ``node``'s agent by a fresh one with the same command line (with
        ``--workers``: that many proxy workers instead of what it had; ``extra``: these flags
        added).

        Python keeps memory it freed for reuse, so an agent that has held 10,000 connections
        would show a later idle test almost no growth; the memory test of a path starts on fresh
        agents. SIGTERM drains the old one (the lab started it: it is this process's child).
        """
        labdir, plan = control.load(self.name)
        node_plan = next(n for n in plan.nodes if n.name == node)
        name = f"agent-{node}"
        pid = labdir.pids()[name]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = tuple(arg.decode() for arg in f.read().split(b"\0") if arg)
        if workers is not None:
            argv = (*_without_workers(argv), "--workers", str(workers))
        argv = (*argv, *extra)
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        component = components.Component(
            name, node_plan.netns, argv, lambda: components.agent_ready(node_plan)
        )
        proc = components.start(component, labdir)
        components.wait_ready(component, proc, labdir, timeout=60)
        self.paths, self.http_paths = self._paths(), self._http_paths()

    def _paths(self) -> list[BenchPath]:
        lab = self.the_lab
        ip = {name: str(lab.pod(name)["ip"]) for name in ("server", "neighbor", "plain")}
        node1 = str(lab.node("node1")["ip"])
        agents = self.agent_pids()
        return [
            BenchPath("direct", "direct (no mesh)", "outsider", ip["plain"], ECHO_PORT,
                      IPERF_PORT, "plain", (), "plaintext", None, 0),
            BenchPath("mesh_cross", "nodemesh cross-node", "client", ip["server"], ECHO_PORT,
                      IPERF_PORT, "server", agents, "tls", "hbone", 1),
            BenchPath("mesh_same", "nodemesh same-node", "client", ip["neighbor"], ECHO_PORT,
                      IPERF_PORT, "neighbor", agents[:1], "local", "local", 2),
            BenchPath("stunnel", "stunnel4 mTLS", "outsider", node1,
                      ECHO_PORT + STUNNEL_CLIENT_OFFSET, IPERF_PORT + STUNNEL_CLIENT_OFFSET,
                      "plain", self.stunnel_pids, "tls", None, 2),
        ]  # fmt: skip

    def _http_paths(self) -> list[HttpPath]:
        lab = self.the_lab
        server, plain = str(lab.pod("server")["ip"]), str(lab.pod("plain")["ip"])
        vip = {svc["name"]: str(svc["clusterIP"]) for svc in lab.status()["services"]}
        agents = self.agent_pids()
        return [
            HttpPath("direct", "direct (no mesh)", "outsider", plain, HTTP_PORT, (), False),
            HttpPath("mesh_l4", "nodemesh L4 (undeclared port)", "client", server, HTTP_L4_PORT,
                     agents, False),
            HttpPath("mesh_http", "nodemesh HTTP (declared port)", "client", server, HTTP_PORT,
                     agents, True),
            HttpPath("svc_l4", "nodemesh L4 via a Service (undeclared)", "client",
                     vip[SVC_L4], 80, agents, False),
            HttpPath("svc_http", "nodemesh HTTP via a Service (both nodes)", "client",
                     vip[SVC_HTTP], 80, agents, True),
            HttpPath("svc_routed", "nodemesh HTTP via an HTTPRoute (match, split, retry)",
                     "client", vip[SVC_ROUTED], 80, agents, True),
        ]  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 5 s, of a process this bench started."""
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _without_workers(argv: tuple[str, ...]) -> tuple[str, ...]:
    """``argv`` without a ``--workers N`` it may carry."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        else:
            out.append(arg)
    return tuple(out)
