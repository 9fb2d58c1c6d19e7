"""``WorkloadCertificate.from_response``: what the agent accepts from the CA, read without
``cryptography`` (the CA here is the real one, in process)."""

from __future__ import annotations

import datetime as dt

import pytest

from agent.ca.inprocess import InProcessCA
from agent.identity.certs import CertificateError, WorkloadCertificate, load_pem_chain
from agent.identity.keysmith import certificate, generate_key, private_key
from agent.identity.spiffe import SpiffeId
from tests.unit.identity.identity_helpers import CLIENT, SERVER

HOUR = dt.timedelta(hours=1)


def test_a_good_answer_keeps_the_leaf_and_takes_the_bundle_from_root_cert(ca: InProcessCA) -> None:
    key = generate_key()
    leaf = ca.authority.sign_workload(key.public_key(), CLIENT, HOUR)
    pems = ca.authority.chain_for(leaf)
    cert = WorkloadCertificate.from_response(
        SpiffeId.parse(CLIENT), private_key(key), pems, ca.authority.roots_pem()
    )
    assert cert.chain == (certificate(leaf),)  # the root is not part of the chain presented
    assert cert.roots == tuple(certificate(r) for r in ca.authority.roots)
    assert cert.not_after == leaf.not_valid_after_utc
    facts = cert.describe()
    assert facts["serial"] == format(leaf.serial_number, "x")
    assert facts["issuer"] == leaf.issuer.rfc4514_string()
    # Without root_cert the bundle is the chain's self-issued certificates (Istio semantics).
    alone = WorkloadCertificate.from_response(SpiffeId.parse(CLIENT), private_key(key), pems, [])
    assert alone.roots == cert.roots and alone.chain == cert.chain


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("other identity", "instead of"),
        ("other key", "for another key"),
        ("empty chain", "empty certificate chain"),
        ("no root", "no root certificate"),
        ("not pem", "not PEM"),
        ("garbled", "malformed certificate"),
    ],
)
def test_an_answer_the_agent_must_not_present_is_refused(
    ca: InProcessCA, case: str, error: str
) -> None:
    key = generate_key()
    identity = SERVER if case == "other identity" else CLIENT
    signed = generate_key() if case == "other key" else key
    leaf = ca.authority.sign_workload(signed.public_key(), identity, HOUR)
    chain = ca.authority.chain_for(leaf)
    roots = ca.authority.roots_pem()
    if case == "empty chain":
        chain = []
    if case == "no root":
        chain, roots = chain[:1], []
    if case == "not pem":
        chain = ["hello"]
    if case == "garbled":
        chain = [chain[0].replace(chain[0].splitlines()[3], "A" * 64)]
    with pytest.raises(CertificateError, match=error):
        WorkloadCertificate.from_response(SpiffeId.parse(CLIENT), private_key(key), chain, roots)


def test_concatenated_pem_strings_are_all_read(ca: InProcessCA) -> None:
    leaf = ca.authority.sign_workload(generate_key().public_key(), CLIENT, HOUR)
    pems = ca.authority.chain_for(leaf)
    assert (
        load_pem_chain(["".join(pems)])
        == load_pem_chain(pems)
        == [certificate(c) for c in (leaf, ca.authority.signing_root)]
    )
