"""TLS 1.3 mutual authentication with SPIFFE identities, including a root rotation overlap."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from agent.ca.inprocess import InProcessCA
from agent.ca.storage import CA_CERT_FILE, CA_KEY_FILE, ROOT_FILE, new_material
from agent.identity.certs import WorkloadCertificate, load_pem_chain
from agent.identity.keysmith import certificate, generate_key, private_key
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import PeerIdentityError, client_context, peer_spiffe_id, server_context
from agent.state import StateStore
from tests.unit.identity.identity_helpers import CLIENT, SERVER, handshake


def test_mutual_tls_both_sides_see_the_peer_identity(ca: InProcessCA) -> None:
    client_cert = ca.workload_certificate(CLIENT)
    server_cert = ca.workload_certificate(SERVER)
    client_view, server_view = handshake(
        client_context(client_cert, SERVER), server_context(server_cert)
    )
    assert (client_view, server_view) == (SERVER, CLIENT)


def test_contexts_are_tls13_only(ca: InProcessCA) -> None:
    ctx = client_context(ca.workload_certificate(CLIENT), SERVER)
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])
def test_client_refuses_a_server_with_another_identity(ca: InProcessCA, run: Any) -> None:
    other = "spiffe://cluster.local/ns/default/sa/other"
    client_view, _ = handshake(
        client_context(ca.workload_certificate(CLIENT), SERVER),
        server_context(ca.workload_certificate(other)),
        run,
    )
    assert isinstance(client_view, PeerIdentityError)
    assert other in str(client_view)


def test_server_refuses_a_client_from_another_root(ca: InProcessCA, tmp_path: Path) -> None:
    stranger = InProcessCA(tmp_path / "other-ca", StateStore())
    _, server_view = handshake(
        client_context(
            stranger.workload_certificate(CLIENT),
            None,
            roots=[certificate(r) for r in ca.authority.roots],
        ),
        server_context(ca.workload_certificate(SERVER)),
    )
    assert isinstance(server_view, ssl.SSLError)


def _rotation_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Two CA directories during a root rotation: both trust {old, new}; one signs with the
    old root, the other with the new."""
    old, new = new_material("cluster.local"), new_material("cluster.local")
    dirs = []
    for name, signer in (("old", old), ("new", new)):
        d = tmp_path / name
        d.mkdir()
        (d / ROOT_FILE).write_bytes(old[ROOT_FILE] + new[ROOT_FILE])
        (d / CA_CERT_FILE).write_bytes(signer[CA_CERT_FILE])
        (d / CA_KEY_FILE).write_bytes(signer[CA_KEY_FILE])
        (d / CA_KEY_FILE).chmod(0o600)
        dirs.append(d)
    return dirs[0], dirs[1]


def test_root_rotation_overlap_old_and_new_leaves_verify_each_other(tmp_path: Path) -> None:
    old_dir, new_dir = _rotation_dirs(tmp_path)
    old_ca, new_ca = InProcessCA(old_dir, StateStore()), InProcessCA(new_dir, StateStore())
    old_leaf = old_ca.workload_certificate(CLIENT)
    new_leaf = new_ca.workload_certificate(SERVER)
    assert old_leaf.leaf.issuer != new_leaf.leaf.issuer
    assert len(old_leaf.roots) == len(new_leaf.roots) == 2
    assert handshake(client_context(old_leaf, SERVER), server_context(new_leaf)) == (SERVER, CLIENT)
    assert handshake(client_context(new_leaf, CLIENT), server_context(old_leaf)) == (CLIENT, SERVER)
    # Without the overlap (a peer that trusts only the old root) the new leaf is refused.
    client_view, _ = handshake(
        client_context(old_leaf, SERVER, roots=[certificate(old_ca.authority.signing_root)]),
        server_context(new_leaf),
    )
    assert isinstance(client_view, ssl.SSLCertVerificationError)


