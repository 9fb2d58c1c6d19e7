"""The admin CLI's reads are bounded like the view's (``agent.admin.client.request``): the
whole answer within a deadline, and at most a number of bytes, each failure naming the agent."""

from __future__ import annotations

import json

import pytest

from agent.admin.client import AdminError, request
from tests.trickle import Trickler


@pytest.mark.parametrize("where", ["head", "body"])
def test_an_answer_that_trickles_past_the_deadline_fails_naming_the_agent(where: str) -> None:
    """Each byte comes well within the per-operation timeout, so only the deadline on the whole
    answer stops it: before it, the CLI read every byte however long they took (here the
    server stops after a few hundred, so the test ends either way)."""
    body = json.dumps({"connections": ["x" * 10] * 10}).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    if where == "head":
        head = head.replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"p" * 300 + b"\r\n\r\n")
    server = Trickler(head, body, pause=0.02, path="/connections")
    try:
        with pytest.raises(AdminError) as caught:
            request(server.address, "/connections", deadline=0.3)
        message = str(caught.value)
        assert f"{server.address}/connections: no whole answer within 0.3 s" in message
        assert server.client_left.wait(30)  # the CLI let go before it was all sent
        assert server.sent < len(server.data)
    finally:
        server.close()


def test_an_answer_past_the_size_bound_fails_and_one_within_it_is_read() -> None:
    body = json.dumps({"rows": list(range(100))}).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    server = Trickler(head, body, pause=0)
    try:
        with pytest.raises(AdminError, match="the answer is larger than 0 MiB"):
            request(server.address, "/status", limit=len(body) - 1)
    finally:
        server.close()
    server = Trickler(head, body, pause=0)
    try:
        assert request(server.address, "/status", limit=len(body)) == {"rows": list(range(100))}
    finally:
        server.close()
