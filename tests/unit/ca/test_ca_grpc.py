"""The CA over real gRPC/TLS on loopback: issuance and each rejection with its status."""

from __future__ import annotations

import base64
import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from prometheus_client import generate_latest

from agent.ca.auth import Authenticator, NodeTokenAuthenticator
from agent.ca.inprocess import InProcessCA
from agent.ca.issuer import MAX_CSR_BYTES, Caller, Rejected, parse_csr
from agent.ca.metrics import CaMetrics
from agent.ca.server import CertificateService, start_server
from agent.identity.keysmith import build_csr, generate_key
from agent.identity.spiffe import SpiffeId
from tests.unit.ca.ca_helpers import RawClient

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
SERVER = "spiffe://cluster.local/ns/default/sa/server"


def csr_for(identity: str) -> str:
    return build_csr(SpiffeId.parse(identity), generate_key())


def status_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    return info.value.code()  # type: ignore[attr-defined, no-any-return]


def test_issues_leaf_first_root_last_with_only_the_spiffe_san(
    ca: InProcessCA, raw: RawClient
) -> None:
    resp = raw.create(csr_for(CLIENT), token=ca.node_tokens["node1"], impersonate=CLIENT)
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in resp.cert_chain]
    leaf, root = chain[0], chain[-1]
    assert root.subject == root.issuer
    assert [r for r in resp.root_cert.ca_cert] == ca.authority.roots_pem()
    leaf.verify_directly_issued_by(root)
    san = leaf.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert list(san) == [x509.UniformResourceIdentifier(CLIENT)]
    eku = leaf.extensions.get_extension_for_oid(ExtensionOID.EXTENDED_KEY_USAGE).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value.ca is False
    lifetime = leaf.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=23) < lifetime <= dt.timedelta(hours=24)


def test_validity_is_honoured_and_capped(ca: InProcessCA, raw: RawClient) -> None:
    token = ca.node_tokens["node1"]
    short = raw.create(csr_for(CLIENT), token=token, impersonate=CLIENT, validity=120)
    leaf = x509.load_pem_x509_certificate(short.cert_chain[0].encode())
    assert leaf.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(seconds=120)
    long = raw.create(csr_for(CLIENT), token=token, impersonate=CLIENT, validity=10**9)
    leaf = x509.load_pem_x509_certificate(long.cert_chain[0].encode())
    assert leaf.not_valid_after_utc - dt.datetime.now(dt.UTC) <= dt.timedelta(hours=24)


