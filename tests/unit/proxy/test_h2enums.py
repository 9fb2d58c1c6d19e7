"""``h2``'s state machine inputs hashed in C (``agent.proxy.h2enums``): the tables answer as
before, and a stream's transitions make no Python call to hash them."""

from __future__ import annotations

import subprocess
import sys
from enum import Enum
from types import FrameType

import h2.stream
import pytest
from h2.connection import ConnectionInputs, ConnectionState, H2ConnectionStateMachine
from h2.exceptions import ProtocolError
from h2.stream import H2StreamStateMachine, StreamInputs, StreamState

from agent.proxy import h2enums, h2wire  # noqa: F401  (h2wire imports h2enums)
from tests.unit.proxy.h2peers import peer

_REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/a"), (":authority", "a")]


def _exchange() -> None:
    """A request and its response, each with a body, between two ``h2`` connections."""
    client, server = peer(client_side=True), peer(client_side=False)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    client.send_headers(1, _REQUEST)
    client.send_data(1, b"ping", end_stream=True)
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(":status", "200")])
    server.send_data(1, b"pong")
    server.send_headers(1, [("grpc-status", "0")], end_stream=True)
    events = client.receive_data(server.data_to_send())
    assert type(events[-1]).__name__ == "StreamEnded"


def test_a_streams_transitions_make_no_python_call_to_hash_an_enum() -> None:
    """Before: ``Enum.__hash__`` once per stream transition (14 per gRPC call at the source)."""
    hashed = 0

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        nonlocal hashed
        if event == "call" and frame.f_code is Enum.__hash__.__code__:
            hashed += 1

    sys.setprofile(profile)
    try:
        _exchange()
    finally:
        sys.setprofile(None)
    assert hashed == 0


def _outcome(state: StreamState, input_: StreamInputs) -> object:
    machine = H2StreamStateMachine(1)
    machine.state = state
    try:
        events = machine.process_input(input_)
    except ProtocolError as e:
        return type(e).__name__, machine.state
    return [type(e).__name__ for e in events], machine.state


@pytest.mark.parametrize("input_", list(StreamInputs))
def test_every_stream_transition_answers_as_its_table_entry_says(input_: StreamInputs) -> None:
    """Every (state, input) pair: the entry ``h2`` built is found under the new hash (the
    target state it names is reached), and a pair it has none for is refused as before."""
    by_name = {(s, i.name): v for (s, i), v in h2.stream._transitions.items()}
    for state in StreamState:
        entry = by_name.get((state, input_.name))
        outcome = _outcome(state, input_)
        if entry is None:
            assert outcome == ("ProtocolError", StreamState.CLOSED)
        elif entry[0] is None:
            assert outcome == ([], entry[1])
        else:
            assert outcome[1] in (entry[1], StreamState.CLOSED)  # a handler may refuse


def test_the_connections_table_and_the_hash_change_are_whole_and_idempotent() -> None:
    h2enums.hash_by_identity()
    for kind in (StreamInputs, ConnectionInputs, ConnectionState):
        assert all(hash(member) == object.__hash__(member) for member in kind)
    table = H2ConnectionStateMachine._transitions
    assert all(table[key] is value for key, value in list(table.items()))
    machine = H2ConnectionStateMachine()
    machine.process_input(ConnectionInputs.SEND_HEADERS)
    assert machine.state is ConnectionState.CLIENT_OPEN


@pytest.mark.parametrize("module", ["agent.proxy.h2proxy", "agent.proxy.hbone"])
def test_the_proxys_h2_modules_hash_the_inputs_in_c_once_imported(module: str) -> None:
    """In a fresh interpreter (this one imported ``h2enums`` itself): importing either
    user of ``h2`` applies it."""
    probe = (
        f"import {module}\nfrom enum import Enum\nfrom h2.stream import StreamInputs\n"
        "print(StreamInputs.__hash__ is Enum.__hash__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
