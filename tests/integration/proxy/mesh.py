"""A two-node mesh on loopback for the proxy's tests: test CA, state, proxies, pods as sockets.

Addresses (all in 127/8, which the host's loopback already owns, so nothing is added anywhere):
node1 runs ``client`` 127.0.1.1 and ``local`` 127.0.1.2 (meshed) and ``outsider`` 127.0.1.9
(not meshed); node2 runs ``server`` 127.0.2.1 (meshed) and ``plain`` 127.0.2.9 (not meshed).
Each node has its own ``NodeProxy``; node2's HBONE listener is bound to the server pod's IP on a
free port (``hbone_port``), which both proxies use as the HBONE port. Captured connections are
simulated by connecting to a proxy listener from a socket bound to the client pod's IP and
passing the original destination explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.identity.certs import WorkloadCertificate
from agent.identity.keysmith import private_key, to_pem
from agent.identity.manager import IdentityUnavailable
from agent.identity.spiffe import SpiffeId
from agent.proxy import sockets
from agent.proxy.core import Core, ProxySettings
from agent.proxy.server import NodeProxy
from agent.state import Namespace, PolicyObject, StateStore
from tests.workloads import workload

CLIENT, LOCAL, OUTSIDER, SERVER, PLAIN = (
    "127.0.1.1",
    "127.0.1.2",
    "127.0.1.9",
    "127.0.2.1",
    "127.0.2.9",
)
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"


class TestCA:
    """A root and leaf certificates of any validity (the bad-input tests need expired ones)."""

    __test__ = False

    def __init__(self, name: str = "nodemesh test root") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.root = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, spiffe_id: str, *, expired: bool = False) -> WorkloadCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        start, end = (
            (now - dt.timedelta(hours=2), now - dt.timedelta(hours=1))
            if expired
            else (now - dt.timedelta(minutes=5), now + dt.timedelta(hours=1))
        )
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.root.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        return WorkloadCertificate.from_response(
            SpiffeId.parse(spiffe_id), private_key(key), [to_pem([leaf])], [to_pem([self.root])]
        )


@dataclass
class FakeIdentities:
    ca: TestCA
    issued: dict[str, WorkloadCertificate] = field(default_factory=dict)
    unavailable: set[str] = field(default_factory=set)  # as if the CA refused or was down

    async def certificate(self, spiffe_id: str) -> WorkloadCertificate:
        if spiffe_id in self.unavailable:
            raise IdentityUnavailable(f"{spiffe_id}: the CA is unreachable (test)")
        if spiffe_id not in self.issued:
            self.issued[spiffe_id] = self.ca.issue(spiffe_id)
        return self.issued[spiffe_id]


def make_store() -> StateStore:
    store = StateStore()
    with store.update() as txn:
        txn.put_namespace(Namespace("default"))
        for w in (
            workload("client", "node1", CLIENT, app="client"),
            workload("local", "node1", LOCAL, app="local"),
            workload("outsider", "node1", OUTSIDER, app="outsider", meshed=False),
            workload("server", "node2", SERVER, app="server"),
            workload("plain", "node2", PLAIN, app="plain", meshed=False),
        ):
            txn.put_workload(w)
    return store


def set_policies(store: StateStore, *policies: PolicyObject) -> None:
    with store.update() as txn:
        txn.replace("policies", policies)


def free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        return int(s.getsockname()[1])


def listener(ip: str, port: int = 0) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((ip, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


Handler = Callable[[socket.socket], Awaitable[None]]


class Mesh:
    """Two proxies, their listeners, and helpers to run apps and clients."""

    def __init__(self, *, handshake_timeout: float = 10.0) -> None:
        self.ca = TestCA()
        self.identities = FakeIdentities(self.ca)
        self.store = make_store()
        self.hbone_port = free_port(SERVER)
        settings = ProxySettings(
            hbone_port=self.hbone_port, handshake_timeout=handshake_timeout, connect_timeout=2.0
        )
        self.node1 = NodeProxy(
            Core(node="node1", store=self.store, identities=self.identities, settings=settings)
        )
        self.node2 = NodeProxy(
            Core(node="node2", store=self.store, identities=self.identities, settings=settings)
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._sockets: list[socket.socket] = []

    async def start(self) -> None:
        self.node1.start()
        self.node2.start()
        # ``node2`` looked up per connection: a test may put a successor there (an upgrade).
        self.hbone = self._listen(SERVER, self.hbone_port, lambda s: self.node2.inbound.handle(s))

    def _listen(self, ip: str, port: int, handler: Handler) -> socket.socket:
        sock = listener(ip, port)
        self._sockets.append(sock)
        self._tasks.append(asyncio.create_task(self._accept(sock, handler)))
        return sock

    async def _accept(self, sock: socket.socket, handler: Handler) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            sockets.accepted(conn)  # as the agent's listeners (``ProxyComponent.handle``)
            self._tasks.append(asyncio.create_task(handler(conn)))

    def successor(self, node: NodeProxy) -> NodeProxy:
        """A started proxy for ``node``'s node, as the agent an upgrade starts: put it in
        ``node1``/``node2`` to take the connections that come after, and close ``node``."""
        old = node.core
        ids, settings = self.identities, old.settings
        proxy = NodeProxy(Core(node=old.node, store=self.store, identities=ids, settings=settings))
        proxy.start()
        return proxy

    def serve_hbone(self, proxy: NodeProxy, ip: str) -> socket.socket:
        """An HBONE listener of ``proxy`` on pod ``ip`` (node2's is on ``server``'s), so that
        the other node's pods reach that pod through it; closed with the mesh."""
        return self._listen(ip, self.hbone_port, proxy.inbound.handle)

    def app(
        self,
        ip: str,
        handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> int:
        """A pod's server app on ``ip``; returns its port."""
        sock = listener(ip)
        self._sockets.append(sock)
        server_ready = asyncio.start_server(handler, sock=sock)
        self._tasks.append(asyncio.create_task(_serve_forever(server_ready)))
        return int(sock.getsockname()[1])

    async def connect(
        self,
        src: str,
        dst: tuple[str, int],
        *,
        via: str = "outbound",
        proxy: NodeProxy | None = None,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect from pod ``src`` to ``dst`` as if captured into ``via`` (outbound or inbound)."""
        proxy = proxy or self.node1
        handle = proxy.outbound.handle if via == "outbound" else proxy.plaintext.handle
        lst = listener("127.0.0.1")
        self._sockets.append(lst)
        port = lst.getsockname()[1]

        async def accept_one() -> None:
            conn, _ = await asyncio.get_running_loop().sock_accept(lst)
            conn.setblocking(False)
            sockets.accepted(conn)
            rest = await handle(conn, original_dst=dst)
            if rest is not None:  # a relay without a task: this task stands for it (its
                with contextlib.suppress(Exception):  # cancellation closes the connection)
                    await rest

        self._tasks.append(asyncio.create_task(accept_one()))
        return await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))

    async def close(self) -> None:
        for node in (self.node1, self.node2):
            node.begin_drain()
            node.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self._sockets:
            sock.close()


async def _serve_forever(server_ready: Awaitable[asyncio.Server]) -> None:
    server = await server_ready
    async with server:
        await server.serve_forever()


Scenario = Callable[[Mesh], Awaitable[None]]


def mesh_test(scenario: Scenario) -> Callable[[], None]:
    """Turn ``async def scenario(mesh)`` into a test that runs it on uvloop with a fresh mesh."""
    return mesh_test_with()(scenario)


def mesh_test_with(**mesh_kw: float) -> Callable[[Scenario], Callable[[], None]]:
    """``mesh_test`` with ``Mesh`` keyword arguments (e.g. a short handshake timeout)."""
    return lambda scenario: _runner(scenario, mesh_kw)


def _runner(scenario: Scenario, mesh_kw: dict[str, float]) -> Callable[[], None]:
    def test() -> None:
        if os.geteuid() != 0:
            pytest.skip("SO_MARK and IP_TRANSPARENT need root")

        async def main() -> None:
            mesh = Mesh(**mesh_kw)
            await mesh.start()
            try:
                await asyncio.wait_for(scenario(mesh), 120)
            finally:
                await mesh.close()

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())

    test.__name__ = scenario.__name__
    test.__doc__ = scenario.__doc__
    return test
