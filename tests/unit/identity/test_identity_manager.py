"""The identity manager against a real CA over gRPC/TLS: fetch, renew, survive a CA outage."""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import datetime as dt
import itertools
import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.ca.inprocess import InProcessCA
from agent.ca.storage import load_or_create_dir
from agent.config import add_arguments, from_args
from agent.identity.caclient import CaClient, CaError
from agent.identity.certs import WorkloadCertificate
from agent.identity.component import IdentityComponent
from agent.identity.keysmith import certificate
from agent.identity.manager import IdentityManager, State, follow_store
from agent.identity.rotation import Backoff
from agent.identity.spiffe import SpiffeId
from agent.state import StateStore
from tests.unit.identity.identity_helpers import CLIENT, SERVER
from tests.workloads import workload


def client_for(ca: InProcessCA, tmp_path: Path, *, validity: int = 0) -> CaClient:
    token = tmp_path / "token"
    token.write_text(ca.node_tokens["node1"])
    return CaClient(ca.address, root_file=ca.root_file, token_file=token, validity_seconds=validity)


async def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def state_of(manager: IdentityManager, identity: str) -> dict[str, object]:
    return next(s for s in manager.states() if s["identity"] == identity)


def test_follows_the_local_meshed_identities(
    ca: InProcessCA, store: StateStore, tmp_path: Path
) -> None:
    async def scenario() -> None:
        client = client_for(ca, tmp_path)
        manager = IdentityManager(client)
        unsubscribe = follow_store(manager, store, "node1")
        await wait_for(lambda: not manager.troubles())
        assert {s["identity"] for s in manager.states()} == {CLIENT, SERVER}
        assert all(s["state"] == "Available" for s in manager.states())
        with store.update() as txn:
            txn.delete("workloads", "default/server")
        await wait_for(lambda: len(manager.states()) == 1)
        assert manager.states()[0]["identity"] == CLIENT
        unsubscribe()
        await manager.close()
        await client.close()

    asyncio.run(scenario())


def test_renews_before_expiry_without_a_gap(ca: InProcessCA, tmp_path: Path) -> None:
    """Short-lived (3 s) certificates: every observation finds a valid certificate, and each
    new certificate arrives while the previous one is still valid."""

    async def scenario() -> list[tuple[WorkloadCertificate, float]]:
        client = client_for(ca, tmp_path, validity=3)
        manager = IdentityManager(client)
        manager.set_identities([CLIENT])
        seen: list[tuple[WorkloadCertificate, float]] = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            cert = await manager.certificate(CLIENT)
            now = time.time()
            assert cert.not_after.timestamp() > now
            if not seen or seen[-1][0] is not cert:
                seen.append((cert, now))
            await asyncio.sleep(0.05)
        await manager.close()
        await client.close()
        return seen

    seen = asyncio.run(scenario())
    assert len(seen) >= 3
    for (old, _), (new, first_seen) in itertools.pairwise(seen):
        assert new.leaf.serial_number != old.leaf.serial_number
        assert first_seen < old.not_after.timestamp()


def test_ca_outage_keeps_serving_backs_off_and_recovers(ca: InProcessCA, tmp_path: Path) -> None:
    async def scenario() -> None:
        client = client_for(ca, tmp_path, validity=4)
        manager = IdentityManager(client, backoff=Backoff(initial=0.2, cap=0.8))
        first = await manager.certificate(CLIENT)
        ca.stop()
        # Renewal is due after ~2 s and fails; the current certificate keeps being served.
        await wait_for(lambda: state_of(manager, CLIENT)["failures"] >= 3)  # type: ignore[operator]
        assert await manager.certificate(CLIENT) is first
        assert state_of(manager, CLIENT)["state"] == "Available"
        assert "UNAVAILABLE" in str(state_of(manager, CLIENT)["last_error"])
        assert state_of(manager, CLIENT)["failing_since"] is not None
        # Past expiry with the CA still down: Unavailable, and connections get a clear error.
        await wait_for(lambda: state_of(manager, CLIENT)["state"] == "Unavailable")
        assert manager.troubles() == []  # CLIENT was asked for on demand, not desired
        ca.start(port=ca.port)
        await wait_for(lambda: state_of(manager, CLIENT)["state"] == "Available")
        renewed = await manager.certificate(CLIENT)
        assert renewed.leaf.serial_number != first.leaf.serial_number
        assert state_of(manager, CLIENT)["failures"] == 0
        assert state_of(manager, CLIENT)["failing_since"] is None
        await manager.close()
        await client.close()

    asyncio.run(scenario())


