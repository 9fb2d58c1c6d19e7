"""An HTTP/1.x request on a port declared HTTP/2 (``h2guard.PrefaceSniff`` and both cores):
answered with an HTTP/1.1 400 that names the cause and the fix, not with HTTP/2 frames."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agent.proxy.h2core import H2Core
from agent.proxy.h2guard import CLIENT_PREFACE, HTTP1_ON_H2, PrefaceSniff
from agent.proxy.h2proxy import H2Proxy
from agent.proxy.h2relay import H2Relay
from agent.proxy.http1 import Verdict

REQUEST = b"GET /hello HTTP/1.1\r\nHost: svc:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n"


def allow(_head: object) -> Verdict:
    return Verdict(True)


CORES: dict[str, Callable[[], H2Core]] = {
    "destination": lambda: H2Proxy(allow),
    "relay": lambda: H2Relay(allow),
    "source": lambda: H2Proxy(allow, pick=lambda _r: None),
}


@pytest.mark.parametrize(
    ("data", "verdict"),
    [
        (CLIENT_PREFACE, PrefaceSniff.H2),
        (CLIENT_PREFACE[:10], PrefaceSniff.MORE),
        (CLIENT_PREFACE + b"\x00\x00\x00\x04", PrefaceSniff.H2),
        (REQUEST, PrefaceSniff.HTTP1),
        (b"POST /x HTTP/1.0\n", PrefaceSniff.HTTP1),
        (b"GET", PrefaceSniff.MORE),
        (b"GET /a/b?c=d HTT", PrefaceSniff.MORE),
        (b"GET / HTTP/2.0\r\n", PrefaceSniff.OTHER),
        (b"\x16\x03\x01\x02\x00", PrefaceSniff.OTHER),  # a TLS ClientHello
        (b"hello world\r\n", PrefaceSniff.OTHER),
        (b"A" * 9000, PrefaceSniff.OTHER),
    ],
)
def test_the_first_bytes_are_told_apart(data: bytes, verdict: str) -> None:
    assert PrefaceSniff().feed(data) == verdict


def test_a_request_line_cut_across_reads_is_still_an_http1_request() -> None:
    sniff = PrefaceSniff()
    assert sniff.feed(b"GE") == PrefaceSniff.MORE
    assert sniff.feed(b"T / HTTP/1") == PrefaceSniff.MORE
    assert sniff.feed(b".1\r\nHost: a\r\n\r\n") == PrefaceSniff.HTTP1


@pytest.mark.parametrize("core", CORES)
def test_an_http1_request_gets_an_http1_400_naming_cause_and_fix(core: str) -> None:
    proxy = CORES[core]()
    assert proxy.take_to_client() == b""  # nothing of ours before the client's first bytes
    proxy.receive_client(REQUEST[:7])
    proxy.receive_client(REQUEST[7:])
    out = proxy.take_to_client()
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"connection: close" in head
    assert f"content-length: {len(body)}".encode() in head
    assert b"declared HTTP/2 (h2c with prior knowledge)" in body
    assert b"appProtocol" in body and b"declare the port http" in body
    assert proxy.closing
    assert proxy.take_rejections() == [HTTP1_ON_H2]
    assert proxy.refusal is not None and "GET /hello HTTP/1.1" in proxy.refusal
    assert proxy.take_to_client() == b""  # once; and no frames after it
    proxy.receive_client(b"more")
    assert proxy.take_to_client() == b""


@pytest.mark.parametrize("core", CORES)
def test_our_settings_follow_the_clients_preface(core: str) -> None:
    proxy = CORES[core]()
    assert proxy.take_to_client() == b""
    proxy.receive_client(CLIENT_PREFACE[:5])
    assert proxy.take_to_client() == b""
    proxy.receive_client(CLIENT_PREFACE[5:] + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
    out = proxy.take_to_client()
    assert out[3] == 0x4 and out[4] == 0  # our SETTINGS first, then the ACK of theirs
    assert not proxy.closing and proxy.take_rejections() == []


@pytest.mark.parametrize("core", CORES)
def test_other_garbage_is_still_an_http2_protocol_error(core: str) -> None:
    proxy = CORES[core]()
    proxy.receive_client(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40))
    assert proxy.closing
    assert proxy.take_rejections() == ["h2_protocol_error"]
    assert not proxy.take_to_client().startswith(b"HTTP/1.1")
