"""The proxy end to end on loopback: two node proxies, real TLS and HTTP/2, real sockets.

Root is needed for SO_MARK and IP_TRANSPARENT on the upstream sockets; only 127/8 addresses that
loopback already owns are used, and every socket and task is closed by the ``mesh`` fixture.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from typing import Any

import pytest

from agent.proxy import sockets
from agent.state import PolicyObject
from tests.integration.proxy.mesh import (
    CLIENT,
    CLIENT_ID,
    LOCAL,
    OUTSIDER,
    PLAIN,
    SERVER,
    SERVER_ID,
    Mesh,
    mesh_test,
    set_policies,
)

pytestmark = pytest.mark.root


async def echo_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every line with the peer's address, then echoes until EOF."""
    peer = writer.get_extra_info("peername")[0]
    writer.write(f"peer={peer}\n".encode())
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def request_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads the whole request (until the client half-closes), then answers and closes."""
    body = await reader.read()
    writer.write(b"got %d bytes, sha=%s" % (len(body), hashlib.sha256(body).hexdigest().encode()))
    await writer.drain()
    writer.close()


def policy(kind: str, spec: dict[str, object], name: str = "p") -> PolicyObject:
    return PolicyObject(kind, "default", name, spec)


async def roundtrip(mesh: Mesh, src: str, dst: tuple[str, int], **kw: object) -> bytes:
    reader, writer = await mesh.connect(src, dst, **kw)  # type: ignore[arg-type]
    writer.write(b"marker-1234\n")
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


@mesh_test
async def test_cross_node_through_hbone_keeps_client_ip_and_identities(mesh: Mesh) -> None:
    port = mesh.app(SERVER, echo_peer)
    assert await roundtrip(mesh, CLIENT, (SERVER, port)) == f"peer={CLIENT}\nmarker-1234\n".encode()
    await asyncio.sleep(0)
    assert mesh.node1.pool.dials == 1
    assert mesh.node1.core.registry.total == 1 and mesh.node2.core.registry.total == 1


@mesh_test
async def test_records_show_identities_on_both_ends(mesh: Mesh) -> None:
    port = mesh.app(SERVER, echo_peer)
    reader, writer = await mesh.connect(CLIENT, (SERVER, port))
    assert await reader.readline() == f"peer={CLIENT}\n".encode()
    (out,) = list(mesh.node1.core.registry)
    (inb,) = list(mesh.node2.core.registry)
    assert (out.source_identity, out.destination_identity, out.security, out.path) == (
        CLIENT_ID,
        SERVER_ID,
        "mutual_tls",
        "hbone",
    )
    assert (inb.source_identity, inb.destination_identity, inb.source) == (
        CLIENT_ID,
        SERVER_ID,
        CLIENT,
    )
    writer.close()


@mesh_test
async def test_half_close_and_large_transfer_are_exact(mesh: Mesh) -> None:
    port = mesh.app(SERVER, request_response)
    payload = os.urandom(24 * 1024 * 1024)
    reader, writer = await mesh.connect(CLIENT, (SERVER, port))
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), 60)
    assert answer == b"got %d bytes, sha=%s" % (
        len(payload),
        hashlib.sha256(payload).hexdigest().encode(),
    )
    writer.close()


@mesh_test
async def test_many_concurrent_connections_share_one_tls_connection(mesh: Mesh) -> None:
    port = mesh.app(SERVER, echo_peer)
    results = await asyncio.gather(*(roundtrip(mesh, CLIENT, (SERVER, port)) for _ in range(40)))
    assert all(r == f"peer={CLIENT}\nmarker-1234\n".encode() for r in results)
    assert mesh.node1.pool.dials == 1


@mesh_test
async def test_same_node_is_local_without_tls(mesh: Mesh) -> None:
    port = mesh.app(LOCAL, echo_peer)
    assert await roundtrip(mesh, CLIENT, (LOCAL, port)) == f"peer={CLIENT}\nmarker-1234\n".encode()
    assert mesh.node1.pool.dials == 0


@mesh_test
async def test_passthrough_to_unmeshed_pod(mesh: Mesh) -> None:
    port = mesh.app(PLAIN, echo_peer)
    data = await roundtrip(mesh, CLIENT, (PLAIN, port))
    assert data.endswith(b"marker-1234\n")
    assert mesh.node1.pool.dials == 0


@mesh_test
async def test_deny_policy_blocks_and_is_counted(mesh: Mesh) -> None:
    port = mesh.app(SERVER, echo_peer)
    set_policies(
        mesh.store,
        policy(
            "AuthorizationPolicy",
            {"action": "DENY", "rules": [{"from": [{"source": {"principals": ["*/sa/client"]}}]}]},
        ),
    )
    with pytest.raises(ConnectionResetError):
        await roundtrip(mesh, CLIENT, (SERVER, port))
    assert mesh.node2.core.registry.denials["default/p"] == 1
    assert mesh.node1.core.registry.rejections["tunnel_refused"] == 1


@mesh_test
async def test_allow_policy_admits_exactly_its_port(mesh: Mesh) -> None:
    allowed_port = mesh.app(SERVER, echo_peer)
    other_port = mesh.app(SERVER, echo_peer)
    set_policies(
        mesh.store,
        policy(
            "AuthorizationPolicy",
            {"action": "ALLOW", "rules": [{"to": [{"operation": {"ports": [str(allowed_port)]}}]}]},
        ),
    )
    assert (await roundtrip(mesh, CLIENT, (SERVER, allowed_port))).endswith(b"marker-1234\n")
    with pytest.raises(ConnectionResetError):
        await roundtrip(mesh, CLIENT, (SERVER, other_port))


@mesh_test
async def test_same_node_policy_is_enforced(mesh: Mesh) -> None:
    port = mesh.app(LOCAL, echo_peer)
    set_policies(mesh.store, policy("AuthorizationPolicy", {"action": "DENY", "rules": [{}]}))
    with pytest.raises(ConnectionResetError):
        await roundtrip(mesh, CLIENT, (LOCAL, port))


@mesh_test
async def test_strict_refuses_plaintext_and_permissive_admits(mesh: Mesh) -> None:
    port = mesh.app(SERVER, echo_peer)
    assert (
        await roundtrip(mesh, OUTSIDER, (SERVER, port), via="inbound", proxy=mesh.node2)
        == f"peer={OUTSIDER}\nmarker-1234\n".encode()
    )
    set_policies(mesh.store, policy("PeerAuthentication", {"mtls": {"mode": "STRICT"}}))
    with pytest.raises(ConnectionResetError):
        await roundtrip(mesh, OUTSIDER, (SERVER, port), via="inbound", proxy=mesh.node2)
    assert mesh.node2.core.registry.rejections["strict_mtls"] == 1


@mesh_test
async def test_applying_deny_closes_live_connection(mesh: Mesh) -> None:
    port = mesh.app(SERVER, echo_peer)
    reader, writer = await mesh.connect(CLIENT, (SERVER, port))
    assert await reader.readline() == f"peer={CLIENT}\n".encode()
    set_policies(mesh.store, policy("AuthorizationPolicy", {"action": "DENY", "rules": [{}]}))
    rest = await asyncio.wait_for(_read_until_closed(reader), 10)
    assert rest == b""
    # Both relays run without their handlers' tasks: node2's re-check stopped its relay (and
    # reset the stream), node1's relay ended on the reset; each owner cleaned up.
    assert len(mesh.node2.core.registry) == 0
    assert len(mesh.node1.core.registry) == 0
    writer.close()


@mesh_test
async def test_a_policy_applied_while_the_pod_is_being_dialled_still_applies(mesh: Mesh) -> None:
    """An HBONE stream was authorized, then the DENY arrived while node2 was connecting to the
    pod: the stream was in no registry yet, so the re-check could not see it, and it used to be
    relayed under the old policies."""
    port = mesh.app(SERVER, echo_peer)
    dial = sockets.connect

    async def deny_while_dialling(address: tuple[str, int], **kw: Any) -> socket.socket:
        if address == (SERVER, port):
            set_policies(
                mesh.store, policy("AuthorizationPolicy", {"action": "DENY", "rules": [{}]})
            )
            await asyncio.sleep(0.05)  # the store's re-check runs (and finds nothing) meanwhile
        return await dial(address, **kw)

    sockets.connect = deny_while_dialling  # type: ignore[assignment]
    try:
        with pytest.raises(ConnectionResetError):
            await roundtrip(mesh, CLIENT, (SERVER, port))
    finally:
        sockets.connect = dial  # type: ignore[assignment]
    assert mesh.node2.core.registry.denials["default/p"] == 1
    assert len(mesh.node2.core.registry) == 0


@mesh_test
async def test_switching_to_strict_closes_live_plaintext_connections(mesh: Mesh) -> None:
    port = mesh.app(SERVER, echo_peer)
    plain_r, plain_w = await mesh.connect(OUTSIDER, (SERVER, port), via="inbound", proxy=mesh.node2)
    assert await plain_r.readline() == f"peer={OUTSIDER}\n".encode()
    mtls_r, mtls_w = await mesh.connect(CLIENT, (SERVER, port))
    assert await mtls_r.readline() == f"peer={CLIENT}\n".encode()
    set_policies(mesh.store, policy("PeerAuthentication", {"mtls": {"mode": "STRICT"}}))
    assert await asyncio.wait_for(_read_until_closed(plain_r), 10) == b""
    assert mesh.node2.core.registry.denials["peer-authentication-strict"] == 1
    mtls_w.write(b"still here\n")
    assert await asyncio.wait_for(mtls_r.readline(), 10) == b"still here\n"
    for w in (plain_w, mtls_w):
        w.close()


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


@mesh_test
async def test_drain_lets_open_tunnels_finish_and_refuses_new_ones(mesh: Mesh) -> None:
    port = mesh.app(SERVER, echo_peer)
    reader, writer = await mesh.connect(CLIENT, (SERVER, port))
    assert await reader.readline() == f"peer={CLIENT}\n".encode()
    mesh.node2.inbound.goaway_all()  # what the agent does when it starts draining
    await asyncio.sleep(0.05)
    writer.write(b"after goaway\n")
    assert await reader.readline() == b"after goaway\n"  # the open stream still flows
    with pytest.raises(ConnectionResetError):
        await roundtrip(mesh, CLIENT, (SERVER, port))  # node2 accepts no new tunnels
    assert mesh.node2.core.registry.rejections["draining"] == 1
    writer.write_eof()
    assert await reader.read() == b""
    writer.close()


@mesh_test
async def test_missing_certificates_refuse_cleanly_on_both_sides(mesh: Mesh) -> None:
    port = mesh.app(SERVER, echo_peer)
    mesh.identities.unavailable = {SERVER_ID}
    with pytest.raises(ConnectionResetError):
        await roundtrip(mesh, CLIENT, (SERVER, port))
    assert mesh.node2.core.registry.rejections["no_certificate"] == 1
    mesh.identities.unavailable = {CLIENT_ID}
    with pytest.raises(ConnectionResetError):
        await roundtrip(mesh, CLIENT, (SERVER, port))
    assert mesh.node1.core.registry.rejections["no_certificate"] == 1
    mesh.identities.unavailable = set()
    assert (await roundtrip(mesh, CLIENT, (SERVER, port))).endswith(b"marker-1234\n")


@mesh_test
async def test_a_tunnel_the_far_node_never_answers_ends_at_the_connect_timeout(mesh: Mesh) -> None:
    """The CONNECT reaches node2, which never answers it: node1 gives up after its connect
    timeout (2 s here), resets the client and counts it, instead of holding the client until
    the pooled connection's keepalive gives up."""
    port = mesh.app(SERVER, echo_peer)
    assert await roundtrip(mesh, CLIENT, (SERVER, port))  # the pooled connection is up
    never = asyncio.Event()

    async def unanswered(*args: object) -> None:
        await never.wait()

    mesh.node2.inbound._serve = unanswered  # type: ignore[method-assign]
    with pytest.raises(ConnectionResetError):  # not the read's own 10 s TimeoutError
        await roundtrip(mesh, CLIENT, (SERVER, port))
    assert mesh.node1.core.registry.rejections["tunnel_unreachable"] == 1
    assert mesh.node1.pool.dials == 1  # the connection itself stays in use
