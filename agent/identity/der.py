"""A small sans-IO DER reader: the facts the agent needs from X.509 certificates and PKCS#8 keys.

Why our own: the ``cryptography`` package costs the agent about 12 MiB of RSS per process (its
Rust extension with a statically linked OpenSSL), and the long-running agent and its workers
only *read* certificates: expiry, serial, issuer, URI SANs, the public key, a fingerprint.
OpenSSL (through ``ssl``) verifies chains and signatures at every handshake; nothing here is a
security decision beyond comparing bytes (is this leaf for our key, is this the SAN we asked
for), so a reader of a few well-defined structures (RFC 5280, RFC 5208, RFC 5915) is enough.
Key generation and signing stay with ``cryptography``, in a child process
(``agent.identity.keys``).

The reader is strict where a mistake could change a fact (lengths must fit, the definite form
only, tags where the grammar puts them) and ignores what it does not need (signature
algorithms, other extensions). Everything malformed raises ``DerError`` naming what was expected.
The unit tests check every fact against ``cryptography`` on generated certificates.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field

SEQUENCE, SET = 0x30, 0x31
INTEGER, BIT_STRING, OCTET_STRING, OID, BOOLEAN = 0x02, 0x03, 0x04, 0x06, 0x01
UTC_TIME, GENERALIZED_TIME = 0x17, 0x18
EXPLICIT_0, EXPLICIT_1, EXPLICIT_3 = 0xA0, 0xA1, 0xA3
URI_NAME = 0x86  # GeneralName uniformResourceIdentifier [6] IMPLICIT IA5String
SUBJECT_ALT_NAME = "2.5.29.17"

# The attribute names RFC 4514 strings use (the same short names ``cryptography`` prints);
# any other attribute type is written as its dotted OID.
_SHORT_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.6": "C",
    "2.5.4.9": "STREET",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
}
# Directory string types and how their bytes decode to text.
_STRING_CODECS = {
    0x0C: "utf-8",  # UTF8String
    0x13: "ascii",  # PrintableString
    0x16: "ascii",  # IA5String
    0x12: "ascii",  # NumericString
    0x1A: "ascii",  # VisibleString
    0x14: "latin-1",  # TeletexString (as OpenSSL and cryptography read it)
    0x1E: "utf-16-be",  # BMPString
    0x1C: "utf-32-be",  # UniversalString
}


class DerError(ValueError):
    """Bytes that are not the DER structure expected; the message names where and what."""


@dataclass(frozen=True)
class Tlv:
    tag: int
    value: bytes
    raw: bytes  # the whole element, tag and length included


def read_tlv(data: bytes, pos: int = 0) -> tuple[Tlv, int]:
    """The element starting at ``pos`` and the offset just after it."""
    if pos + 2 > len(data):
        raise DerError(f"truncated element at offset {pos}")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise DerError(f"high-tag-number form at offset {pos} is not used by X.509")
    first = data[pos + 1]
    start = pos + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4:
            raise DerError(f"unsupported length form 0x{first:02x} at offset {pos}")
        if start + count > len(data):
            raise DerError(f"truncated length at offset {pos}")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + length
    if end > len(data):
        raise DerError(f"element at offset {pos} claims {length} bytes, {len(data) - start} left")
    return Tlv(tag, data[start:end], data[pos:end]), end


def children(value: bytes) -> list[Tlv]:
    """The elements of a constructed value, in order."""
    out: list[Tlv] = []
    pos = 0
    while pos < len(value):
        element, pos = read_tlv(value, pos)
        out.append(element)
    return out


def expect(element: Tlv, tag: int, what: str) -> Tlv:
    if element.tag != tag:
        raise DerError(f"{what}: expected tag 0x{tag:02x}, found 0x{element.tag:02x}")
    return element


def single(data: bytes, tag: int, what: str) -> Tlv:
    """``data`` is exactly one element with ``tag``."""
    element, end = read_tlv(data)
    if end != len(data):
        raise DerError(f"{what}: {len(data) - end} bytes after the end")
    return expect(element, tag, what)


def encode_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def oid_string(value: bytes) -> str:
    if not value or value[-1] & 0x80:
        raise DerError("malformed OBJECT IDENTIFIER")
    arcs: list[int] = []
    n = 0
    for byte in value:
        n = (n << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(n)
            n = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def _time(element: Tlv) -> dt.datetime:
    text = element.value.decode("ascii", "replace")
    try:
        if element.tag == UTC_TIME and len(text) == 13 and text.endswith("Z"):
            parsed = dt.datetime.strptime(text, "%y%m%d%H%M%SZ")
            year = parsed.year if parsed.year < 2050 else parsed.year - 100  # RFC 5280 4.1.2.5.1
            return parsed.replace(year=year, tzinfo=dt.UTC)
        if element.tag == GENERALIZED_TIME and len(text) == 15 and text.endswith("Z"):
            return dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.UTC)
    except ValueError as e:
        raise DerError(f"malformed validity time {text!r}") from e
    raise DerError(f"validity time {text!r} (tag 0x{element.tag:02x}) is not RFC 5280's form")


def _escape(value: str) -> str:
    """RFC 4514 escaping, as ``cryptography``'s ``rfc4514_string`` does it."""
    if not value:
        return ""
    for char in ("\\", '"', "+", ",", ";", "<", ">"):
        value = value.replace(char, "\\" + char)
    value = value.replace("\0", "\\00")
    if value[0] in ("#", " "):
        value = "\\" + value
    if value[-1] == " ":
        value = value[:-1] + "\\ "
    return value


