"""Fuzzing the CA's request handling: whatever arrives, the issuer answers or rejects cleanly."""

from __future__ import annotations

import base64
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.base.caproto import METHOD
from agent.ca.auth import StoreNodeAuthorizer
from agent.ca.inprocess import InProcessCA
from agent.ca.issuer import Caller, Issuer, Rejected, parse_csr
from agent.ca.storage import load_or_create_dir
from agent.identity.caclient import CA_SERVER_NAME
from agent.identity.keysmith import build_csr, generate_key
from agent.identity.spiffe import SpiffeId
from agent.state import StateStore, Workload
from tests.fuzzing import fuzz_examples
from tests.unit.ca.ca_helpers import RawClient

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
GOOD_CSR = build_csr(SpiffeId.parse(CLIENT), generate_key())


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    store = StateStore()
    with store.update() as txn:
        txn.put_workload(Workload("default/c", "c", "default", "client", "node1", ("10.0.0.1",)))
    authority = load_or_create_dir(Path(tmp_path_factory.mktemp("ca")), "cluster.local")
    return Issuer(
        authority=lambda: authority,
        trust_domain="cluster.local",
        authorizer=StoreNodeAuthorizer(store),
    )


def mangle(data: bytes, data_draw: st.DataObject) -> str:
    """The good CSR with a few bytes flipped, cut, or junk inserted."""
    buf = bytearray(data)
    for _ in range(data_draw.draw(st.integers(1, 4))):
        op = data_draw.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data_draw.draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] ^= data_draw.draw(st.integers(1, 255))
        elif op == "cut":
            del buf[pos : pos + data_draw.draw(st.integers(1, 64))]
        else:
            buf[pos:pos] = data_draw.draw(st.binary(max_size=16))
    return buf.decode("latin-1")


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


@pytest.mark.fuzz
@settings(
    max_examples=fuzz_examples(300),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.data(),
    metadata=st.dictionaries(
        st.sampled_from(["ImpersonatedIdentity", "WorkloadName", "ClusterID", ""])
        | st.text(max_size=12),
        json_values | st.just(CLIENT),
        max_size=3,
    ),
    validity=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    csr_kind=st.sampled_from(["mangled", "text", "good"]),
)
def test_any_request_is_answered_or_rejected(
    issuer: Issuer, data: st.DataObject, metadata: dict[str, object], validity: int, csr_kind: str
) -> None:
    if csr_kind == "mangled":
        csr = mangle(GOOD_CSR.encode(), data)
    elif csr_kind == "text":
        csr = data.draw(st.text(max_size=300))
    else:
        csr = GOOD_CSR
    caller = data.draw(st.sampled_from([Caller("n1", node="node1"), Caller("sa", identity=CLIENT)]))
    try:
        issued = issuer.issue(
            caller=caller, csr_pem=csr, validity_seconds=validity, metadata=metadata
        )
    except Rejected as e:
        assert e.code in {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED}
        assert e.message
    else:
        assert issued.identity == CLIENT


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(max_size=512))
def test_raw_wire_bytes_never_break_the_server(ca: InProcessCA, payload: bytes) -> None:
    channel = grpc.secure_channel(
        ca.address,
        grpc.ssl_channel_credentials(root_certificates=ca.root_file.read_bytes()),
        options=[("grpc.ssl_target_name_override", CA_SERVER_NAME)],
    )
    with channel:
        call = channel.unary_unary(METHOD)  # bytes in, bytes out: no client-side encoding
        try:
            call(payload, metadata=(("authorization", f"Bearer {ca.node_tokens['node1']}"),))
        except grpc.RpcError as e:
            assert e.code() in {  # type: ignore[attr-defined]
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.INTERNAL,  # grpc's own answer to an undecodable message
            }
    # The server still serves a proper request afterwards.
    good = build_csr(SpiffeId.parse(CLIENT), generate_key())
    with RawClient(ca) as client:
        assert client.create(good, token=ca.node_tokens["node1"], impersonate=CLIENT).cert_chain


def test_a_csr_with_an_unknown_curve_is_rejected_not_raised() -> None:
    """Found by the fuzzer: a garbled curve OID made ``cryptography`` raise
    ``UnsupportedAlgorithm``, which escaped the issuer instead of becoming INVALID_ARGUMENT."""
    der = x509.load_pem_x509_csr(GOOD_CSR.encode()).public_bytes(serialization.Encoding.DER)
    p256 = bytes.fromhex("06082A8648CE3D030107")  # OID 1.2.840.10045.3.1.7
    assert p256 in der
    garbled = der.replace(p256, bytes.fromhex("06082A8648CE3D030109"))
    pem = "-----BEGIN CERTIFICATE REQUEST-----\n"
    pem += base64.encodebytes(garbled).decode() + "-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(Rejected, match="unsupported algorithm") as caught:
        parse_csr(pem)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
