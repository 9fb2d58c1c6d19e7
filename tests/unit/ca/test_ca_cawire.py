"""The agent's hand-written encoding of the CA messages agrees with the protobuf classes the CA
server uses (``agent.base.caproto``): what one writes, the other reads, field for field."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.base import caproto, cawire

texts = st.text(max_size=200)  # any Unicode, empty included
int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def reference_request(csr: str, validity: int, metadata: dict[str, str]) -> bytes:
    request = caproto.IstioCertificateRequest(csr=csr, validity_duration=validity)
    for key, value in metadata.items():
        request.metadata.fields[key].string_value = value
    return bytes(request.SerializeToString(deterministic=True))


@given(csr=texts, validity=int64s, metadata=st.dictionaries(texts, texts, max_size=3))
def test_request_reads_back_as_written_and_matches_protobufs_bytes(
    csr: str, validity: int, metadata: dict[str, str]
) -> None:
    ours = cawire.encode_request(csr, validity, metadata)
    if len(metadata) <= 1:  # the agent sends one entry; map order is not part of the contract
        assert ours == reference_request(csr, validity, metadata)
    parsed = caproto.IstioCertificateRequest.FromString(ours)
    assert (parsed.csr, parsed.validity_duration) == (csr, validity)
    assert caproto.request_metadata(parsed) == metadata


def test_the_agents_request_is_what_the_ca_reads() -> None:
    ours = cawire.encode_request("-----BEGIN CERTIFICATE REQUEST-----\n", 3600, {
        cawire.IMPERSONATED_IDENTITY_KEY: "spiffe://cluster.local/ns/a/sa/b"
    })  # fmt: skip
    parsed = caproto.IstioCertificateRequest.FromString(ours)
    assert parsed.csr.startswith("-----BEGIN")
    assert parsed.validity_duration == 3600
    assert caproto.request_metadata(parsed) == {
        "ImpersonatedIdentity": "spiffe://cluster.local/ns/a/sa/b"
    }


@given(chain=st.lists(texts, max_size=4), roots=st.lists(texts, max_size=4))
def test_response_decodes_what_protobuf_encodes(chain: list[str], roots: list[str]) -> None:
    response = caproto.IstioCertificateResponse(
        cert_chain=chain, root_cert=caproto.Roots(ca_cert=roots)
    )
    decoded = cawire.decode_response(response.SerializeToString())
    assert decoded == cawire.CertificateResponse(chain, roots)


def test_unknown_fields_of_every_wire_type_are_skipped_and_a_repeated_message_merges() -> None:
    response = caproto.IstioCertificateResponse(
        cert_chain=["leaf"], root_cert=caproto.Roots(ca_cert=["root"])
    )
    more_roots = caproto.IstioCertificateResponse(root_cert=caproto.Roots(ca_cert=["old-root"]))
    unknown = b"".join([
        b"\x48\x96\x01",  # field 9, varint 150
        b"\x51" + b"\x01" * 8,  # field 10, fixed64
        b"\x5a\x03abc",  # field 11, bytes
        b"\x65" + b"\x02" * 4,  # field 12, fixed32
    ])  # fmt: skip
    data = response.SerializeToString() + unknown + more_roots.SerializeToString()
    expected = caproto.IstioCertificateResponse.FromString(data)  # protobuf's own reading
    decoded = cawire.decode_response(data)
    assert decoded.cert_chain == list(expected.cert_chain) == ["leaf"]
    assert decoded.root_certs == list(expected.root_cert.ca_cert) == ["root", "old-root"]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x0a\x05ab", "runs past the end"),  # a string longer than the message
        (b"\x0a", "truncated varint"),  # a length that never comes
        (b"\x08\x01", "should be a string"),  # cert_chain as a varint
        (b"\x0a\x02\xff\xfe", "not valid UTF-8"),
        (b"\x13", "unsupported wire type 3"),  # a group
        (b"\x00", "field number 0"),
        (b"\x12\x02\x08\x01", "should be a string"),  # Roots.ca_cert as a varint
        (b"\x15\x00\x00\x00\x00", "should be a message"),  # root_cert as fixed32
        (b"\x08" + b"\xff" * 10 + b"\x01", "longer than 10 bytes"),
    ],
)
def test_malformed_answers_are_errors_not_partial_results(data: bytes, problem: str) -> None:
    with pytest.raises(cawire.WireError, match=problem):
        cawire.decode_response(data)


@given(data=st.binary(max_size=64))
def test_any_bytes_decode_or_raise_wire_error(data: bytes) -> None:
    with contextlib.suppress(cawire.WireError):
        cawire.decode_response(data)


def test_the_wire_names_are_the_ones_the_server_registers() -> None:
    assert (
        caproto.METHOD
        == cawire.METHOD
        == "/istio.v1.auth.IstioCertificateService/CreateCertificate"
    )
    assert caproto.IMPERSONATED_IDENTITY_KEY == cawire.IMPERSONATED_IDENTITY_KEY