def rfc4514(name_der: bytes) -> str:
    """A Name as an RFC 4514 string: RDNs last to first, attributes of one RDN joined by ``+``."""
    rdns: list[str] = []
    for rdn in children(single(name_der, SEQUENCE, "Name").value):
        attributes: list[str] = []
        for attribute in children(expect(rdn, SET, "RelativeDistinguishedName").value):
            parts = children(expect(attribute, SEQUENCE, "AttributeTypeAndValue").value)
            if len(parts) != 2:
                raise DerError("an AttributeTypeAndValue has a type and a value")
            oid = oid_string(expect(parts[0], OID, "attribute type").value)
            codec = _STRING_CODECS.get(parts[1].tag)
            if codec is None:
                text = "#" + parts[1].raw.hex()
            else:
                try:
                    text = _escape(parts[1].value.decode(codec))
                except UnicodeDecodeError as e:
                    raise DerError(f"attribute {oid} is not valid {codec}") from e
            attributes.append(f"{_SHORT_NAMES.get(oid, oid)}={text}")
        rdns.append("+".join(attributes))
    return ",".join(reversed(rdns))


def _uri_sans(extensions: Tlv) -> tuple[str, ...]:
    for extension in children(expect(extensions, SEQUENCE, "Extensions").value):
        parts = children(expect(extension, SEQUENCE, "Extension").value)
        if len(parts) not in (2, 3):
            raise DerError("an Extension has an id, an optional critical flag and a value")
        if oid_string(expect(parts[0], OID, "extension id").value) != SUBJECT_ALT_NAME:
            continue
        names = single(expect(parts[-1], OCTET_STRING, "extension value").value, SEQUENCE, "SAN")
        try:
            uris = [n.value.decode("ascii") for n in children(names.value) if n.tag == URI_NAME]
        except UnicodeDecodeError as e:
            raise DerError("a URI subject alternative name is not IA5 text") from e
        return tuple(uris)
    return ()


@dataclass(frozen=True, eq=False)
class Certificate:
    """The facts of one X.509 certificate, read from its DER bytes (``from_der``)."""

    der: bytes = field(repr=False)
    serial_number: int
    not_before: dt.datetime
    not_after: dt.datetime
    issuer: str  # RFC 4514, as ``cryptography`` writes it (what /status shows)
    issuer_der: bytes = field(repr=False)
    subject_der: bytes = field(repr=False)
    public_key_der: bytes = field(repr=False)  # the SubjectPublicKeyInfo
    uri_sans: tuple[str, ...]

    @classmethod
    def from_der(cls, der: bytes) -> Certificate:
        cert = children(single(der, SEQUENCE, "Certificate").value)
        if len(cert) != 3:
            raise DerError("a Certificate has a body, a signature algorithm and a signature")
        tbs = children(expect(cert[0], SEQUENCE, "TBSCertificate").value)
        if tbs and tbs[0].tag == EXPLICIT_0:  # version
            tbs = tbs[1:]
        if len(tbs) < 6:
            raise DerError("the TBSCertificate is missing fields")
        serial, _, issuer, validity, subject, spki = tbs[:6]
        times = children(expect(validity, SEQUENCE, "Validity").value)
        if len(times) != 2:
            raise DerError("a Validity has notBefore and notAfter")
        extensions = next((e for e in tbs[6:] if e.tag == EXPLICIT_3), None)
        sans = () if extensions is None else _uri_sans(single(extensions.value, SEQUENCE, "exts"))
        expect(subject, SEQUENCE, "subject")
        return cls(
            der=der,
            serial_number=int.from_bytes(expect(serial, INTEGER, "serial").value, signed=True),
            not_before=_time(times[0]),
            not_after=_time(times[1]),
            issuer=rfc4514(issuer.raw),
            issuer_der=issuer.raw,
            subject_der=subject.raw,
            public_key_der=expect(spki, SEQUENCE, "SubjectPublicKeyInfo").raw,
            uri_sans=sans,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Certificate) and other.der == self.der

    def __hash__(self) -> int:
        return hash(self.der)

    @property
    def fingerprint(self) -> bytes:
        """SHA-256 of the DER bytes: equal exactly when the certificates are."""
        return hashlib.sha256(self.der).digest()

    @property
    def self_issued(self) -> bool:
        return self.issuer_der == self.subject_der


def pkcs8_public_key(der: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a PKCS#8 EC private key (RFC 5208 around RFC 5915), built
    from the algorithm identifier and the public key the key structure carries."""
    info = children(single(der, SEQUENCE, "PrivateKeyInfo").value)
    if len(info) < 3:
        raise DerError("a PrivateKeyInfo has a version, an algorithm and a key")
    algorithm = expect(info[1], SEQUENCE, "private key algorithm")
    inner = single(expect(info[2], OCTET_STRING, "private key").value, SEQUENCE, "ECPrivateKey")
    public = next((e for e in children(inner.value) if e.tag == EXPLICIT_1), None)
    if public is None:
        raise DerError("the EC private key carries no public key")
    bits = single(public.value, BIT_STRING, "EC public key")
    body = algorithm.raw + bits.raw
    return bytes([SEQUENCE]) + encode_length(len(body)) + body
