"""The header list size a destination admits on top for a source node's blocks, sans-IO.

A source ``H2Proxy`` adds to a client's request head what ``PEER_HEADER_LIST`` counts (an
``x-request-id``, a mirrored copy's ``-shadow`` on ``:authority`` and ``host``): both
destination cores read such a head with exactly that on top (``H2Limits.client_allowance``),
announce the bound they read with, and keep the plain one towards the pod.
"""

from __future__ import annotations

import pytest
from h2.events import RequestReceived
from h2.settings import SettingCodes

from agent.proxy.h2exchange import Choice
from agent.proxy.h2limits import PEER_HEADER_LIST, PEER_LIMITS, H2Limits
from agent.proxy.h2mirror import shadow_head
from agent.proxy.h2proxy import H2Proxy
from agent.proxy.h2relay import H2Relay
from agent.proxy.http1 import SHADOW_SUFFIX, Verdict
from tests.unit.proxy.h2peers import Header, peer
from tests.unit.proxy.test_h2proxy import Pods

LIMIT = H2Limits().max_header_list_size
CORES = [H2Relay, H2Proxy]


def _size(head: list[Header]) -> int:
    """A block's header list size, as HPACK counts it (RFC 7541 section 4.1)."""
    return sum(32 + len(n) + len(v) for n, v in head)


def _at_the_limit() -> list[Header]:
    """A request head of exactly ``LIMIT``, with ``:authority`` and ``host`` and no
    ``x-request-id``."""
    head = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"grpc"),
            (b":path", b"/a/Do"), (b"host", b"grpc"), (b"x-pad", b"")]  # fmt: skip
    return [*head[:-1], (b"x-pad", b"p" * (LIMIT - _size(head)))]


def _source_sends() -> tuple[list[Header], list[Header]]:
    """What a source sends on for a client's head at the limit: the request as forwarded, and
    its mirrored copy's head."""
    w = Pods(lambda _r: Choice("a", mirror=True))
    w.client.send_headers(w.client.get_next_available_stream_id(), _at_the_limit(), end_stream=True)
    w.run()
    (request,) = [e for e in w.pod_events["a"] if isinstance(e, RequestReceived)]
    (copy,) = w.proxy.take_mirrors()
    return list(request.headers), shadow_head(copy.head)


def _reaches_the_pod(core: type[H2Relay | H2Proxy], allowance: int, head: list[Header]) -> bool:
    """Does a destination core given ``allowance`` pass ``head`` from its client to the pod?"""
    proxy = core(lambda _h: Verdict(True), limits=H2Limits(client_allowance=allowance))
    client, pod = peer(client_side=True), peer(client_side=False)
    client.send_headers(1, head, end_stream=True)
    proxy.receive_client(client.data_to_send())
    events = pod.receive_data(proxy.take_to_upstream())
    return not proxy.closing and any(isinstance(e, RequestReceived) for e in events)


@pytest.mark.parametrize("core", CORES)
def test_what_a_source_adds_to_a_head_at_the_limit_is_what_a_destination_admits(
    core: type[H2Relay | H2Proxy],
) -> None:
    """The source admits a head of exactly 16 KiB and sends it on with an ``x-request-id``,
    its mirrored copy also with ``-shadow`` twice: the copy is over the bound by exactly
    ``PEER_HEADER_LIST``. A destination core reads both with it on top, not the copy with a
    byte less, and neither with none (a plaintext client's bound)."""
    forwarded, mirrored = _source_sends()
    assert _size(forwarded) == LIMIT + PEER_HEADER_LIST - 2 * len(SHADOW_SUFFIX)
    assert _size(mirrored) == LIMIT + PEER_HEADER_LIST
    assert _reaches_the_pod(core, 0, _at_the_limit())
    for head in (forwarded, mirrored):
        assert _reaches_the_pod(core, PEER_HEADER_LIST, head)
        assert not _reaches_the_pod(core, 0, head)
    assert not _reaches_the_pod(core, PEER_HEADER_LIST - 1, mirrored)


@pytest.mark.parametrize("core", CORES)
def test_a_destination_announces_to_a_peer_the_bound_it_reads_with_and_the_pod_the_plain(
    core: type[H2Relay | H2Proxy],
) -> None:
    """SETTINGS_MAX_HEADER_LIST_SIZE: 16 KiB and the allowance to a source node, 16 KiB to a
    plaintext client and to the pod."""
    for limits, announced in ((PEER_LIMITS, LIMIT + PEER_HEADER_LIST), (None, LIMIT)):
        proxy = core(lambda _h: Verdict(True), limits=limits)
        client, pod = peer(client_side=True), peer(client_side=False)
        proxy.receive_client(client.data_to_send())
        client.receive_data(proxy.take_to_client())
        pod.receive_data(proxy.take_to_upstream())
        assert client.remote_settings[SettingCodes.MAX_HEADER_LIST_SIZE] == announced
        assert pod.remote_settings[SettingCodes.MAX_HEADER_LIST_SIZE] == LIMIT
