"""The key child (``agent.identity.keysmith``) and the agent's side of it (``agent.identity.keys``):
real children, started with the test's interpreter."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.keys import KeyChild, KeyChildError
from agent.identity.keysmith import answer, uri_sans
from agent.identity.spiffe import SpiffeId

ID = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/client")
SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_key_comes_with_a_csr_for_it_and_only_for_the_identity() -> None:
    async def scenario() -> None:
        keys = KeyChild()
        try:
            key, csr_pem = await keys.new_key(ID)
        finally:
            await keys.close()
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        assert csr.is_signature_valid
        assert uri_sans(csr) == [str(ID)]
        assert csr.public_key().public_bytes(*SPKI) == key.public_key_der
        loaded = serialization.load_der_private_key(key.der, password=None)
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        assert loaded.public_key().public_bytes(*SPKI) == key.public_key_der

    asyncio.run(scenario())


def test_a_burst_shares_one_child_which_leaves_once_idle() -> None:
    async def scenario() -> None:
        keys = KeyChild(linger=0.3)
        first, _ = await keys.new_key(ID)
        pid = keys.pid
        assert pid is not None and alive(pid)
        second, _ = await keys.new_key(ID)
        assert keys.pid == pid and second.der != first.der  # same child, a new key each time
        await asyncio.sleep(1.0)
        assert keys.pid is None  # retired
        assert not alive(pid)  # and reaped
        await keys.new_key(ID)
        assert keys.pid not in (None, pid)
        await keys.close()

    asyncio.run(scenario())


def test_a_child_that_died_while_idle_is_replaced_without_a_failed_request() -> None:
    async def scenario() -> None:
        keys = KeyChild()
        await keys.new_key(ID)
        pid = keys.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        await keys.new_key(ID)
        assert keys.pid not in (None, pid)
        await keys.close()

    asyncio.run(scenario())


def test_a_hung_child_is_killed_and_the_request_fails_naming_the_timeout() -> None:
    async def scenario() -> None:
        keys = KeyChild(timeout=0.5, argv=(sys.executable, "-c", "import time; time.sleep(60)"))
        with pytest.raises(KeyChildError, match=r"TimeoutError: no answer within 0\.5s"):
            await keys.new_key(ID)
        assert keys.pid is None
        await keys.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("program", "error"),
    [
        ('print(\'{"error": "no entropy"}\', flush=True); input()', "refused a key.*no entropy"),
        ('print(\'{"key": "AAAA", "csr": ""}\', flush=True); input()', "without a usable key"),
        ("pass", "closed the socketpair"),
    ],
)
def test_a_broken_child_fails_the_request_with_the_cause(program: str, error: str) -> None:
    async def scenario() -> None:
        keys = KeyChild(argv=(sys.executable, "-c", f"input(); {program}"))
        with pytest.raises(KeyChildError, match=error):
            await keys.new_key(ID)
        await keys.close()

    asyncio.run(scenario())


def test_a_cancelled_request_never_hands_its_key_to_the_next_one() -> None:
    slow = (
        "import sys, time\nfor line in sys.stdin:\n    time.sleep(0.5)\n    print('{}', flush=True)"
    )

    async def scenario() -> None:
        keys = KeyChild(argv=(sys.executable, "-c", slow))
        request = asyncio.ensure_future(keys.new_key(ID))
        await asyncio.sleep(0.2)
        pid = keys.pid
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert keys.pid is None  # the child that held the cut request's answer is gone
        assert pid is not None
        for _ in range(100):  # killed at once, reaped in the background
            if not alive(pid):
                break
            await asyncio.sleep(0.05)
        assert not alive(pid)
        await keys.close()

    asyncio.run(scenario())


def test_the_child_refuses_what_is_not_an_identity() -> None:
    assert "error" in answer({"identity": "http://example.com"})
    assert "error" in answer(["not", "an", "object"])
    good = answer({"identity": str(ID)})
    assert set(good) == {"key", "csr"}
