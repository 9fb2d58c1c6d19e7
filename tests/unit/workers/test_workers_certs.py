"""Certificates pushed from the main process to the workers (``agent.workers.certs``): the notes
on the wire, the worker's copies (replaced, dropped, never revived by a late answer) and the
main process's answers, consistent with what it pushed."""

from __future__ import annotations

import asyncio

import pytest

from agent.identity.certs import WorkloadCertificate
from agent.identity.manager import IdentityUnavailable
from agent.proxy.contexts import Contexts, NoCertificate
from agent.workers.certs import NOTE, CertificateFeed, RemoteCertificates
from agent.workers.channel import RemoteError
from agent.workers.wire import Decoder, Note, WireError, encode
from tests.unit.workers.workers_helpers import ID, certificate

OTHER = "spiffe://cluster.local/ns/default/sa/server"


class Manager:
    """The identity manager as the feed sees it; ``certificate`` finds the certificate, then
    waits for ``release`` (as a waiter whose result is set but who has not run yet)."""

    def __init__(self, *certs: WorkloadCertificate) -> None:
        self.certs = {str(c.identity): c for c in certs}
        self.release = asyncio.Event()
        self.release.set()

    async def certificate(self, spiffe_id: str) -> WorkloadCertificate:
        cert = self.certs[spiffe_id]
        await self.release.wait()
        return cert

    def held(self, spiffe_id: str) -> WorkloadCertificate | None:
        return self.certs.get(spiffe_id)

    def held_all(self) -> list[WorkloadCertificate]:
        return list(self.certs.values())


def wire(note: Note) -> object:
    (back,) = Decoder().feed(encode(note))
    assert isinstance(back, Note) and back.kind == NOTE
    return back.args


def serial(cert: WorkloadCertificate) -> str:
    return format(cert.leaf.serial_number, "x")


def test_renewed_and_dropped_notes_cross_the_wire_without_showing_the_key() -> None:
    cert = certificate()
    feed = CertificateFeed(Manager(cert))
    renewed = feed.changed(ID, cert)
    dropped = feed.changed(ID, None)
    key = cert.key.der
    assert key.hex() not in repr(renewed) and str(key) not in repr(renewed)
    seq, identity, encoded = wire(renewed)  # type: ignore[misc]
    assert (seq, identity) == (1, ID)
    assert wire(dropped) == (2, ID, None)
    copies = RemoteCertificates(ask=lambda _id: asyncio.sleep(0))
    copies.apply((seq, identity, encoded))
    assert copies.describe() == [
        {"identity": ID, "serial": serial(cert), "not_after": cert.not_after.isoformat()}
    ]
    assert key.hex() not in repr(copies.describe())
    with pytest.raises(WireError, match="travels as"):
        copies.apply((1, ID))
    with pytest.raises(WireError, match="sent as"):  # a certificate filed under another name
        copies.apply((3, OTHER, encoded))


def test_a_pushed_renewal_replaces_the_copy_and_a_drop_forgets_it() -> None:
    first, second = certificate(), certificate()
    feed = CertificateFeed(Manager(first))
    asked: list[str] = []
    forgotten: list[str] = []

    async def ask(spiffe_id: str) -> object:
        asked.append(spiffe_id)
        raise RemoteError(f"IdentityUnavailable: {spiffe_id} is no longer on this node")

    async def run() -> None:
        copies = RemoteCertificates(ask)
        copies.forgotten.append(forgotten.append)
        for note in feed.current():  # what a starting worker gets after its setup
            copies.apply(wire(note))
        held = await copies.certificate(ID)
        assert serial(held) == serial(first) and await copies.certificate(ID) is held
        copies.apply(wire(feed.changed(ID, second)))  # renewed: new connections get the new one
        assert serial(await copies.certificate(ID)) == serial(second)
        assert asked == []  # pushed, never asked for
        copies.apply(wire(feed.changed(ID, None)))
        assert forgotten == [ID] and copies.describe() == []
        with pytest.raises(IdentityUnavailable, match="main process has none"):
            await copies.certificate(ID)  # as an agent that never had it: asks, is refused
        assert asked == [ID]

    asyncio.run(run())


def test_an_answer_older_than_a_drop_cannot_bring_the_identity_back() -> None:
    manager = Manager(certificate())
    feed = CertificateFeed(manager)
    copies = RemoteCertificates(lambda spiffe_id: feed.answer(spiffe_id))

    async def run() -> None:
        # The answer was made (sequence 0) and is on its way while the identity is dropped
        # (sequence 1); the drop note arrives first.
        answer = await feed.answer(ID)
        copies.apply(wire(feed.changed(ID, None)))

        async def late(_spiffe_id: str) -> object:
            return answer

        copies._ask = late
        with pytest.raises(IdentityUnavailable, match="no longer on this node"):
            await copies.certificate(ID)
        assert copies.describe() == []
        # A renewal note overtaken by a newer one is ignored the same way.
        newer, older = certificate(), certificate()
        old_note, new_note = feed.changed(ID, older), feed.changed(ID, newer)
        copies.apply(wire(new_note))
        copies.apply(wire(old_note))
        assert [c["serial"] for c in copies.describe()] == [serial(newer)]

    asyncio.run(run())


def test_the_main_process_answers_what_the_workers_were_told() -> None:
    first, renewed = certificate(), certificate()
    manager = Manager(first)
    feed = CertificateFeed(manager)

    async def run() -> None:
        manager.release.clear()
        waiting = asyncio.create_task(feed.answer(ID))
        await asyncio.sleep(0)
        manager.certs[ID] = renewed  # renewed while the answer waited for the manager
        note = feed.changed(ID, renewed)
        manager.release.set()
        seq, encoded = await waiting
        assert seq == wire(note)[0]  # type: ignore[index]
        copies = RemoteCertificates(lambda _id: asyncio.sleep(0))
        copies.apply((seq, ID, encoded))
        assert serial(await copies.certificate(ID)) == serial(renewed)

        manager.release.clear()
        waiting = asyncio.create_task(feed.answer(ID))
        await asyncio.sleep(0)
        del manager.certs[ID]  # dropped while the answer waited
        feed.changed(ID, None)
        manager.release.set()
        with pytest.raises(IdentityUnavailable, match="no longer on this node"):
            await waiting
        with pytest.raises(TypeError, match="names a SPIFFE ID"):
            await feed.answer(42)

    asyncio.run(run())


def test_a_dropped_identity_leaves_no_tls_context() -> None:
    cert = certificate()
    feed = CertificateFeed(Manager(cert))

    async def refused(spiffe_id: str) -> object:
        raise RemoteError(f"IdentityUnavailable: {spiffe_id} is no longer on this node")

    async def run() -> None:
        copies = RemoteCertificates(refused)
        contexts = Contexts(copies)
        copies.forgotten.append(contexts.forget)
        copies.apply(wire(feed.changed(ID, cert)))
        other = certificate(identity=OTHER)
        copies.apply(wire(feed.changed(OTHER, other)))
        server = await contexts.server(ID)
        assert await contexts.server(ID) is server
        await contexts.client(ID, OTHER)
        kept = await contexts.server(OTHER)
        copies.apply(wire(feed.changed(ID, None)))
        assert [k for k in contexts._cache if k[0] == ID] == []
        assert await contexts.server(OTHER) is kept  # other identities keep theirs
        with pytest.raises(NoCertificate, match=f"no certificate for {ID}"):
            await contexts.server(ID)

    asyncio.run(run())