def test_serials_are_unique_under_a_concurrent_storm(ca: InProcessCA, raw: RawClient) -> None:
    token = ca.node_tokens["node1"]
    csrs = [csr_for(CLIENT) for _ in range(300)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        responses = list(pool.map(lambda c: raw.create(c, token=token, impersonate=CLIENT), csrs))
    serials = {
        x509.load_pem_x509_certificate(r.cert_chain[0].encode()).serial_number for r in responses
    }
    assert len(serials) == 300


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no token", grpc.StatusCode.UNAUTHENTICATED),
        ("unknown token", grpc.StatusCode.UNAUTHENTICATED),
        ("malformed csr", grpc.StatusCode.INVALID_ARGUMENT),
        ("csr san differs", grpc.StatusCode.INVALID_ARGUMENT),
        ("wrong trust domain", grpc.StatusCode.PERMISSION_DENIED),
        ("other node's identity", grpc.StatusCode.PERMISSION_DENIED),
        ("negative validity", grpc.StatusCode.INVALID_ARGUMENT),
        ("no impersonated identity", grpc.StatusCode.INVALID_ARGUMENT),
        ("identity is not a string", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_rejections_carry_a_precise_status(
    ca: InProcessCA, raw: RawClient, case: str, expected: grpc.StatusCode
) -> None:
    token = ca.node_tokens["node1"]
    other_td = "spiffe://example.org/ns/default/sa/client"
    requests = {
        "no token": lambda: raw.create(csr_for(CLIENT), token=None, impersonate=CLIENT),
        "unknown token": lambda: raw.create(csr_for(CLIENT), token="x" * 32, impersonate=CLIENT),
        "malformed csr": lambda: raw.create(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            token=token,
            impersonate=CLIENT,
        ),
        "csr san differs": lambda: raw.create(csr_for(SERVER), token=token, impersonate=CLIENT),
        "wrong trust domain": lambda: raw.create(
            csr_for(other_td), token=token, impersonate=other_td
        ),
        "other node's identity": lambda: raw.create(
            csr_for(SERVER), token=token, impersonate=SERVER
        ),
        "negative validity": lambda: raw.create(
            csr_for(CLIENT), token=token, impersonate=CLIENT, validity=-5
        ),
        "no impersonated identity": lambda: raw.create(csr_for(CLIENT), token=token),
        "identity is not a string": lambda: raw.create(csr_for(CLIENT), token=token, impersonate=7),
    }
    assert status_of(requests[case]) == expected


def test_a_node_obtains_only_identities_of_its_own_pods(ca: InProcessCA, raw: RawClient) -> None:
    raw.create(csr_for(SERVER), token=ca.node_tokens["node2"], impersonate=SERVER)
    with pytest.raises(grpc.RpcError) as info:
        raw.create(csr_for(SERVER), token=ca.node_tokens["node1"], impersonate=SERVER)
    assert "node1" in info.value.details()  # type: ignore[attr-defined]


def test_csr_with_a_broken_signature_is_malformed(ca: InProcessCA, raw: RawClient) -> None:
    der = bytearray(
        x509.load_pem_x509_csr(csr_for(CLIENT).encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-5] ^= 0x01  # inside the ECDSA signature, which ends the DER
    body = base64.encodebytes(bytes(der)).decode()
    pem = f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(grpc.RpcError) as info:
        raw.create(pem, token=ca.node_tokens["node1"], impersonate=CLIENT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "signature" in info.value.details()  # type: ignore[attr-defined]


def _csr(key: Any, sans: list[x509.GeneralName]) -> str:
    """A CSR that ``build_csr`` would never make: any key, any SANs."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )


def test_weak_csr_key_is_refused(ca: InProcessCA, raw: RawClient) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = _csr(key, [x509.UniformResourceIdentifier(CLIENT)])
    with pytest.raises(grpc.RpcError) as info:
        raw.create(weak, token=ca.node_tokens["node1"], impersonate=CLIENT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "key type" in info.value.details()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "extra",
    [
        x509.UniformResourceIdentifier("https://client.example/"),
        x509.UniformResourceIdentifier(SERVER),
    ],
    ids=["https", "second-spiffe"],
)
def test_csr_with_a_second_uri_san_is_refused(
    ca: InProcessCA, raw: RawClient, extra: x509.GeneralName
) -> None:
    """Peers refuse a certificate with two URI SANs, so the CA must never sign one."""
    csr = _csr(generate_key(), [x509.UniformResourceIdentifier(CLIENT), extra])
    with pytest.raises(grpc.RpcError) as info:
        raw.create(csr, token=ca.node_tokens["node1"], impersonate=CLIENT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "exactly that SPIFFE URI" in info.value.details()  # type: ignore[attr-defined]


def test_requested_identity_with_a_trailing_newline_is_invalid(
    ca: InProcessCA, raw: RawClient
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        raw.create(csr_for(CLIENT), token=ca.node_tokens["node1"], impersonate=CLIENT + "\n")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "not a valid Kubernetes name" in info.value.details()  # type: ignore[attr-defined]


def test_a_request_larger_than_a_csr_needs_is_refused_before_it_is_read(
    ca: InProcessCA, raw: RawClient
) -> None:
    """grpcio read requests of up to 4 MiB before the handler saw the token; now at most
    ``MAX_REQUEST_BYTES``. Without a token at all, 200 KiB of metadata is refused by size."""
    pad = {"pad": "x" * (200 * 1024)}
    for token in (None, ca.node_tokens["node1"]):

        def call(t: str | None = token) -> object:
            return raw.create(csr_for(CLIENT), token=t, impersonate=CLIENT, extra_metadata=pad)

        assert status_of(call) == grpc.StatusCode.RESOURCE_EXHAUSTED
    raw.create(csr_for(CLIENT), token=ca.node_tokens["node1"], impersonate=CLIENT)


class _Held:
    """An authenticator whose calls wait until released: calls in progress, counted."""

    def __init__(self, inner: Authenticator) -> None:
        self.inner = inner
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def authenticate(self, token: str) -> Caller:
        self.entered.release()
        self.release.wait()
        return self.inner.authenticate(token)


def _two_held_and_a_third_refused(
    raw: RawClient, pool: ThreadPoolExecutor, held: _Held, token: str
) -> None:
    """Two calls held in the authenticator (the server's limit), a third refused
    RESOURCE_EXHAUSTED at once; released, the two finish and a next call is served."""
    calls = [
        pool.submit(raw.create, csr_for(CLIENT), token=token, impersonate=CLIENT) for _ in range(2)
    ]
    for _ in range(2):
        held.entered.acquire()
    third = status_of(lambda: raw.create(csr_for(CLIENT), token=token, impersonate=CLIENT))
    held.release.set()
    assert third == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert all(c.result().cert_chain for c in calls)
    assert raw.create(csr_for(CLIENT), token=token, impersonate=CLIENT).cert_chain


def test_calls_past_the_concurrency_limit_are_refused_and_the_others_served(
    ca: InProcessCA,
) -> None:
    """grpcio queued calls past its thread pool without limit; past ``max_concurrent_rpcs``
    (here 2) a call is now refused RESOURCE_EXHAUSTED at once, the held ones finish."""
    held = _Held(NodeTokenAuthenticator({t: node for node, t in ca.node_tokens.items()}))
    server, port = start_server(
        CertificateService(ca.issuer, held), ca.authority, listen="127.0.0.1:0",
        max_concurrent_rpcs=2,
    )  # fmt: skip
    ca.port, saved = port, ca.port
    try:
        with RawClient(ca) as raw, ThreadPoolExecutor(max_workers=2) as pool:
            _two_held_and_a_third_refused(raw, pool, held, ca.node_tokens["node1"])
    finally:
        held.release.set()
        server.stop(None)
        ca.port = saved


def _requests(metrics: CaMetrics) -> dict[str, float]:
    """``nodemesh_ca_server_requests_total`` by outcome."""
    found: dict[str, float] = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith("nodemesh_ca_server_requests_total{"):
            labels, _, value = line.partition("} ")
            found[labels.split('outcome="')[1].rstrip('"')] = float(value)
    return found


def test_calls_grpcio_refuses_before_the_handler_are_counted_by_cause(
    ca: InProcessCA,
) -> None:
    """grpcio refuses a request over ``MAX_REQUEST_BYTES`` and a call past the concurrency
    limit before the handler runs, so the CA's request counter never saw either; now each
    counts under its cause, and the calls it served still count ``ok``."""
    held = _Held(NodeTokenAuthenticator({t: node for node, t in ca.node_tokens.items()}))
    metrics = CaMetrics(lambda: ca.authority, "cluster.local")
    server, port = start_server(
        CertificateService(ca.issuer, held, metrics), ca.authority, listen="127.0.0.1:0",
        max_concurrent_rpcs=2,
    )  # fmt: skip
    ca.port, saved = port, ca.port
    token = ca.node_tokens["node1"]
    try:
        with RawClient(ca) as raw, ThreadPoolExecutor(max_workers=2) as pool:
            pad = {"pad": "x" * (200 * 1024)}
            too_large = status_of(
                lambda: raw.create(csr_for(CLIENT), token=token, impersonate=CLIENT,
                                   extra_metadata=pad)
            )  # fmt: skip
            assert too_large == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _requests(metrics) == {"request_unread": 1}
            _two_held_and_a_third_refused(raw, pool, held, token)
        assert _requests(metrics) == {"request_unread": 1, "too_many_calls": 1, "ok": 3}
    finally:
        held.release.set()
        server.stop(None)
        ca.port = saved


def test_a_csr_is_parsed_up_to_max_csr_bytes_and_refused_past_them_in_bytes(
    ca: InProcessCA, raw: RawClient
) -> None:
    """``MAX_CSR_BYTES`` bounds what reaches the parser, counted in bytes: a CSR padded (PEM
    allows text after its block) to exactly the limit is issued; one byte more, or as many
    characters of which some take more than one byte, is refused INVALID_ARGUMENT naming the
    limit (the characters were counted, so such a CSR reached the parser as malformed)."""
    token = ca.node_tokens["node1"]
    csr = csr_for(CLIENT)
    at_limit = csr + "\n" * (MAX_CSR_BYTES - len(csr))
    assert len(at_limit.encode()) == MAX_CSR_BYTES
    assert parse_csr(at_limit).is_signature_valid
    assert raw.create(at_limit, token=token, impersonate=CLIENT).cert_chain
    wide = csr + "\u00e9" * (MAX_CSR_BYTES - len(csr))
    for over in (at_limit + "\n", wide):
        with pytest.raises(Rejected, match=f"larger than {MAX_CSR_BYTES} bytes") as info:
            parse_csr(over)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as refused:
        raw.create(at_limit + "\n", token=token, impersonate=CLIENT)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert f"larger than {MAX_CSR_BYTES} bytes" in refused.value.details()  # type: ignore[attr-defined]