def test_ca_outage_degrades_while_certificates_are_valid_and_fails_readiness_after_expiry(
    ca: InProcessCA, store: StateStore, tmp_path: Path
) -> None:
    """The agent stays ready while every local identity holds a valid certificate; the cause is
    reported as degraded. Past expiry the readiness reason names the same cause."""
    token = tmp_path / "node-token"
    token.write_text(ca.node_tokens["node1"])
    component = IdentityComponent(
        node="node1", store=store, ca_address=ca.address, ca_root=ca.root_file,
        token_file=token, validity_seconds=4,
    )  # fmt: skip
    component.manager._backoff = Backoff(initial=0.2, cap=0.8)

    async def scenario() -> tuple[list[str], list[str]]:
        await component.start()
        await wait_for(lambda: component.not_ready() == [])
        assert component.degraded() == []
        ca.stop()
        await wait_for(lambda: len(component.degraded()) == 2)
        assert component.not_ready() == []
        degraded = component.degraded()
        await wait_for(lambda: len(component.not_ready()) == 2)
        not_ready = component.not_ready()
        assert component.degraded() == []
        ca.start(port=ca.port)
        await wait_for(lambda: component.not_ready() == [] and component.degraded() == [])
        await component.stop()
        return degraded, not_ready

    degraded, not_ready = asyncio.run(scenario())
    for lines, verb in ((degraded, "expires"), (not_ready, "expired")):
        assert [line.split(" since ")[0] for line in lines] == ["identity: CA unreachable"] * 2
        assert [line.split(", ")[1].split(" at ")[0] for line in lines] == [
            f"certificate for {CLIENT} {verb}",
            f"certificate for {SERVER} {verb}",
        ]


def test_renewal_is_retried_before_expiry_whatever_the_backoff(
    ca: InProcessCA, tmp_path: Path
) -> None:
    """The default backoff reaches 4 s after four failures; a CA back by then must still be
    asked before the 10 s certificate expires (retries at most half the validity left)."""

    async def scenario() -> tuple[WorkloadCertificate, WorkloadCertificate, float]:
        client = client_for(ca, tmp_path, validity=10)
        manager = IdentityManager(client)
        manager.set_identities([CLIENT])
        first = await manager.certificate(CLIENT)
        ca.stop()
        await wait_for(lambda: state_of(manager, CLIENT)["failures"] >= 4)  # type: ignore[operator]
        ca.start(port=ca.port)
        await wait_for(lambda: state_of(manager, CLIENT)["failures"] == 0)
        arrived = time.time()
        renewed = await manager.certificate(CLIENT)
        await manager.close()
        await client.close()
        return first, renewed, arrived

    first, renewed, arrived = asyncio.run(scenario())
    assert renewed.leaf.serial_number != first.leaf.serial_number
    assert arrived < first.not_after.timestamp()


def test_token_file_is_reread_when_it_changes(ca: InProcessCA, tmp_path: Path) -> None:
    async def scenario() -> None:
        client = client_for(ca, tmp_path)
        (tmp_path / "token").write_text("not-a-valid-token-at-all")
        with pytest.raises(CaError) as info:
            await client.fetch(SpiffeId.parse(CLIENT))
        assert info.value.code is not None and info.value.code.name == "UNAUTHENTICATED"
        (tmp_path / "token").write_text(ca.node_tokens["node1"] + "\n")
        cert = await client.fetch(SpiffeId.parse(CLIENT))
        assert str(cert.identity) == CLIENT
        await client.close()

    asyncio.run(scenario())


def test_on_demand_fetch_reports_the_cas_refusal(ca: InProcessCA, tmp_path: Path) -> None:
    async def scenario() -> None:
        client = client_for(ca, tmp_path)
        manager = IdentityManager(client)
        other_node = "spiffe://cluster.local/ns/default/sa/elsewhere"
        with pytest.raises(Exception, match="PERMISSION_DENIED"):
            await manager.certificate(other_node)
        assert state_of(manager, other_node)["state"] == State.UNAVAILABLE.value
        await manager.close()
        await client.close()

    asyncio.run(scenario())


