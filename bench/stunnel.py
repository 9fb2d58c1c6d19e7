"""The stunnel4 mutual-TLS tunnel: the classic alternative a user could deploy instead of a mesh.

Client side in the client's node namespace, server side in the server's node namespace, on the
same cross-node path as the mesh: ``pod -> node1:stunnel (plaintext, local) -> TLS 1.3 over the
node link -> node2:stunnel -> pod``. Both ends present certificates from a throwaway CA made here
with ``cryptography`` (ECDSA P-256, like the mesh's workload certificates) and verify the peer's
chain (``verifyChain``; the server requires a client certificate), so the comparison is mTLS
against mTLS. TCP_NODELAY on both legs, as the mesh sets it.

stunnel reads keys only from files: they go to a 0700 directory inside the lab's state directory,
which ``lab down`` removes, and never into logs.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.lab import netns

SERVER_NAME = "stunnel-server.bench.nodemesh"
CLIENT_NAME = "stunnel-client.bench.nodemesh"


@dataclass(frozen=True)
class Tunnel:
    """One forwarded port: ``accept`` on the client side, to ``target`` behind the server side."""

    name: str
    client_accept: str  # ip:port on the client's node
    server_accept: str  # ip:port on the server's node
    target: str  # ip:port of the server pod


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey,
    *, ca: bool, usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_credentials(directory: Path) -> None:
    """ca.pem, server.pem/server.key and client.pem/client.key in ``directory`` (created 0700)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("nodemesh bench stunnel CA", ca_key, "nodemesh bench stunnel CA", ca_key, ca=True)
    _write(directory / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    for role, name, usage in (
        ("server", SERVER_NAME, ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", CLIENT_NAME, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, "nodemesh bench stunnel CA", ca_key, ca=False, usage=usage)
        _write(directory / f"{role}.pem", cert.public_bytes(serialization.Encoding.PEM))
        _write(directory / f"{role}.key", _pem_key(key))


def config(directory: Path, tunnels: list[Tunnel], *, client: bool) -> str:
    """The stunnel.conf text of one side."""
    role = "client" if client else "server"
    lines = [
        "foreground = yes",
        "pid =",
        "debug = 4",  # warnings only: 10,000 idle connections would otherwise log 20,000 lines
        f"output = {directory / f'{role}.log'}",
        "socket = l:TCP_NODELAY=1",
        "socket = r:TCP_NODELAY=1",
    ]
    for t in tunnels:
        lines += [
            f"[{t.name}]",
            f"client = {'yes' if client else 'no'}",
            f"accept = {t.client_accept if client else t.server_accept}",
            f"connect = {t.server_accept if client else t.target}",
            f"cert = {directory / f'{role}.pem'}",
            f"key = {directory / f'{role}.key'}",
            f"CAfile = {directory / 'ca.pem'}",
            "verifyChain = yes",
            "sslVersionMin = TLSv1.3",
        ]
        if client:
            lines.append(f"checkHost = {SERVER_NAME}")
    return "\n".join(lines) + "\n"


def start(
    netns_name: str, directory: Path, tunnels: list[Tunnel], *, client: bool
) -> subprocess.Popen[bytes]:
    """Run one side of the tunnel in the background inside ``netns_name``."""
    role = "client" if client else "server"
    conf = directory / f"{role}.conf"
    conf.write_text(config(directory, tunnels, client=client), encoding="utf-8")
    return subprocess.Popen(
        ["stunnel4", str(conf)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: netns.enter(netns_name),
    )
