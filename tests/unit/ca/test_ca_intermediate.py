"""A user-provided intermediate: the CA signs with it, the chain carries it, peers verify."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.ca.authority import key_pem, new_root, random_serial
from agent.ca.inprocess import InProcessCA
from agent.ca.storage import CA_CERT_FILE, CA_KEY_FILE, ROOT_FILE
from agent.identity.keysmith import certificate
from agent.identity.tls import client_context, server_context
from agent.state import StateStore
from tests.unit.identity.identity_helpers import CLIENT, SERVER, handshake


def intermediate_dir(path: Path) -> tuple[x509.Certificate, x509.Certificate]:
    root, root_key = new_root("cluster.local")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    inter = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "site intermediate")]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )
    path.mkdir()
    (path / ROOT_FILE).write_bytes(root.public_bytes(serialization.Encoding.PEM))
    (path / CA_CERT_FILE).write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    (path / CA_KEY_FILE).write_bytes(key_pem(key))
    (path / CA_KEY_FILE).chmod(0o600)
    return root, inter


def test_leaves_from_an_intermediate_carry_it_and_verify(tmp_path: Path) -> None:
    root, inter = intermediate_dir(tmp_path / "ca")
    ca = InProcessCA(tmp_path / "ca", StateStore())
    client, server = ca.workload_certificate(CLIENT), ca.workload_certificate(SERVER)
    assert client.chain[1] == certificate(inter)
    assert client.roots == (certificate(root),)
    chain_pems = ca.authority.chain_for(x509.load_der_x509_certificate(client.leaf.der))
    assert [x509.load_pem_x509_certificate(p.encode()) for p in chain_pems[1:]] == [inter, root]
    assert handshake(client_context(client, SERVER), server_context(server)) == (SERVER, CLIENT)
