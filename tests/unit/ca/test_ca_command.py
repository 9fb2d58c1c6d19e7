"""``nodemesh ca`` as a process: standalone (files, tokens, document edits) and Kubernetes mode."""

from __future__ import annotations

import asyncio
import base64
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from agent.identity.caclient import CaClient, CaError
from agent.identity.spiffe import SpiffeId
from tests.fakeapi import FakeApiServer

TOKEN = "node1-token-0123456789abcdef"
CLIENT = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/client")
SERVER = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/server")


def pod(name: str, ip: str) -> dict[str, object]:
    return {"name": name, "namespace": "default", "serviceAccount": name, "ip": ip}


def write_document(path: Path, server_node: str) -> None:
    """client on node1; server on ``server_node``. Written atomically, as the lab does."""
    nodes: dict[str, list[dict[str, object]]] = {
        "node1": [pod("client", "10.244.1.2")],
        "node2": [],
    }
    nodes[server_node].append(pod("server", "10.244.9.9"))
    text = yaml.safe_dump({"nodes": [{"name": n, "pods": p} for n, p in nodes.items()]})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.rename(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
    except OSError:
        return False
    return True


def start_ca(
    log: Path, *flags: str, metrics: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """``nodemesh ca`` on a free loopback port; returns once it accepts connections. Its
    metrics endpoint goes to ``metrics`` or a free loopback port, never the default
    0.0.0.0:15014 that another test run on this machine may hold."""
    address = f"127.0.0.1:{free_port()}"
    metrics = metrics or f"127.0.0.1:{free_port()}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "--log-level", "DEBUG", "ca", "--listen", address,
             "--metrics-listen", metrics, *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while not _accepts(address):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"nodemesh ca did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc, address


@dataclass
class CaProcess:
    proc: subprocess.Popen[bytes]
    address: str
    root_dir: Path
    cluster_file: Path
    log: Path
    metrics: str


@pytest.fixture
def ca_process(tmp_path: Path) -> Iterator[CaProcess]:
    cluster = tmp_path / "cluster.yaml"
    write_document(cluster, "node2")
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(yaml.safe_dump({"tokens": [{"node": "node1", "token": TOKEN}]}))
    log = tmp_path / "ca.log"
    metrics = f"127.0.0.1:{free_port()}"
    proc, address = start_ca(
        log, "--cluster-file", str(cluster), "--root-dir", str(tmp_path / "ca"),
        "--node-tokens", str(tokens), "--min-ttl", "1s", metrics=metrics,
    )  # fmt: skip
    try:
        yield CaProcess(proc, address, tmp_path / "ca", cluster, log, metrics)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_standalone_ca_serves_follows_the_document_and_stops_cleanly(
    ca_process: CaProcess, tmp_path: Path
) -> None:
    token = tmp_path / "node1-token"
    token.write_text(TOKEN)
    key_mode = stat.S_IMODE((ca_process.root_dir / "ca-key.pem").stat().st_mode)
    assert key_mode == 0o600

    async def scenario() -> int:
        denied = 0
        client = CaClient(
            ca_process.address, root_file=ca_process.root_dir / "root.pem", token_file=token
        )
        cert = await client.fetch(CLIENT)
        assert str(cert.identity) == str(CLIENT)
        with pytest.raises(CaError) as info:
            await client.fetch(SERVER)
        assert info.value.code is not None and info.value.code.name == "PERMISSION_DENIED"
        denied += 1
        # The server pod moves to node1: the CA reloads the document and now allows it.
        write_document(ca_process.cluster_file, "node1")
        deadline = time.monotonic() + 10
        while True:
            try:
                await client.fetch(SERVER)
                break
            except CaError as e:
                assert e.code is not None and e.code.name == "PERMISSION_DENIED"
                denied += 1
                assert time.monotonic() < deadline, "the CA did not follow the document edit"
                await asyncio.sleep(0.2)
        await client.close()
        return denied

    denied_before_move = asyncio.run(scenario())
    text = scrape(ca_process.metrics)
    # Exactly the two certificates issued (client, then server after the move); every refusal
    # the client saw, counted by its gRPC status; each decision timed.
    assert sample(text, 'nodemesh_ca_server_requests_total{outcome="ok"}') == 2
    denied = sample(text, 'nodemesh_ca_server_requests_total{outcome="PERMISSION_DENIED"}')
    assert denied == denied_before_move
    assert sample(text, "nodemesh_ca_server_decision_seconds_count") == 2 + denied
    root_expiry = sample(text, "nodemesh_ca_server_signing_expiry_timestamp_seconds")
    assert root_expiry > time.time() + 86400
    assert "PRIVATE KEY" not in text
    ca_process.proc.send_signal(signal.SIGTERM)
    assert ca_process.proc.wait(timeout=15) == 0


def scrape(address: str) -> str:
    host, _, port = address.rpartition(":")
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def sample(text: str, series: str) -> float:
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == series:
            return float(value)
    raise AssertionError(f"{series} not in the CA's /metrics:\n{text}")
    log = ca_process.log.read_text()
    assert "issued spiffe://cluster.local/ns/default/sa/client" in log
    assert "PERMISSION_DENIED" in log
    assert "PRIVATE KEY" not in log


def test_kubernetes_mode_against_an_api_server(tmp_path: Path) -> None:
    with FakeApiServer() as api:
        api.create("Namespace", {"metadata": {"name": "nodemesh-system"}})
        api.add_token("client-sa-token", "system:serviceaccount:default:client")
        # the same account's token for the API server (a pod's default mounted token): without
        # --token-audience the CA still wants its own audience, never the API server's
        api.add_token(
            "api-token",
            "system:serviceaccount:default:client",
            audiences=("https://kubernetes.default.svc",),
        )
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                    "users": [{"name": "ca", "user": {"token": "ca-token"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "ca"}}],
                    "current-context": "fake",
                }
            )
        )
        proc, address = start_ca(
            tmp_path / "ca.log", "--kubeconfig", str(kubeconfig), "--root-configmap", ""
        )
        try:
            secret = api.get("Secret", "nodemesh-ca", "nodemesh-system")
            root = tmp_path / "root.pem"
            root.write_bytes(base64.b64decode(secret["data"]["root.pem"]))
            token = tmp_path / "token"
            token.write_text("client-sa-token")

            async def scenario() -> None:
                client = CaClient(address, root_file=root, token_file=token)
                cert = await client.fetch(CLIENT)  # a service account's own identity
                assert str(cert.identity) == str(CLIENT)
                with pytest.raises(CaError) as info:
                    await client.fetch(SERVER)  # not a node agent: nothing else
                assert info.value.code is not None
                assert info.value.code.name == "PERMISSION_DENIED"
                await client.close()
                token.write_text("api-token")
                meant_for_the_api = CaClient(address, root_file=root, token_file=token)
                with pytest.raises(CaError) as info:
                    await meant_for_the_api.fetch(CLIENT)
                assert info.value.code is not None
                assert info.value.code.name == "UNAUTHENTICATED"
                await meant_for_the_api.close()

            asyncio.run(scenario())
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
