"""DATA on ``H2Proxy``'s connections without ``h2``'s per-frame methods: received
(``h2wire.receive_data_on`` with ``_stream_data``, reach 18) and acknowledged
(``h2wire.acknowledge_on``, reach 17) with the same windows, events and WINDOW_UPDATE frames
(``test_h2wire.py``'s hypothesis compares what is received with ``h2``'s ``receive_data``; this
file compares the acknowledgements with ``acknowledge_received_data``), in fewer calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from h2.connection import H2Connection
from h2.events import DataReceived
from h2.stream import H2Stream
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.proxy.h2exchange import Choice
from agent.proxy.h2proxy import H2Proxy
from agent.proxy.h2wire import acknowledge_on
from agent.proxy.http1 import Verdict
from tests.fuzzing import fuzz_examples
from tests.unit.proxy.h2peers import peer

WINDOW = 65535  # the peers' initial windows (h2's default)

# A move of the sending peer or the receiver: (kind, stream pick, size)
Move = tuple[str, int, int]
MOVES = st.lists(
    st.tuples(
        st.sampled_from(["open", "data", "end", "reset", "ack", "ack_closed", "ack_unknown"]),
        st.integers(0, 3),
        st.integers(0, 70000),
    ),
    max_size=40,
)


def _windows(conn: H2Connection) -> tuple[Any, ...]:
    """Every window manager's state, the connection's first."""
    managers = [(0, conn._inbound_flow_control_window_manager)]
    managers += [(sid, s._inbound_window_manager) for sid, s in sorted(conn.streams.items())]
    return tuple(
        (sid, m.current_window_size, m.max_window_size, m._bytes_processed) for sid, m in managers
    )


def _play(moves: list[Move], ack: Callable[[H2Connection, int, int], None]) -> list[object]:
    """A client sends on up to four streams to a server that acknowledges with ``ack``; what
    the server queued after each acknowledgement, its windows, and what was refused."""
    client, server = peer(client_side=True), peer(client_side=False)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    seen: list[object] = []
    streams: list[int] = []
    received: dict[int, int] = {}  # flow-controlled bytes received, not yet acknowledged
    for kind, pick, size in moves:
        sid = streams[pick % len(streams)] if streams else 0
        try:
            if kind == "open":
                sid = client.get_next_available_stream_id()
                client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                          (b":authority", b"a"), (b":path", b"/")])  # fmt: skip
                streams.append(sid)
            elif kind == "data" and sid:
                n = min(size, client.local_flow_control_window(sid), 16384)
                client.send_data(sid, b"x" * n)
            elif kind == "end" and sid:
                client.end_stream(sid)
            elif kind == "reset" and sid:
                client.reset_stream(sid)
            elif kind == "ack" and sid:
                owed = received.get(sid, 0)
                ack(server, min(owed, size), sid)
                received[sid] = owed - min(owed, size)
            elif kind == "ack_closed" and sid:
                ack(server, size % 1000, sid)  # more than was received: h2 does not check
            elif kind == "ack_unknown":
                ack(server, size % 1000, 1001 + 2 * pick)  # a stream never opened
        except Exception as e:  # both must refuse alike
            seen.append(("refused", kind, type(e).__name__))
        for event in server.receive_data(client.data_to_send()):
            if isinstance(event, DataReceived):
                received[event.stream_id] = (
                    received.get(event.stream_id, 0) + event.flow_controlled_length
                )
        out = server.data_to_send()
        seen.append((out, _windows(server)))
        client.receive_data(out)  # the WINDOW_UPDATEs let the client send more
    return seen


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(MOVES)
def test_acknowledge_on_does_what_h2s_acknowledge_received_data_does(moves: list[Move]) -> None:
    """Streams open, half-closed, reset and never opened; acknowledgements across the half
    window and of the whole window: the same WINDOW_UPDATEs and windows, the same refusals."""

    def h2s(conn: H2Connection, size: int, sid: int) -> None:
        conn.acknowledge_received_data(size, sid)

    assert _play(moves, acknowledge_on) == _play(moves, h2s)


def test_acknowledge_on_refuses_what_h2_refuses() -> None:
    server = peer(client_side=False)
    for size, sid in ((-1, 1), (10, 0)):
        with pytest.raises(ValueError):
            acknowledge_on(server, size, sid)


def test_a_proxied_call_acknowledges_without_h2s_acknowledge_received_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls with a 16,000-byte message each way through a source ``H2Proxy``: the request's DATA
    is acknowledged to the client and the response's to the pod without ``h2``'s
    ``acknowledge_received_data`` (about ten Python calls each; two per call before), and the
    windows are reopened as before: 40 calls, 640 KB each way past 64 KiB windows, all
    answered."""
    calls: list[int] = []
    real = H2Connection.acknowledge_received_data
    client, pod = peer(client_side=True), peer(client_side=False)

    def counted(self: H2Connection, size: int, sid: int) -> None:
        if self is not client and self is not pod:  # the proxy's connections
            calls.append(sid)
        real(self, size, sid)

    monkeypatch.setattr(H2Connection, "acknowledge_received_data", counted)
    proxy = H2Proxy(lambda _h: Verdict(True), pick=lambda _r: Choice("pod"))
    body = b"m" * 16000
    uid = -1
    for _ in range(40):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                  (b":authority", b"a"), (b":path", b"/pkg.S/M"),
                                  (b"content-type", b"application/grpc")])  # fmt: skip
        client.send_data(sid, body, end_stream=True)
        for _round in range(4):
            out = client.data_to_send()
            if out:  # (``b""`` is the client's end)
                proxy.receive_client(out)
            for new, _key in proxy.take_new_upstreams():
                uid = new
            for event in pod.receive_data(proxy.take_to_upstream(uid)):
                if isinstance(event, DataReceived):
                    pod.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if event.stream_ended is not None:
                        pod.send_headers(event.stream_id, [(b":status", b"200")])
                        pod.send_data(event.stream_id, body)
                        pod.send_headers(event.stream_id, [(b"grpc-status", b"0")],
                                         end_stream=True)  # fmt: skip
            out = pod.data_to_send()
            if out:
                proxy.receive_upstream(out, uid)
            for event in client.receive_data(proxy.take_to_client()):
                if isinstance(event, DataReceived):
                    client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    done = [(ex.status, ex.grpc_status, ex.request_bytes, ex.response_bytes)
            for ex in proxy.take_completed()]  # fmt: skip
    assert done == [(200, "0", 16000, 16000)] * 40
    assert calls == []


