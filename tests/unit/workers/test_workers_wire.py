"""The worker channel's sans-IO parts: frames, certificates, state replay, and its asyncio shell."""

from __future__ import annotations

import asyncio
import pickle
import socket

import pytest

from agent.state import Namespace, StateStore
from agent.workers import replica
from agent.workers.channel import Channel, ChannelClosed, RemoteError
from agent.workers.wire import (
    HEADER,
    MAX_FRAME,
    Call,
    Decoder,
    Message,
    Note,
    Reply,
    WireError,
    decode_certificate,
    encode,
    encode_certificate,
)
from tests.unit.workers.workers_helpers import ID, certificate
from tests.workloads import workload


def test_frames_survive_any_split() -> None:
    messages: list[Message] = [
        Call(1, "certificate", ID),
        Reply(1, b"v"),
        Note("drain"),
        Reply(2, error="no"),
    ]
    data = b"".join(encode(m) for m in messages)
    decoder = Decoder()
    out = []
    for i in range(len(data)):
        out += decoder.feed(data[i : i + 1])
    assert out == messages


def test_a_broken_peer_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="announced"):
        Decoder().feed(HEADER.pack(MAX_FRAME + 1))
    with pytest.raises(WireError, match="undecodable"):
        Decoder().feed(HEADER.pack(3) + b"abc")
    foreign = pickle.dumps({"kind": "x"})
    with pytest.raises(WireError, match="unexpected dict"):
        Decoder().feed(HEADER.pack(len(foreign)) + foreign)


def test_unpicklable_message_names_the_cause() -> None:
    with pytest.raises(WireError, match="cannot send a Note"):
        encode(Note("state", lambda: None))


def test_certificate_round_trip_keeps_the_key_and_never_shows_it() -> None:
    cert = certificate()
    encoded = encode_certificate(cert)
    reply = Reply(7, encoded)
    (back_reply,) = Decoder().feed(encode(reply))
    assert isinstance(back_reply, Reply)
    back = decode_certificate(back_reply.value)
    assert back.identity == cert.identity
    assert back.chain == cert.chain and back.roots == cert.roots
    assert back.key.der == cert.key.der
    key_der = cert.key.der
    assert key_der.hex() not in repr(reply) and str(key_der) not in repr(reply)
    with pytest.raises(WireError, match="malformed certificate"):
        decode_certificate((ID, b"not a key", [], []))
    with pytest.raises(WireError, match="travels as"):
        decode_certificate("nothing")


def test_replica_replays_commits_into_an_equal_state() -> None:
    source = StateStore()
    deltas: list[replica.StateDelta] = []
    source.subscribe(lambda snap, kinds: deltas.append(replica.changes_of(snap, kinds)))
    with source.update() as txn:
        txn.put_namespace(Namespace("default", labels={"nodemesh.io/mesh": "enabled"}))
        txn.put_workload(workload("a", "node1", "10.0.0.1"))
        txn.put_workload(workload("b", "node1", "10.0.0.2"))
    worker = StateStore()
    frame = encode(Note("setup", replica.full_state(source.snapshot())))
    (setup,) = Decoder().feed(frame)
    assert isinstance(setup, Note)
    replica.apply(worker, setup.args)  # type: ignore[arg-type]
    deltas.clear()
    with source.update() as txn:
        txn.delete("workloads", "default/a")
        txn.put_workload(workload("c", "node2", "10.0.0.3", app="web"))
        txn.trust_domain = "example.org"
    for delta in deltas:
        (note,) = Decoder().feed(encode(Note("state", delta)))
        replica.apply(worker, note.args)  # type: ignore[union-attr,arg-type]
    mine, theirs = source.snapshot(), worker.snapshot()
    assert dict(theirs.workloads.items()) == dict(mine.workloads.items())
    assert dict(theirs.namespaces.items()) == dict(mine.namespaces.items())
    assert theirs.trust_domain == "example.org"
    assert set(theirs.workloads) == {"default/b", "default/c"}


def test_channel_calls_both_ways_and_fails_pending_calls_on_close() -> None:
    async def run() -> None:
        a_sock, b_sock = socket.socketpair()
        notes: list[tuple[str, object]] = []

        def serve_a(kind: str, args: object) -> object:
            if kind == "boom":
                raise ValueError("no such thing")
            return ("a", kind, args)

        async def serve_b(kind: str, args: object) -> object:
            if kind == "hang":
                await asyncio.sleep(60)
            return ("b", kind, args)

        a = Channel(a_sock, serve_a, lambda k, v: None)
        b = Channel(b_sock, serve_b, lambda k, v: notes.append((k, v)))
        a.start()
        b.start()
        assert await a.call("x", 1) == ("b", "x", 1)
        assert await b.call("y", [2]) == ("a", "y", [2])
        with pytest.raises(RemoteError, match="ValueError: no such thing"):
            await b.call("boom")
        await a.note("drain", None)
        hanging = asyncio.create_task(a.call("hang"))
        await asyncio.sleep(0.05)
        assert notes == [("drain", None)]
        await b.close()
        with pytest.raises(ChannelClosed):
            await hanging
        await asyncio.wait_for(a.closed.wait(), 5)
        with pytest.raises(ChannelClosed):
            await a.note("late")
        await a.close()

    asyncio.run(run())