def _leaf_with_sans(ca: InProcessCA, identity: str, sans: list[x509.GeneralName]) -> Any:
    """A certificate the mesh CA would never issue: signed by its key, with ``sans``."""
    key = generate_key()
    authority = ca.authority
    now = dt.datetime.now(dt.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(authority.signing_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .sign(authority.signing_key, hashes.SHA256())
    )
    roots = tuple(certificate(r) for r in authority.roots)
    fingerprints = {r.fingerprint for r in roots}
    chain = load_pem_chain(authority.chain_for(leaf))
    kept = tuple(c for c in chain if c.fingerprint not in fingerprints)
    return WorkloadCertificate(SpiffeId.parse(identity), private_key(key), kept, roots)


@pytest.mark.parametrize(
    "extra",
    [
        x509.UniformResourceIdentifier("https://server.example/"),
        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/admin"),
    ],
    ids=["https", "second-spiffe"],
)
def test_both_sides_refuse_a_certificate_with_a_second_uri_san(
    ca: InProcessCA, extra: x509.GeneralName
) -> None:
    sans = [x509.UniformResourceIdentifier(SERVER), extra]
    client_view, _ = handshake(
        client_context(ca.workload_certificate(CLIENT), SERVER),
        server_context(_leaf_with_sans(ca, SERVER, sans)),
    )
    assert isinstance(client_view, PeerIdentityError)
    assert "2 URI SANs" in str(client_view)
    _, server_view = handshake(
        client_context(
            _leaf_with_sans(ca, CLIENT, [x509.UniformResourceIdentifier(CLIENT), extra]), None
        ),
        server_context(ca.workload_certificate(SERVER)),
    )
    assert isinstance(server_view, PeerIdentityError)


def test_a_dns_san_beside_the_spiffe_uri_is_allowed(ca: InProcessCA) -> None:
    """SPIFFE allows other SAN types in an SVID; only a second URI is ambiguous."""
    sans = [x509.UniformResourceIdentifier(SERVER), x509.DNSName("server.default.svc")]
    client_view, server_view = handshake(
        client_context(ca.workload_certificate(CLIENT), SERVER),
        server_context(_leaf_with_sans(ca, SERVER, sans)),
    )
    assert (client_view, server_view) == (SERVER, CLIENT)


def _pump(src: ssl.MemoryBIO, dst: ssl.MemoryBIO) -> None:
    if src.pending:
        dst.write(src.read())


def test_record_calls_run_no_python_frames_and_behave_as_ssl_py(ca: InProcessCA) -> None:
    """uvloop's ``SSLProtocol`` calls ``read``, ``write`` and ``pending`` of the context's
    ``SSLObject`` for every record: they are the C object's own (before: ``ssl.py``'s Python
    wrappers, a frame each), with what the wrappers gave: bytes or a count read into a buffer,
    ``SSLWantReadError`` when no record is whole, the decrypted bytes still pending, and a
    count of bytes written."""
    bios = [ssl.MemoryBIO() for _ in range(4)]  # client in, client out, server in, server out
    client = client_context(ca.workload_certificate(CLIENT), SERVER).wrap_bio(bios[0], bios[1])
    server = server_context(ca.workload_certificate(SERVER)).wrap_bio(
        bios[2], bios[3], server_side=True
    )
    for _ in range(10):  # the handshake, both sides (the peer check included)
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        _pump(bios[1], bios[2])
        _pump(bios[3], bios[0])
    assert peer_spiffe_id(client) == SERVER and peer_spiffe_id(server) == CLIENT

    frames: list[str] = []

    def profile(frame: Any, event: str, _arg: object) -> None:
        if event == "call" and frame.f_code.co_filename == ssl.__file__:
            frames.append(frame.f_code.co_name)

    buffer = bytearray(100)
    sys.setprofile(profile)
    try:
        with pytest.raises(ssl.SSLWantReadError):
            server.read(1024)
        assert client.write(b"a" * 50) == 50
        assert client.write(memoryview(b"b" * 50)) == 50
        _pump(bios[1], bios[2])
        assert server.read(60) == b"a" * 50  # one record at a time
        assert server.pending() == 0
        assert server.read(100, buffer) == 50 and buffer[:50] == b"b" * 50
        assert client.pending() == 0
    finally:
        sys.setprofile(None)
    assert frames == []
    for obj in (client, server):
        assert type(obj.read) is type(len)  # a C method, bound
