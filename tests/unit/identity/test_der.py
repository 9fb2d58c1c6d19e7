"""The agent's DER reader (``agent.identity.der``) against ``cryptography``, which the tests may
import and the agent may not: every fact it reads must be what ``cryptography`` reads, and no
input may make it fail with anything but ``DerError``."""

from __future__ import annotations

import contextlib
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.identity.certs import CertificateError, PrivateKey, load_pem_chain, to_pem
from agent.identity.der import Certificate, DerError, pkcs8_public_key
from agent.identity.keysmith import pkcs8

KEY = ec.generate_private_key(ec.SECP256R1())
SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=12)
ATTRIBUTES = st.one_of(
    st.builds(x509.NameAttribute, st.sampled_from([
        NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME,
        NameOID.LOCALITY_NAME, NameOID.STATE_OR_PROVINCE_NAME, NameOID.STREET_ADDRESS,
        NameOID.USER_ID, ObjectIdentifier("1.3.6.1.4.1.55555.1"),
    ]), TEXT),
    st.builds(x509.NameAttribute, st.just(NameOID.DOMAIN_COMPONENT), ASCII),
    st.builds(x509.NameAttribute, st.just(NameOID.COUNTRY_NAME),
              st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2, max_size=2)),
)  # fmt: skip
NAMES = st.lists(
    st.lists(ATTRIBUTES, min_size=1, max_size=2, unique_by=lambda a: a.oid).map(
        x509.RelativeDistinguishedName
    ),
    max_size=4,
).map(x509.Name)
SEGMENT = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=10)
URIS = st.builds("spiffe://{}/ns/{}/sa/{}".format, SEGMENT, SEGMENT, SEGMENT)
SANS = st.lists(
    st.one_of(
        URIS.map(x509.UniformResourceIdentifier),
        st.builds("{}.example".format, SEGMENT).map(x509.DNSName),
    ),
    max_size=3,
)
TIMES = st.datetimes(min_value=dt.datetime(1950, 1, 1), max_value=dt.datetime(9999, 1, 1)).map(
    lambda t: t.replace(microsecond=0, tzinfo=dt.UTC)
)


def build(
    issuer: x509.Name, subject: x509.Name, serial: int, start: dt.datetime, end: dt.datetime,
    sans: list[x509.GeneralName], ca: bool = False,
) -> x509.Certificate:  # fmt: skip
    builder = (
        x509.CertificateBuilder()
        .issuer_name(issuer)
        .subject_name(subject)
        .public_key(KEY.public_key())
        .serial_number(serial)
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(KEY, hashes.SHA256())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    issuer=NAMES, subject=NAMES, serial=st.integers(1, 2**159 - 1), start=TIMES, end=TIMES,
    sans=SANS,
)  # fmt: skip
def test_every_fact_is_what_cryptography_reads(
    issuer: x509.Name, subject: x509.Name, serial: int, start: dt.datetime, end: dt.datetime,
    sans: list[x509.GeneralName],
) -> None:  # fmt: skip
    start, end = min(start, end), max(start, end) + dt.timedelta(seconds=1)
    reference = build(issuer, subject, serial, start, end, sans)
    reference = x509.load_der_x509_certificate(reference.public_bytes(serialization.Encoding.DER))
    der = reference.public_bytes(serialization.Encoding.DER)
    cert = Certificate.from_der(der)
    assert cert.der == der
    assert cert.serial_number == reference.serial_number
    assert cert.not_before == reference.not_valid_before_utc
    assert cert.not_after == reference.not_valid_after_utc
    assert cert.issuer == reference.issuer.rfc4514_string()
    assert cert.self_issued == (reference.issuer == reference.subject)
    assert cert.public_key_der == reference.public_key().public_bytes(*SPKI)
    assert cert.fingerprint == reference.fingerprint(hashes.SHA256())
    expected_uris = [s.value for s in sans if isinstance(s, x509.UniformResourceIdentifier)]
    assert list(cert.uri_sans) == expected_uris


def test_a_name_needing_escapes_reads_as_cryptography_writes_it() -> None:
    name = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, ' #lead, "quoted" <a>+b;c\\d\0 '),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh"),
        x509.NameAttribute(NameOID.SERIAL_NUMBER, "42"),
    ])  # fmt: skip
    now = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    reference = build(name, name, 7, now, now + dt.timedelta(days=1), [])
    cert = Certificate.from_der(reference.public_bytes(serialization.Encoding.DER))
    assert cert.issuer == reference.issuer.rfc4514_string()
    assert cert.issuer.startswith('2.5.4.5=42,O=nodemesh,CN=\\ #lead\\, \\"quoted\\"')
    assert cert.self_issued


def test_certificates_compare_by_their_bytes_and_round_trip_through_pem() -> None:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "root")])
    one = build(name, name, 1, now, now + dt.timedelta(days=1), [], ca=True)
    two = build(name, name, 2, now, now + dt.timedelta(days=1), [], ca=True)
    ours = [Certificate.from_der(c.public_bytes(serialization.Encoding.DER)) for c in (one, two)]
    pem = to_pem(ours)
    assert pem == "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in (one, two))
    assert load_pem_chain([pem]) == ours and ours[0] != ours[1]
    assert len({*ours, *load_pem_chain([pem])}) == 2


_NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
SAMPLE = build(_NAME, _NAME, 9, _NOW, _NOW + dt.timedelta(days=1), [
    x509.UniformResourceIdentifier("spiffe://td/ns/a/sa/b")
]).public_bytes(serialization.Encoding.DER)  # fmt: skip


@given(st.data())
@settings(max_examples=200, deadline=None)
def test_damaged_certificates_fail_only_with_der_error(data: st.DataObject) -> None:
    der = bytearray(SAMPLE)
    cut = data.draw(st.integers(0, len(der)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(der) - 1), st.integers(0, 255))))
    for at, value in flips:
        der[at] = value
    damaged = bytes(der[:cut]) if cut < len(der) else bytes(der)
    with contextlib.suppress(DerError):
        Certificate.from_der(damaged)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_fail_only_with_der_error(data: bytes) -> None:
    for parse in (Certificate.from_der, pkcs8_public_key):
        with contextlib.suppress(DerError):
            parse(data)


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1()])
def test_a_pkcs8_key_gives_the_public_key_cryptography_gives(curve: ec.EllipticCurve) -> None:
    for _ in range(5):
        key = ec.generate_private_key(curve)
        assert pkcs8_public_key(pkcs8(key)) == key.public_key().public_bytes(*SPKI)


def test_a_private_key_never_shows_its_bytes() -> None:
    key = PrivateKey(pkcs8(KEY))
    assert repr(key) == str(key) == "PrivateKey(<hidden>)"
    assert key.pem().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    loaded = serialization.load_pem_private_key(key.pem(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == KEY.private_numbers()
    with pytest.raises(CertificateError, match="not a PKCS#8 EC private key"):
        PrivateKey(b"\x30\x03\x02\x01\x00")