def test_key_material_never_reaches_logs_or_admin_state(
    ca: InProcessCA, store: StateStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with store.update() as txn:
        txn.put_workload(workload("third", "node1", "10.244.1.4"))

    async def scenario() -> tuple[list[WorkloadCertificate], str]:
        client = client_for(ca, tmp_path)
        manager = IdentityManager(client)
        unsubscribe = follow_store(manager, store, "node1")
        await wait_for(lambda: not manager.troubles())
        certs = [await manager.certificate(s["identity"]) for s in manager.states()]  # type: ignore[arg-type]
        dumped = json.dumps(manager.states()) + repr(certs) + str(certs)
        unsubscribe()
        await manager.close()
        await client.close()
        return certs, dumped

    certs, dumped = asyncio.run(scenario())
    assert len(certs) == 3
    everything = caplog.text + dumped
    for cert in certs:
        pem = cert.key.pem().decode()
        der_b64 = base64.b64encode(cert.key.der).decode()
        key = serialization.load_der_private_key(cert.key.der, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        scalar = key.private_numbers().private_value
        for secret in (pem, der_b64[20:60], format(scalar, "x"), str(scalar)):
            assert secret not in everything
    assert "PRIVATE KEY" not in everything
    assert str(certs[0].identity) in everything  # the check looks at real, non-empty output


def test_agent_component_is_not_ready_until_local_identities_have_certificates(
    ca: InProcessCA, store: StateStore, tmp_path: Path
) -> None:
    token = tmp_path / "node-token"
    token.write_text(ca.node_tokens["node1"])
    component = IdentityComponent(
        node="node1", store=store, ca_address=ca.address, ca_root=ca.root_file, token_file=token
    )

    async def scenario() -> None:
        assert component.not_ready() == []  # nothing desired before start
        await component.start()
        assert len(component.not_ready()) == 2
        await wait_for(lambda: component.not_ready() == [])
        await component.stop()

    asyncio.run(scenario())


def test_agent_ca_flags_reach_the_component(
    ca: InProcessCA, store: StateStore, tmp_path: Path
) -> None:
    """``--cert-ttl`` sets the requested validity; ``--ca-server-name`` is the name the CA's
    serving certificate is checked against (a name it does not carry fails the handshake)."""
    token = tmp_path / "node-token"
    token.write_text(ca.node_tokens["node1"])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--node", "node1", "--in-cluster", "--ca-address", ca.address]
    base += ["--ca-root", str(ca.root_file), "--token-file", str(token)]

    def component(*extra: str) -> IdentityComponent:
        settings = from_args(parser.parse_args([*base, *extra])).ca
        assert settings is not None
        return IdentityComponent(
            node="node1",
            store=store,
            ca_address=settings.address,
            ca_root=settings.root,
            token_file=settings.token_file,
            server_name=settings.server_name,
            validity_seconds=settings.cert_ttl_seconds,
        )

    async def scenario() -> None:
        short = component("--cert-ttl", "10m")
        cert = await short.manager.certificate(CLIENT)
        lifetime = cert.leaf.not_after - cert.leaf.not_before
        assert lifetime <= dt.timedelta(minutes=11)  # 10 min plus the CA's backdating
        await short.manager.close()
        await short.client.close()
        wrong = component("--ca-server-name", "istiod.istio-system.svc")
        with pytest.raises(CaError):
            await asyncio.wait_for(wrong.client.fetch(CLIENT), 10)
        await wrong.client.close()

    asyncio.run(scenario())


def test_a_new_trust_bundle_reaches_every_held_certificate(ca: InProcessCA, tmp_path: Path) -> None:
    """Root rotation, step 1: the CA starts listing a second root; an identity renewed later
    brings the new bundle, and identities renewed earlier must trust it too."""
    second_root = load_or_create_dir(tmp_path / "next-root", "cluster.local").signing_cert

    async def scenario() -> None:
        client = client_for(ca, tmp_path)
        manager = IdentityManager(client)
        before = await manager.certificate(CLIENT)
        assert len(before.roots) == 1
        ca.authority = dataclasses.replace(ca.authority, roots=(*ca.authority.roots, second_root))
        await manager.certificate(SERVER)
        after = await manager.certificate(CLIENT)
        assert after.leaf.serial_number == before.leaf.serial_number  # same leaf, not refetched
        assert certificate(second_root) in after.roots and len(after.roots) == 2
        await manager.close()
        await client.close()

    asyncio.run(scenario())


def test_observers_see_every_new_certificate_and_every_drop(
    ca: InProcessCA, tmp_path: Path
) -> None:
    """What the workers' copies follow: a mirror fed only by the observer calls equals what the
    manager holds after an issue, a drop and a trust bundle change, and is not emptied by the
    agent's own shutdown (its draining workers keep serving)."""
    second_root = load_or_create_dir(tmp_path / "next-root", "cluster.local").signing_cert

    async def scenario() -> None:
        client = client_for(ca, tmp_path)
        manager = IdentityManager(client)
        mirror: dict[str, WorkloadCertificate] = {}
        dropped: list[str] = []

        def observe(name: str, cert: WorkloadCertificate | None) -> None:
            if cert is None:
                dropped.append(name)
                mirror.pop(name)
            else:
                mirror[name] = cert

        def agrees() -> bool:
            held = {str(c.identity): c for c in manager.held_all()}
            return held.keys() == mirror.keys() and all(mirror[n] is c for n, c in held.items())

        manager.observers.append(observe)
        manager.set_identities([CLIENT, SERVER])
        await wait_for(lambda: len(mirror) == 2)
        assert agrees() and mirror[CLIENT] is manager.held(CLIENT)
        manager.set_identities([CLIENT])
        assert dropped == [SERVER] and manager.held(SERVER) is None and agrees()
        ca.authority = dataclasses.replace(ca.authority, roots=(*ca.authority.roots, second_root))
        manager.set_identities([CLIENT, SERVER])  # SERVER's new certificate brings the bundle
        await wait_for(lambda: SERVER in mirror and len(mirror[CLIENT].roots) == 2)
        assert agrees()
        await manager.close()
        assert dropped == [SERVER] and set(mirror) == {CLIENT, SERVER}
        await client.close()

    asyncio.run(scenario())


def test_ca_root_file_anchors_the_clients_tls_and_is_reread(
    ca: InProcessCA, tmp_path: Path
) -> None:
    stranger = load_or_create_dir(tmp_path / "stranger", "cluster.local")
    root = tmp_path / "ca-root.pem"
    root.write_bytes((tmp_path / "stranger" / "root.pem").read_bytes())
    token = tmp_path / "token"
    token.write_text(ca.node_tokens["node1"])
    assert stranger.signing_cert not in ca.authority.roots

    async def scenario() -> None:
        client = CaClient(ca.address, root_file=root, token_file=token)
        with pytest.raises(CaError) as info:  # the CA's certificate does not chain to this root
            await client.fetch(SpiffeId.parse(CLIENT))
        assert info.value.code is not None and info.value.code.name == "UNAVAILABLE"
        root.write_bytes(ca.root_file.read_bytes())
        assert str((await client.fetch(SpiffeId.parse(CLIENT))).identity) == CLIENT
        await client.close()

    asyncio.run(scenario())


def test_a_request_cut_by_a_closed_channel_is_a_failure_not_the_end_of_the_worker(
    ca: InProcessCA, tmp_path: Path
) -> None:
    """A request cut by ``CaClient.close()`` (its exchange is cancelled; grpc.aio did the same
    when a channel was closed under a call) must be a failed attempt that is retried: taken for
    the worker's own cancellation, it ended the worker, and the identity was never renewed again
    (found by the CA outage drill)."""
    silent = socket.socket()  # accepts TCP, never answers TLS: the request stays in flight
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    token = tmp_path / "token"
    token.write_text(ca.node_tokens["node1"])

    async def scenario() -> tuple[BaseException | None, dict[str, object], bool]:
        client = CaClient(
            f"127.0.0.1:{silent.getsockname()[1]}", root_file=ca.root_file, token_file=token
        )
        cut: BaseException | None = None
        fetch = asyncio.create_task(client.fetch(SpiffeId.parse(SERVER)))
        manager = IdentityManager(client, backoff=Backoff(initial=30.0, cap=30.0))
        manager.set_identities([CLIENT])
        # Both requests in flight (their keys come from the key child first: slow under load).
        await wait_for(lambda: len(client._in_flight) == 2)
        await client.close()  # cuts both requests, still in their TLS handshakes
        try:
            await fetch
        except BaseException as e:  # CancelledError included: the test reports what it was
            cut = e
        await wait_for(lambda: state_of(manager, CLIENT)["failures"] == 1)
        worker = manager._entries[CLIENT].task
        alive = worker is not None and not worker.done()
        state = state_of(manager, CLIENT)
        await manager.close()
        return cut, state, alive

    try:
        cut, state, alive = asyncio.run(scenario())
    finally:
        silent.close()
    assert isinstance(cut, CaError) and "client was closed under it" in str(cut)
    assert alive and "client was closed under it" in str(state["last_error"])
    # A transport failure like the one that closed the channel: degraded/readiness say so.
    assert cut.cause == "CA unreachable"
