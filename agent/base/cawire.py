"""The CA's three messages in protobuf's binary encoding, written and read by hand.

The same contract as ``agent.base.caproto`` (Istio's ``security/v1alpha1/ca.proto``), for the
agent's side only: it writes an ``IstioCertificateRequest`` and reads an
``IstioCertificateResponse``. Why not the protobuf runtime: importing it (and grpc, which the
generated stubs need) costs the long-running agent about 18 MiB of RSS for three messages of a
few fields each (ARCHITECTURE.md, "No compiler in the agent"). The CA server keeps the protobuf
classes of ``caproto``; the unit tests check this module against them byte for byte and field
for field, so the two cannot drift apart.

What is written (field numbers as in ``caproto``)::

    IstioCertificateRequest  1: csr (string)   3: validity_duration (int64)
                             4: metadata (google.protobuf.Struct: 1: map<string, Value>,
                                          Value 3: string_value)
    IstioCertificateResponse 1: cert_chain (repeated string)   2: root_cert (Roots)
    Roots                    1: ca_cert (repeated string)

Reading follows protobuf's rules: unknown fields of any wire type are skipped, a message field
that occurs twice is merged (its repeated strings concatenate), strings must be UTF-8, and a
truncated or malformed input is a ``WireError``, never a partial answer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

PACKAGE = "istio.v1.auth"
SERVICE = f"{PACKAGE}.IstioCertificateService"
METHOD = f"/{SERVICE}/CreateCertificate"
IMPERSONATED_IDENTITY_KEY = "ImpersonatedIdentity"

VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5


class WireError(ValueError):
    """Bytes that are not a valid encoding of the expected message."""


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64 values are sent as 10-byte two's complement
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _tag(number, LENGTH) + _varint(len(payload)) + payload


def _string_value(value: str) -> bytes:
    """A ``google.protobuf.Value`` holding ``value`` (its oneof field 3, ``string_value``)."""
    return _length_delimited(3, value.encode())


def encode_request(csr: str, validity_seconds: int, metadata: Mapping[str, str]) -> bytes:
    """An ``IstioCertificateRequest``; proto3 leaves out fields at their default value, and the
    metadata entries are written in key order (what protobuf's deterministic mode does)."""
    out = bytearray()
    if csr:
        out += _length_delimited(1, csr.encode())
    if validity_seconds:
        out += _tag(3, VARINT) + _varint(validity_seconds)
    if metadata:
        struct = b"".join(
            _length_delimited(
                1, _length_delimited(1, key.encode()) + _length_delimited(2, _string_value(value))
            )
            for key, value in sorted(metadata.items())
        )
        out += _length_delimited(4, struct)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & ((1 << 64) - 1), pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` for each field of an encoded message: an int for
    varints and fixed-width fields, the payload for length-delimited ones."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        value: int | bytes
        if wire_type == VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type in (FIXED64, FIXED32):
            width = 8 if wire_type == FIXED64 else 4
            if pos + width > len(data):
                raise WireError("truncated fixed-width field")
            value = int.from_bytes(data[pos : pos + width], "little")
            pos += width
        elif wire_type == LENGTH:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise WireError(f"field {number} runs past the end of the message")
            value = data[pos : pos + size]
            pos += size
        else:  # groups (3, 4) are proto2-only and absent from this contract; 6 and 7 are invalid
            raise WireError(f"unsupported wire type {wire_type} (field {number})")
        yield number, wire_type, value


def _string(number: int, wire_type: int, value: int | bytes) -> str:
    if wire_type != LENGTH or not isinstance(value, bytes):
        raise WireError(f"field {number} should be a string, has wire type {wire_type}")
    try:
        return value.decode()
    except UnicodeDecodeError as e:
        raise WireError(f"field {number} is not valid UTF-8") from e


@dataclass(frozen=True)
class CertificateResponse:
    """An ``IstioCertificateResponse``: the chain (leaf first) and the CA's roots."""

    cert_chain: list[str]
    root_certs: list[str]


def decode_response(data: bytes) -> CertificateResponse:
    chain: list[str] = []
    roots: list[str] = []
    for number, wire_type, value in fields(data):
        if number == 1:
            chain.append(_string(number, wire_type, value))
        elif number == 2:
            if wire_type != LENGTH or not isinstance(value, bytes):
                raise WireError(
                    f"field 2 (root_cert) should be a message, has wire type {wire_type}"
                )
            roots += [_string(n, w, v) for n, w, v in fields(value) if n == 1]
    return CertificateResponse(chain, roots)