def test_a_proxied_calls_data_is_received_without_h2s_stream_receive_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The DATA of calls through a source ``H2Proxy`` (the request's message with END_STREAM
    from the client, the response's from the pod, and an empty END_STREAM frame) reaches the
    streams without ``H2Stream.receive_data`` (about seven Python calls a frame, two frames a
    call before) once the client's preface was read, with the same bytes and ends: each
    call answered with its message."""
    calls: list[int] = []
    real = H2Stream.receive_data

    def counted(self: H2Stream, data: bytes, end: bool, flow: int) -> Any:
        calls.append(self.stream_id)
        return real(self, data, end, flow)

    client, pod = peer(client_side=True), peer(client_side=False)
    monkeypatch.setattr(H2Stream, "receive_data", counted)
    proxy = H2Proxy(lambda _h: Verdict(True), pick=lambda _r: Choice("pod"))
    uid = -1
    got: list[bytes] = []
    for n in range(5):
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"http"),
                                  (b":authority", b"a"), (b":path", b"/pkg.S/M")])  # fmt: skip
        client.send_data(sid, b"call %d" % n, end_stream=n % 2 == 0)
        if n % 2:
            client.send_data(sid, b"", end_stream=True)
        calls.clear()  # only the proxy's receiving counts from here
        for _round in range(4):
            out = client.data_to_send()
            if out:
                proxy.receive_client(out)
            for new, _key in proxy.take_new_upstreams():
                uid = new
            pod_calls = len(calls)
            for event in pod.receive_data(proxy.take_to_upstream(uid)):
                if isinstance(event, DataReceived) and event.stream_ended is not None:
                    pod.send_headers(event.stream_id, [(b":status", b"200")])
                    pod.send_data(event.stream_id, b"answer %d" % n, end_stream=True)
            del calls[pod_calls:]  # the pod's own receiving
            out = pod.data_to_send()
            if out:
                proxy.receive_upstream(out, uid)
            client_calls = len(calls)
            for event in client.receive_data(proxy.take_to_client()):
                if isinstance(event, DataReceived) and event.data:
                    got.append(event.data)
            del calls[client_calls:]
        if n:  # (the first read holds the client preface: ``h2`` reads it all itself)
            assert calls == [], f"call {n}: h2's receive_data on the proxy's streams {calls}"
    assert got == [b"answer %d" % n for n in range(5)]
